"""The on-disk format of a scModelForge dataset directory: the one owner of it.

A dataset directory holds ``manifest.json`` (this module's :class:`Manifest`), ``vocab.json``
(a :class:`~scmf_loader.vocab.GeneVocab`) and ``shards/NNNNNN.zarr`` (AnnData-compatible Zarr
groups whose CSR arrays are raw single-chunk files). ``docs/format.md`` is the prose spec;
this module is its reference implementation: writers build a :class:`Manifest` and call
:func:`write_manifest`; readers call :func:`read_manifest`, which rejects anything it does
not understand with a clear message. JSON only: nothing is ever unpickled or evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scmf_loader.errors import (
    FormatVersionError,
    ManifestError,
    ManifestNotFoundError,
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
    "VOCAB_NAME",
    "ArrayEntry",
    "Manifest",
    "ObsColumn",
    "OtherFiles",
    "ShardEntry",
    "SourceEntry",
    "compute_dataset_id",
    "manifest_from_dict",
    "other_files_digest",
    "read_manifest",
    "sha256_bytes",
    "sha256_file",
    "shard_array_relpath",
    "shard_relpath",
    "write_manifest",
]

FORMAT_NAME = "scmf-shards"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
SHARDS_DIR = "shards"
LAYOUT_RAW = "raw"
SUPPORTED_LAYOUTS = (LAYOUT_RAW,)
ARRAY_NAMES = ("data", "indices", "indptr")
INDEX_DTYPE = "int32"
INDPTR_DTYPE = "int64"
VALUE_DTYPES = ("float32", "float64", "int32", "uint16", "uint32")  # scipy.sparse (and so
# anndata) cannot hold float16
_CHUNK = 8 << 20


def shard_relpath(index: int) -> str:
    """Relative path of shard ``index`` inside a dataset directory (``shards/000007.zarr``)."""
    return f"{SHARDS_DIR}/{index:06d}.zarr"


def shard_array_relpath(name: str) -> str:
    """Path of the raw chunk file of CSR array ``name`` inside a shard (zarr v3, one chunk)."""
    if name not in ARRAY_NAMES:
        raise ValueError(f"unknown CSR array {name!r}; expected one of {ARRAY_NAMES}")
    return f"X/{name}/c/0"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB pieces (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of an in-memory buffer."""
    return hashlib.sha256(data).hexdigest()


def _check_relpath(path: str, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what}: path must be a non-empty string, found {path!r}")
    norm = posixpath.normpath(path)
    if path.startswith(("/", "\\")) or ":" in path or norm.startswith("..") or "\\" in path:
        raise ManifestError(
            f"{what}: path {path!r} must be relative and stay inside the dataset directory"
        )
    return path


def _req(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise ManifestError(f"{what}: missing required key {key!r}")
    value = d[key]
    if typ is int and isinstance(value, bool):
        raise ManifestError(f"{what}: {key!r} must be int, found bool")
    if not isinstance(value, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ManifestError(f"{what}: {key!r} must be {names}, found {type(value).__name__}")
    return value


def _nonneg(value: int, key: str, what: str) -> int:
    if value < 0:
        raise ManifestError(f"{what}: {key!r} must be >= 0, found {value}")
    return value


@dataclass(frozen=True, kw_only=True)
class ArrayEntry:
    """One raw CSR array file of a shard: relative path, byte count, sha256, dtype."""

    path: str
    nbytes: int
    sha256: str
    dtype: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str) -> ArrayEntry:
        """Parse and validate one array entry."""
        return cls(
            path=_check_relpath(_req(d, "path", str, what), what),
            nbytes=_nonneg(_req(d, "nbytes", int, what), "nbytes", what),
            sha256=_req(d, "sha256", str, what),
            dtype=_req(d, "dtype", str, what),
        )


@dataclass(frozen=True, kw_only=True)
class OtherFiles:
    """One digest over every file of a shard other than its three CSR chunk files (zarr
    metadata, obs, var, ...): how many, their total bytes, and the sha256 of their listing
    (see :func:`other_files_digest`). O(1) per shard in the manifest."""

    n_files: int
    nbytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str) -> OtherFiles:
        """Parse and validate the entry."""
        return cls(
            n_files=_nonneg(_req(d, "n_files", int, what), "n_files", what),
            nbytes=_nonneg(_req(d, "nbytes", int, what), "nbytes", what),
            sha256=_req(d, "sha256", str, what),
        )


def other_files_digest(shard_dir: str | os.PathLike[str]) -> OtherFiles:
    """Digest of every regular file under ``shard_dir`` except the three CSR chunk files:
    sha256 over the lines ``<relative posix path>\t<size>\t<sha256 of the file>\n`` in
    sorted path order. Any change to obs, var or zarr metadata changes it."""
    root = Path(shard_dir)
    skip = {shard_array_relpath(n) for n in ARRAY_NAMES}
    lines = []
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            f = Path(dirpath) / name
            rel = f.relative_to(root).as_posix()
            if rel in skip:
                continue
            size = f.stat().st_size
            total += size
            lines.append(f"{rel}\t{size}\t{sha256_file(f)}\n")
    lines.sort()
    return OtherFiles(n_files=len(lines), nbytes=total,
                      sha256=hashlib.sha256("".join(lines).encode("utf-8")).hexdigest())


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    """One shard: its relative path, cell and non-zero counts, and its three CSR arrays."""

    path: str
    n_cells: int
    nnz: int
    arrays: Mapping[str, ArrayEntry]
    other_files: OtherFiles | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], i: int) -> ShardEntry:
        """Parse and validate one shard entry (``i`` is its position, for messages)."""
        what = f"manifest shards[{i}]"
        arrays_raw = _req(d, "arrays", dict, what)
        missing = [n for n in ARRAY_NAMES if n not in arrays_raw]
        if missing:
            raise ManifestError(f"{what}: arrays {missing} missing; expected {list(ARRAY_NAMES)}")
        arrays = {n: ArrayEntry.from_dict(arrays_raw[n], f"{what}.arrays.{n}") for n in ARRAY_NAMES}
        entry = cls(
            path=_check_relpath(_req(d, "path", str, what), what),
            n_cells=_nonneg(_req(d, "n_cells", int, what), "n_cells", what),
            nnz=_nonneg(_req(d, "nnz", int, what), "nnz", what),
            arrays=arrays,
            other_files=(OtherFiles.from_dict(d["other_files"], f"{what}.other_files")
                         if "other_files" in d else None),
        )
        return entry

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (fixed key order)."""
        out: dict[str, Any] = {
            "path": self.path,
            "n_cells": self.n_cells,
            "nnz": self.nnz,
            "arrays": {n: asdict(a) for n, a in self.arrays.items()},
        }
        if self.other_files is not None:
            out["other_files"] = asdict(self.other_files)
        return out


@dataclass(frozen=True, kw_only=True)
class SourceEntry:
    """One input the dataset was built from and how it was aligned to the vocabulary."""

    path: str
    kind: str
    n_cells: int
    n_genes: int
    genes_matched: int
    genes_dropped: int
    size: int | None = None
    sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], i: int) -> SourceEntry:
        """Parse and validate one source entry."""
        what = f"manifest sources[{i}]"
        known = {"path", "kind", "n_cells", "n_genes", "genes_matched", "genes_dropped", "size", "sha256"}
        return cls(
            path=_req(d, "path", str, what),
            kind=_req(d, "kind", str, what),
            n_cells=_nonneg(_req(d, "n_cells", int, what), "n_cells", what),
            n_genes=_nonneg(_req(d, "n_genes", int, what), "n_genes", what),
            genes_matched=_nonneg(_req(d, "genes_matched", int, what), "genes_matched", what),
            genes_dropped=_nonneg(_req(d, "genes_dropped", int, what), "genes_dropped", what),
            size=d.get("size"),
            sha256=d.get("sha256"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``extra`` keys are flattened into the entry."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out


@dataclass(frozen=True, kw_only=True)
class ObsColumn:
    """A categorical obs column kept in every shard, with its dataset-wide categories."""

    name: str
    categories: Sequence[str]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], i: int) -> ObsColumn:
        """Parse and validate one obs column entry."""
        what = f"manifest obs_columns[{i}]"
        cats = _req(d, "categories", list, what)
        if not all(isinstance(c, str) for c in cats):
            raise ManifestError(f"{what}: categories must all be strings")
        return cls(name=_req(d, "name", str, what), categories=tuple(cats))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The manifest of a dataset directory (format v1). See ``docs/format.md``."""

    dataset_id: str
    n_cells: int
    n_genes: int
    nnz: int
    dtype: str
    vocab: Mapping[str, Any]
    preprocessing: Mapping[str, Any]
    sources: Sequence[SourceEntry]
    obs_columns: Sequence[ObsColumn]
    shuffle: Mapping[str, Any]
    shards: Sequence[ShardEntry]
    cell_stats: Sequence[str] = ()
    layout: str = LAYOUT_RAW
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = ""

    def __post_init__(self) -> None:
        if self.format != FORMAT_NAME:
            raise FormatVersionError(
                f"manifest format is {self.format!r}; expected {FORMAT_NAME!r}"
            )
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatVersionError(
                f"manifest format_version is {self.format_version}; this scmf_loader reads "
                f"format_version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. "
                "Upgrade scmodelforge-data or re-convert the dataset."
            )
        if self.layout not in SUPPORTED_LAYOUTS:
            raise FormatVersionError(
                f"manifest layout is {self.layout!r}; supported layouts: {SUPPORTED_LAYOUTS}"
            )
        if self.dtype not in VALUE_DTYPES:
            raise ManifestError(f"manifest dtype {self.dtype!r} not one of {VALUE_DTYPES}")
        total_cells = sum(s.n_cells for s in self.shards)
        total_nnz = sum(s.nnz for s in self.shards)
        if total_cells != self.n_cells:
            raise ManifestError(
                f"manifest n_cells is {self.n_cells} but its shards hold {total_cells} cells"
            )
        if total_nnz != self.nnz:
            raise ManifestError(f"manifest nnz is {self.nnz} but its shards hold {total_nnz}")
        if len({s.path for s in self.shards}) != len(self.shards):
            raise ManifestError("manifest lists the same shard path twice")

    @property
    def obs_column_names(self) -> tuple[str, ...]:
        """Names of the categorical obs columns, in manifest order."""
        return tuple(c.name for c in self.obs_columns)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with keys in a fixed order (deterministic bytes)."""
        return {
            "format": self.format,
            "format_version": self.format_version,
            "dataset_id": self.dataset_id,
            "created_by": self.created_by,
            "layout": self.layout,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "nnz": self.nnz,
            "dtype": self.dtype,
            "vocab": dict(self.vocab),
            "preprocessing": dict(self.preprocessing),
            "sources": [s.to_dict() for s in self.sources],
            "obs_columns": [{"name": c.name, "categories": list(c.categories)} for c in self.obs_columns],
            "cell_stats": list(self.cell_stats),
            "shuffle": dict(self.shuffle),
            "shards": [s.to_dict() for s in self.shards],
        }


def manifest_from_dict(d: Mapping[str, Any]) -> Manifest:
    """Build a :class:`Manifest` from parsed JSON, checking format and version first."""
    what = "manifest"
    if not isinstance(d, Mapping):
        raise ManifestError(f"manifest must be a JSON object, found {type(d).__name__}")
    fmt = d.get("format")
    if fmt != FORMAT_NAME:
        raise FormatVersionError(f"manifest format is {fmt!r}; expected {FORMAT_NAME!r}")
    version = d.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise FormatVersionError(
            f"manifest format_version is {version!r}; this scmf_loader reads format_version "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. Upgrade scmodelforge-data or "
            "re-convert the dataset."
        )
    vocab = _req(d, "vocab", dict, what)
    _check_relpath(_req(vocab, "path", str, "manifest vocab"), "manifest vocab")
    return Manifest(
        format=fmt,
        format_version=version,
        dataset_id=_req(d, "dataset_id", str, what),
        created_by=d.get("created_by", ""),
        layout=d.get("layout", LAYOUT_RAW),
        n_cells=_nonneg(_req(d, "n_cells", int, what), "n_cells", what),
        n_genes=_nonneg(_req(d, "n_genes", int, what), "n_genes", what),
        nnz=_nonneg(_req(d, "nnz", int, what), "nnz", what),
        dtype=_req(d, "dtype", str, what),
        vocab=vocab,
        preprocessing=_req(d, "preprocessing", dict, what),
        sources=[SourceEntry.from_dict(s, i) for i, s in enumerate(_req(d, "sources", list, what))],
        obs_columns=[ObsColumn.from_dict(c, i) for i, c in enumerate(_req(d, "obs_columns", list, what))],
        cell_stats=tuple(d.get("cell_stats", ())),
        shuffle=_req(d, "shuffle", dict, what),
        shards=[ShardEntry.from_dict(s, i) for i, s in enumerate(_req(d, "shards", list, what))],
    )


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``DIR/manifest.json``.

    Raises :class:`ManifestNotFoundError` when the directory has no manifest (not a dataset,
    or a conversion that did not finish), :class:`FormatVersionError` for an unknown format
    or version, and :class:`ManifestError` for anything malformed; each names the file.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        if not Path(directory).exists():
            raise ManifestNotFoundError(f"{directory}: no such dataset directory")
        raise ManifestNotFoundError(
            f"{path}: no manifest; {directory} is not a complete scmf dataset "
            "(a conversion that did not finish leaves no manifest; re-run it)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return manifest_from_dict(raw)
    except ManifestError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def manifest_bytes(manifest: Manifest) -> bytes:
    """The exact bytes :func:`write_manifest` writes (sorted-free, fixed key order, UTF-8)."""
    return (json.dumps(manifest.to_dict(), indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(
    directory: str | os.PathLike[str],
    manifest: Manifest,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Write ``DIR/manifest.json`` atomically (temporary file, fsync, rename).
    ``before_rename`` is called once the temporary file is complete (a crash-test hook)."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(manifest_bytes(manifest))
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    return path


def compute_dataset_id(definition: Mapping[str, Any]) -> str:
    """Content hash of what defines a dataset (sources' checksums, vocabulary hash, options,
    format version) — never paths or times. Same definition, same id."""
    blob = json.dumps(
        {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **definition},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return "sha256:" + hashlib.sha256(blob.encode("ascii")).hexdigest()
