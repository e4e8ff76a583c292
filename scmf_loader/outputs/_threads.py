"""Threads for the compiled output kernels: a batch's cells cut into parts of about equal
non-zeros (the calling thread's a tenth larger: :data:`CALLER_EXTRA`), each part run by the
same ``nogil`` kernel on its own thread, writing its own rows.

How many threads (``threads`` of every output function, else :func:`set_threads`, else
``$SCMF_OUTPUT_THREADS``, else the default): by default 2 in the main thread of the main
process when at least two CPUs are usable and one is spare (1-minute load average below
the CPU count minus one half), and 1 anywhere else - in a DataLoader worker process, a
forked child, or a thread other than the main one - so that workers that already run in
parallel do not oversubscribe the cores; a loader's worker threads get their share of the
spare cores instead (:func:`worker_thread_default`: 2 for a lone worker thread). On a machine whose cores are
busy, the second thread waits for a core and the batch is slower than with one. A batch too small to pay for
the hand-off (under :data:`MIN_PART_ENTRIES` non-zeros per part) runs in the calling thread.

The pool is created on first use; a forked child never reuses its parent's (its threads do
not exist there) and creates its own if it is asked for more than one thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from scmf_loader.errors import ConfigurationError

__all__ = ["CALLER_EXTRA", "MIN_PART_ENTRIES", "parts", "resolve_threads", "run_parts", "set_threads", "worker_thread_default"]

MIN_PART_ENTRIES = 32_768
#: the calling thread's part is this much larger than the others: a pool thread starts its
#: part ~35 us after it is handed over on the benchmark VM (a no-op's round trip: 75 us), and
#: a caller that finishes first sleeps and is woken again. 400 us of nogil work split in two:
#: median 280 us with equal parts, 236 us with 55% for the caller, 255 us with 60%.
CALLER_EXTRA = 0.1
_IMPORT_PID = os.getpid()
_setting: list[int | None] = [None]
_pool: dict[str, Any] = {"pid": None, "size": 0, "executor": None}
_lock = threading.Lock()
_thread_default = threading.local()  # per loader worker thread: worker_thread_default


def set_threads(threads: int | None) -> None:
    """The number of threads the output kernels use when a call does not say (``None``:
    back to ``$SCMF_OUTPUT_THREADS`` or the default)."""
    _setting[0] = None if threads is None else _checked(threads)


def _checked(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ConfigurationError(f"threads must be an integer >= 1, got {threads!r}")
    return int(threads)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _in_worker() -> bool:
    """True in a DataLoader worker process, a forked child or a thread other than the main one."""
    if os.getpid() != _IMPORT_PID or threading.current_thread() is not threading.main_thread():
        return True
    import torch.utils.data

    return torch.utils.data.get_worker_info() is not None


def resolve_threads(threads: int | None) -> int:
    """``threads``, else the :func:`set_threads` setting, else ``$SCMF_OUTPUT_THREADS``, else
    2 in the main thread of the main process when a core is spare, and 1 elsewhere."""
    if threads is not None:
        return _checked(threads)
    if _setting[0] is not None:
        return _setting[0]
    env = os.environ.get("SCMF_OUTPUT_THREADS")
    if env:
        try:
            return _checked(int(env))
        except ValueError:
            raise ConfigurationError(f"$SCMF_OUTPUT_THREADS must be an integer >= 1, got {env!r}") from None
    local = getattr(_thread_default, "threads", None)
    if local is not None:  # a loader worker thread told its share (worker_thread_default)
        return local
    if _in_worker():
        return 1
    cpus = _usable_cpus()
    if cpus < 2 or _busy(cpus):
        return 1
    return 2


def worker_thread_default(n_workers: int) -> None:
    """Called in each of a loader's ``n_workers`` worker threads as it starts: the default of
    that thread becomes its share of the spare cores (2 for a lone worker thread on a machine
    with a spare core, as the idle main thread would have had; 1 when several workers already
    run in parallel or the cores are busy). Explicit settings still win."""
    cpus = _usable_cpus()
    share = cpus // max(1, int(n_workers))
    _thread_default.threads = 2 if share >= 2 and not _busy(cpus) else 1


def _busy(cpus: int) -> bool:
    """No core to spare: the 1-minute load average (this process included) is within half a
    core of the CPU count. A second kernel thread then waits for a core and the batch takes
    longer (measured: docs/benchmarks.md)."""
    try:
        return os.getloadavg()[0] > cpus - 0.5
    except OSError:  # not available: assume a spare core
        return False


def parts(indptr: np.ndarray, threads: int, min_entries: int | None = None) -> list[tuple[int, int]]:
    """Cell ranges ``[c0, c1)`` of about equal non-zeros, at most ``threads`` of them and each
    with at least ``min_entries`` (default :data:`MIN_PART_ENTRIES`) non-zeros (one range
    when that leaves one). The
    first range, which the calling thread runs while the pool's threads wake up, is
    :data:`CALLER_EXTRA` larger than the others."""
    n = len(indptr) - 1
    nnz = int(indptr[-1] - indptr[0]) if n > 0 else 0
    least = MIN_PART_ENTRIES if min_entries is None else int(min_entries)
    k = max(1, min(threads, n, nnz // max(1, least)))
    if k == 1:
        return [(0, n)]
    first = nnz * (1 + CALLER_EXTRA) / k
    targets = indptr[0] + np.round(first + np.arange(k - 1) * (nnz - first) / (k - 1)).astype(np.int64)
    cuts = np.clip(np.searchsorted(indptr, targets), 1, n - 1)  # a malformed indptr: the kernels say so
    bounds = [0, *sorted({int(c) for c in cuts}), n]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _executor(size: int) -> ThreadPoolExecutor:
    with _lock:
        if _pool["pid"] != os.getpid() or _pool["size"] < size:
            old = _pool["executor"] if _pool["pid"] == os.getpid() else None
            _pool.update(pid=os.getpid(), size=size,
                         executor=ThreadPoolExecutor(max_workers=size, thread_name_prefix="scmf-outputs"))
            if old is not None:
                old.shutdown(wait=False)
        return _pool["executor"]


def run_parts(fn: Callable[[int, int], Any], ranges: Sequence[tuple[int, int]]) -> list[Any]:
    """``[fn(c0, c1) for (c0, c1) in ranges]``, the first in the calling thread and the others
    in the pool at the same time (errors are raised once every part has finished)."""
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    ex = _executor(len(ranges) - 1)
    futures = [ex.submit(fn, a, b) for a, b in ranges[1:]]
    try:
        first = fn(*ranges[0])
    finally:
        rest = [f.result() for f in futures]
    return [first, *rest]
