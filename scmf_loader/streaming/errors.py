"""The two errors of remote datasets that :mod:`scmf_loader.errors` has no type for.

Both derive from :class:`~scmf_loader.errors.ScmfError` (and ``OSError``, what a caller of
I/O code catches). Every other problem of a remote dataset raises the type a local dataset
raises for it (``ManifestNotFoundError`` for a missing bucket, prefix or manifest,
``ChecksumMismatchError`` for a shard failing its checksum, ...), its message naming the URL.
"""

from __future__ import annotations

from scmf_loader.errors import ScmfError

__all__ = ["CacheError", "RemoteError"]


class RemoteError(ScmfError, OSError):
    """An object store could not be read: access refused, or a request still failing after
    every retry. The message names the URL, never the credentials."""


class CacheError(ScmfError, OSError):
    """The local shard cache cannot serve a remote dataset: its directory is not writable,
    or ``cache_limit`` is too small for the shards that must be held at once."""
