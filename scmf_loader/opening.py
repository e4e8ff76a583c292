"""``open_dataset``: the one public way to open a dataset, a local directory or a URL.

A local directory is opened in place (:func:`scmf_loader.store.open_local_dataset`); an
fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``, ...) through a node-local,
verified shard cache (:func:`scmf_loader.streaming.remote.open_remote_dataset`). Kept apart
from both so that neither imports the other's side: the remote store builds on the local
one, never the reverse.
"""

from __future__ import annotations

import os
from typing import Any

from scmf_loader.errors import ConfigurationError
from scmf_loader.store import DEFAULT_MAX_OPEN_SHARDS, DatasetStore, open_local_dataset

__all__ = ["open_dataset"]


def open_dataset(
    path: str | os.PathLike[str],
    *,
    verify: bool = False,
    max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
    **remote: Any,
) -> DatasetStore:
    """Open the dataset at ``path`` (a directory, or an fsspec URL) for reading.

    Reads and validates the manifest (format and version) and the vocabulary, and checks
    each shard array file's size with one ``stat``; ``verify=True`` also checks every
    checksum and each shard's full structure (reads every byte). A URL is opened through a
    node-local cache and takes ``remote`` options (``cache_dir``, ``cache_limit``,
    ``storage_options``, ``retries``); they are refused for a local path. Raises
    :class:`~scmf_loader.errors.ManifestNotFoundError`,
    :class:`~scmf_loader.errors.FormatVersionError`,
    :class:`~scmf_loader.errors.ManifestError`,
    :class:`~scmf_loader.errors.ShardNotFoundError`,
    :class:`~scmf_loader.errors.ShardSizeError`,
    :class:`~scmf_loader.errors.ChecksumMismatchError` or
    :class:`~scmf_loader.errors.ShardCorruptError`, each naming the file; a shard whose
    ``indptr`` is malformed raises ShardCorruptError when it is first read.
    """
    if isinstance(path, str) and "://" in path:
        from scmf_loader.streaming.remote import open_remote_dataset

        return open_remote_dataset(path, verify=verify, max_open_shards=max_open_shards, **remote)
    if remote:
        raise ConfigurationError(f"{path}: {sorted(remote)} apply to datasets at URLs only")
    return open_local_dataset(path, verify=verify, max_open_shards=max_open_shards)
