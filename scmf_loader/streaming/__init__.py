"""Datasets at fsspec URLs (S3, GCS, HTTP, ...): streaming and map-style, through a node cache.

- :class:`StreamingCellDataset` (:mod:`~scmf_loader.streaming.dataset`): an
  ``IterableDataset`` with DistributedSampler semantics over whole shards, background
  prefetch, a shuffle window across the shards in flight, and exact resume;
- :func:`open_remote_dataset` (:mod:`~scmf_loader.streaming.remote`): the store behind
  ``CellDataset(url, cache_dir=...)``;
- :mod:`~scmf_loader.streaming.plan`: the pure planning (no I/O);
- :mod:`~scmf_loader.streaming.cache`: the node-local shard cache (verify, lock, LRU budget).

fsspec and the protocol packages (the extra ``scmodelforge-data[remote]``) are imported only
when a URL is opened; importing this package imports neither them nor torch.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from scmf_loader._lazy import lazy_exports as _lazy_exports

if _TYPE_CHECKING:
    from scmf_loader.streaming.dataset import StreamingCellDataset
    from scmf_loader.streaming.errors import CacheError, RemoteError
    from scmf_loader.streaming.remote import RemoteDatasetStore, open_remote_dataset

_LAZY = {
    "CacheError": "scmf_loader.streaming.errors",
    "RemoteDatasetStore": "scmf_loader.streaming.remote",
    "RemoteError": "scmf_loader.streaming.errors",
    "StreamingCellDataset": "scmf_loader.streaming.dataset",
    "open_remote_dataset": "scmf_loader.streaming.remote",
}

__all__ = [
    "CacheError",
    "RemoteDatasetStore",
    "RemoteError",
    "StreamingCellDataset",
    "open_remote_dataset",
]


# the public names resolve on first access (PEP 562); dir() lists __all__ only
__getattr__, __dir__ = _lazy_exports(__name__, globals(), _LAZY, __all__)
