"""The on-disk format of a scModelForge dataset directory, in one package.

- :mod:`~scmf_loader.format.manifest`: ``manifest.json`` (the :class:`Manifest` schema, the one
  version check, atomic writing) and :mod:`~scmf_loader.format.sections` (its typed
  ``vocab`` / ``preprocessing`` / ``shuffle`` sections);
- :mod:`~scmf_loader.format.shard`: the shard layout, reader and writer side by side;
- :mod:`~scmf_loader.format.integrity`: the one integrity checker (sizes, checksums,
  structure), used by ``open_dataset``, ``scmf-convert verify`` and the converter's resume.

``docs/format.md`` is the prose spec. Every name exported here was exported by the former
single module ``scmf_loader/format.py``, so ``from scmf_loader.format import X`` keeps working.
"""

from __future__ import annotations

from scmf_loader.format._common import sha256_bytes, sha256_file
from scmf_loader.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUT_RAW,
    MANIFEST_NAME,
    SUPPORTED_FORMAT_VERSIONS,
    SUPPORTED_LAYOUTS,
    VALUE_DTYPES,
    VOCAB_NAME,
    Manifest,
    ObsColumn,
    SourceEntry,
    check_format_version,
    compute_dataset_id,
    manifest_bytes,
    manifest_from_dict,
    read_manifest,
    write_manifest,
)
from scmf_loader.format.sections import PreprocessingSection, ShuffleSection, VocabSection
from scmf_loader.format.shard import (
    ARRAY_NAMES,
    INDEX_DTYPE,
    INDPTR_DTYPE,
    SHARDS_DIR,
    X_ENCODING,
    ArrayEntry,
    OtherFiles,
    ShardEntry,
    other_files_digest,
    shard_array_relpath,
    shard_relpath,
)

__all__ = [
    "ARRAY_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_DTYPE",
    "INDPTR_DTYPE",
    "LAYOUT_RAW",
    "MANIFEST_NAME",
    "SHARDS_DIR",
    "SUPPORTED_FORMAT_VERSIONS",
    "SUPPORTED_LAYOUTS",
    "VALUE_DTYPES",
    "VOCAB_NAME",
    "X_ENCODING",
    "ArrayEntry",
    "Manifest",
    "ObsColumn",
    "OtherFiles",
    "PreprocessingSection",
    "ShardEntry",
    "ShuffleSection",
    "SourceEntry",
    "VocabSection",
    "check_format_version",
    "compute_dataset_id",
    "manifest_bytes",
    "manifest_from_dict",
    "other_files_digest",
    "read_manifest",
    "sha256_bytes",
    "sha256_file",
    "shard_array_relpath",
    "shard_relpath",
    "write_manifest",
]
