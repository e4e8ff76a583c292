"""How worker results travel besides the slots (:mod:`scmf_loader.transport`): queues whose
``put`` writes to the pipe in the calling thread (:class:`DirectQueue`, through
:func:`direct_context`), and worker threads (:func:`threaded`)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import multiprocessing.reduction
import queue
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["DirectQueue", "direct_context", "threaded"]


# ---- queues without feeder threads --------------------------------------------------------
#: a pipe's buffer on Linux: what :class:`DirectQueue` writers may have in flight on one queue
_PIPE_BYTES = 64 << 10


def _loads(data: bytes) -> Any:
    return multiprocessing.reduction.ForkingPickler.loads(data)


class _Pickled:
    """Bytes :class:`DirectQueue` already pickled, handed to the feeder thread as they are
    (the reader gets the original object back, pickled once)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return _loads, (self.data,)


class DirectQueue(multiprocessing.queues.Queue):
    """A ``multiprocessing.Queue`` whose ``put`` pickles and writes a message to the pipe in
    the calling thread, instead of handing the object to a feeder thread that does it later.

    The feeder thread cost two thread switches per message on each side (measured on this
    2-core VM: ~15% of the loader process's samples, in the scheduler), and in a worker it
    needs the GIL, which a pure-Python transform holds for the next batch. A direct write
    waits while the pipe is full, so only messages of at most ``max_direct`` bytes are
    written directly: with at most ``prefetch_factor`` requests (and a sentinel or two) in
    flight per worker, :func:`direct_context` sizes it so that a worker's request pipe never
    fills, and the loader's process never waits on a worker that waits on it. A larger
    message, and every message after it (the order is kept), goes through the feeder."""

    max_direct = 4096

    def __getstate__(self) -> Any:
        return (super().__getstate__(), self.max_direct)

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state[0])
        self.max_direct = state[1]

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        if self._thread is not None:  # type: ignore[attr-defined]  # the feeder runs: keep the order
            super().put(obj, block, timeout)
            return
        if self._closed:  # type: ignore[attr-defined]
            raise ValueError(f"Queue {self!r} is closed")
        data = multiprocessing.reduction.ForkingPickler.dumps(obj)
        if len(data) > self.max_direct:
            super().put(_Pickled(bytes(data)), block, timeout)
            return
        if not self._sem.acquire(block, timeout):  # type: ignore[attr-defined]
            raise queue.Full
        try:
            if self._wlock is None:  # type: ignore[attr-defined]
                self._send_bytes(data)  # type: ignore[attr-defined]
            else:
                with self._wlock:  # type: ignore[attr-defined]
                    self._send_bytes(data)  # type: ignore[attr-defined]
        except BaseException:
            self._sem.release()  # type: ignore[attr-defined]
            raise


def _direct_queue(context: Any, maxsize: int = 0) -> DirectQueue:
    q = DirectQueue(maxsize, ctx=context)
    q.max_direct = context.max_direct
    return q


def _direct_class(base: type) -> type:
    return type(f"Direct{base.__name__}", (base,), {
        "Queue": _direct_queue, "max_direct": 4096,
        "__doc__": f"{base.__name__} whose queues are :class:`DirectQueue` s.",
    })


_DIRECT = {c: _direct_class(c) for c in (getattr(multiprocessing.context, n, None) for n in
                                         ("ForkContext", "SpawnContext", "ForkServerContext")) if c is not None}


def direct_context(context: Any = None, in_flight: int = 4) -> Any:
    """The multiprocessing context (default: Python's default; a start method name; or a
    context) with :class:`DirectQueue` queues, writing directly messages of up to a pipe's
    buffer over ``in_flight`` (the most messages a reader may leave unread); a context of
    another kind as it is."""
    if context is None or isinstance(context, str):
        context = multiprocessing.get_context(context)
    cls = _DIRECT.get(type(context))
    if cls is None and type(context) not in _DIRECT.values():
        return context
    out = cls() if cls is not None else context
    out.max_direct = _PIPE_BYTES // max(1, in_flight)
    return out


# ---- threads ----------------------------------------------------------------------------
def threaded(fetch: Callable[[Any], Any], requests: Iterable[Any], threads: int, depth: int | None = None,
             initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()) -> Iterator[Any]:
    """``fetch(request)`` for every request, on ``threads`` threads (each running
    ``initializer(*initargs)`` first), at most ``depth`` (default ``2 * threads``) ahead of the
    caller; results in request order."""
    from concurrent.futures import ThreadPoolExecutor

    depth = max(1, depth or 2 * threads)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="scmf-worker", initializer=initializer, initargs=initargs)
    pending: deque[Any] = deque()
    todo = iter(requests)
    try:
        for request in todo:
            pending.append(pool.submit(fetch, request))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False)
