"""What a conversion does while its sources are checksummed (the checksum is a full read of
every input, mostly waiting on the disk): the writer's libraries and the compiled kernels
load (:func:`warm_up`), and the memory a one-pass run (:func:`one_pass`, the rule that
decides) will hold is faulted in (:func:`speculative_arena`); the cyclic garbage collector is kept out of the way for the
whole run (:func:`gc_frozen`). None of it changes what is written."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scmf_shards.arena import Arena
from scmf_shards.convert.workspace import Workspace
from scmf_shards.executor import TaskRunner
from scmf_shards.options import ConvertOptions
from scmf_shards.plan import shard_sizes

__all__ = ["ARENA_SLACK", "ONE_PASS_MARGIN", "gc_frozen", "one_pass", "speculative_arena", "warm_up"]

#: memory a one-pass conversion may hold beyond its data and per-thread buffers (:func:`one_pass`)
ONE_PASS_MARGIN = 128 << 20
#: the arena holds the estimate of the held bytes (Estimate.held: sampled from the first rows, compact
#: uint16 counts and ids where the sample allows; a run that holds more takes ordinary
#: arrays for the rest), so that it stays inside the one-pass budget
ARENA_SLACK = 1.0


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Everything allocated before the conversion (imported modules: millions of objects)
    moved out of the cyclic garbage collector's sight while it runs, and young collections
    made rarer: its collections, triggered by the conversion's own allocations (obs frames,
    anndata's writer), took ~5% of the CPU time. Restored afterwards."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(threshold[0], 50_000), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def one_pass(estimate: int, sizes: np.ndarray, options: ConvertOptions, runner: TaskRunner) -> bool:
    """Whether a conversion goes in one pass (every chunk's aligned rows held in memory,
    shards gathered from there) rather than through scratch buckets: when its tasks run in
    this process and what it holds at its peak fits ``options.memory_limit``: the shuffled
    data (``estimate`` bytes, sampled from the inputs) plus, per thread, one read chunk
    (read and aligned: twice its share of the data) and one shard being gathered, plus
    :data:`ONE_PASS_MARGIN` (obs frames, allocator slack: measured ~70 MB, tests/test_convert_memory.py)."""
    if not runner.in_process:
        return False
    n_cells = int(sizes.sum())
    per_cell = estimate / max(n_cells, 1)
    per_thread = per_cell * (2 * options.chunk_size + int(sizes.max(initial=0)))
    return estimate + runner.threads * per_thread + ONE_PASS_MARGIN <= options.memory_limit_bytes


def speculative_arena(out: Path, local: bool, sources: Sequence[Any], estimate: int,
                      options: ConvertOptions, runner: TaskRunner) -> Arena | None:
    """The memory a fresh, local, one-pass run will hold its rows in (:mod:`scmf_shards.arena`),
    its pages faulted in from now on, while the sources are checksummed; None when the run
    will not be one fresh in-process pass without preprocessing (decided again, with the
    dataset id, in the driver: an arena it does not use is simply dropped)."""
    if not local or options.preprocessing or not runner.in_process or Workspace.at(out).root.exists():
        return None
    sizes = shard_sizes(sum(s.n_cells for s in sources), options.shard_size)
    if not one_pass(estimate, sizes, options, runner):
        return None
    arena = Arena(int(getattr(estimate, "held", estimate) * ARENA_SLACK))  # compact counts: ~half
    arena.prefault()
    return arena


def warm_up() -> None:
    """Import the shard writer's libraries and load the compiled kernels (numba's on-disk
    cache) ahead of their first use: ~1-2 s of a conversion's start, overlapped with the
    sources' checksums. Nothing depends on it: a failure here shows up again where it matters."""
    with contextlib.suppress(Exception):
        import zarr  # noqa: F401
        from anndata.experimental import write_dispatched  # noqa: F401

        from scmf_shards.kernels import warm_up

        warm_up()
