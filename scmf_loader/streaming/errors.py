"""The two errors of remote datasets (defined in :mod:`scmf_loader.errors`, re-exported here).

Both derive from :class:`~scmf_loader.errors.ScmfError` (and ``OSError``, what a caller of
I/O code catches). Every other problem of a remote dataset raises the type a local dataset
raises for it (``ManifestNotFoundError`` for a missing bucket, prefix or manifest,
``ChecksumMismatchError`` for a shard failing its checksum, ...), its message naming the URL.
"""

from __future__ import annotations

from scmf_loader.errors import CacheError, RemoteError

__all__ = ["CacheError", "RemoteError"]
