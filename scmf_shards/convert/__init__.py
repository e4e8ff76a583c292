"""Conversion of sources into a dataset directory: sources → aligned, shuffled shards → manifest.

Two stages of independent tasks (run in-process, on a local dask cluster, or on a remote
scheduler; see :class:`~scmf_shards.executor.TaskRunner`):

1. *scatter* (:mod:`.scatter`): one task per read chunk reads rows of one source, validates
   them, aligns them to the vocabulary, and writes them grouped by destination shard into a
   bucket directory (renamed into place when complete);
2. *gather* (:mod:`.gather`): one task per shard collects its rows from every bucket,
   applies the in-shard permutation, and writes the shard (temporary name, then rename).

Memory per task is bounded by the chunk size and the shard size, never the dataset size.
The driver (:mod:`.driver`) writes ``vocab.json`` and finally ``manifest.json``; the
scratch layout is :mod:`.workspace`, the output directory's lock and resume rules
:mod:`.output`. A killed conversion re-run with the same inputs and options reuses complete
buckets and shards that verify.

Names are imported on first use (PEP 562), so ``import scmf_shards.convert`` is cheap and
:mod:`.workspace` can be used without the driver's imports.
"""

from __future__ import annotations

from scmf_loader._lazy import lazy_exports as _lazy_exports

__all__ = [
    "FAULT_ENV",
    "LOCK_NAME",
    "TMP_DIR",
    "GatherTask",
    "ScatterTask",
    "Workspace",
    "convert_h5ad",
    "convert_sources",
    "resolve_vocab",
    "run_gather",
    "run_scatter",
]

_LAZY = {
    "FAULT_ENV": "scmf_shards.faults",
    "LOCK_NAME": "scmf_shards.convert.output",
    "TMP_DIR": "scmf_shards.convert.workspace",
    "Workspace": "scmf_shards.convert.workspace",
    "GatherTask": "scmf_shards.convert.gather",
    "run_gather": "scmf_shards.convert.gather",
    "ScatterTask": "scmf_shards.convert.scatter",
    "run_scatter": "scmf_shards.convert.scatter",
    "convert_h5ad": "scmf_shards.convert.driver",
    "convert_sources": "scmf_shards.convert.driver",
    "resolve_vocab": "scmf_loader.vocab",
}


# the public names resolve on first access (PEP 562); dir() lists __all__ only
__getattr__, __dir__ = _lazy_exports(__name__, globals(), _LAZY, __all__)
