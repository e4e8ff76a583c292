"""One exception hierarchy for the scModelForge data layer.

Every error raised on purpose by ``scmf_loader`` or ``scmf_shards`` derives from
:class:`ScmfError`, itself a :class:`ValueError`. Subclasses also derive from the builtin a
caller would naturally catch (``FileNotFoundError``, ``FileExistsError``, ...). Messages say
what was found, what was expected and what to do; the offending file is named in the message.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "ChecksumMismatchError",
    "ConfigurationError",
    "DatasetChangedError",
    "DatasetExistsError",
    "DatasetLockedError",
    "FormatVersionError",
    "InvalidInputError",
    "ManifestError",
    "ManifestNotFoundError",
    "ObsColumnNotFoundError",
    "OutputNotWritableError",
    "RegistryError",
    "RemoteError",
    "ScmfError",
    "ShardCorruptError",
    "ShardNotFoundError",
    "ShardSizeError",
    "UnknownDatasetError",
    "VocabularyError",
]


class ScmfError(ValueError):
    """Base class of every error raised on purpose by scmf_loader and scmf_shards."""


class ManifestError(ScmfError):
    """A manifest exists but is malformed or inconsistent."""


class ManifestNotFoundError(ScmfError, FileNotFoundError):
    """A directory has no ``manifest.json``: it is not (or not yet) a dataset."""


class FormatVersionError(ManifestError):
    """The manifest's ``format`` or ``format_version`` is not one this code can read."""


class ShardNotFoundError(ScmfError, FileNotFoundError):
    """A shard or one of its array files listed in the manifest is missing."""


class ShardSizeError(ScmfError, OSError):
    """A shard array file has a different size than the manifest says (e.g. truncated)."""


class ChecksumMismatchError(ScmfError, OSError):
    """A file's checksum differs from the one recorded in the manifest."""


class ShardCorruptError(ScmfError, OSError):
    """A shard is structurally invalid: its files have the sizes the manifest says, but their
    content breaks the format (``indptr`` not running from 0 to ``nnz``, an obs column listed
    in the manifest missing from the shard, zarr metadata disagreeing with the manifest, ...).
    The message names the shard, the array and the first bad position."""


class ObsColumnNotFoundError(ScmfError, KeyError):
    """An obs column or per-cell statistic was asked for that the dataset does not keep."""

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class VocabularyError(ScmfError):
    """A gene vocabulary is malformed, or inputs do not overlap with it."""


class InvalidInputError(ScmfError):
    """An input file is missing, unreadable, or holds data that cannot be converted."""


class DatasetExistsError(ScmfError, FileExistsError):
    """The output directory already holds something else and ``overwrite`` was not given."""


class DatasetLockedError(ScmfError, BlockingIOError):
    """Another conversion holds the lock on the output directory."""


class ConfigurationError(ScmfError):
    """A loader argument is out of range or inconsistent (``rank >= world_size``,
    ``max_genes < 1``, a resume state taken with other settings, ...)."""


class RegistryError(ScmfError):
    """A registry file is missing, unreadable or malformed."""


class UnknownDatasetError(RegistryError, KeyError):
    """A name or version that the registry does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class DatasetChangedError(ScmfError):
    """The dataset at a registered location has another ``dataset_id`` than the registry
    pins: the data changed under the name."""


class OutputNotWritableError(ScmfError, OSError):
    """The output (or scratch) directory cannot take the conversion: no space left, a
    read-only file system, no permission, or a path that cannot be created."""


class RemoteError(ScmfError, OSError):
    """An object store could not be read: access refused, or a request still failing after
    every retry. The message names the URL, never the credentials."""


class CacheError(ScmfError, OSError):
    """The local shard cache cannot serve a remote dataset: its directory is not writable,
    or ``cache_limit`` is too small for the shards that must be held at once."""
