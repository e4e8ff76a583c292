"""The manifest of a dataset directory: its schema, ONE version check, reading and writing.

A dataset directory holds ``manifest.json`` (this module's :class:`Manifest`), ``vocab.json``
(a :class:`~scmf_loader.vocab.GeneVocab`) and ``shards/NNNNNN.zarr`` (the layout of
:mod:`scmf_loader.format.shard`). ``docs/format.md`` is the prose spec; writers build a
:class:`Manifest` and call :func:`write_manifest`; readers call :func:`read_manifest`, which
rejects anything it does not understand with a clear message. JSON only: nothing is ever
unpickled or evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scmf_loader.errors import (
    FormatVersionError,
    ManifestError,
    ManifestNotFoundError,
)
from scmf_loader.format._common import check_type, nonneg, req
from scmf_loader.format.sections import PreprocessingSection, ShuffleSection, VocabSection
from scmf_loader.format.shard import ShardEntry

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT_RAW",
    "MANIFEST_NAME",
    "SUPPORTED_FORMAT_VERSIONS",
    "SUPPORTED_LAYOUTS",
    "VALUE_DTYPES",
    "VOCAB_NAME",
    "Manifest",
    "ObsColumn",
    "SourceEntry",
    "check_format_version",
    "compute_dataset_id",
    "manifest_bytes",
    "manifest_from_dict",
    "read_manifest",
    "write_manifest",
]

FORMAT_NAME = "scmf-shards"
FORMAT_VERSION = 2  # v2: shard arrays checksummed with xxh3_128 (v1: sha256)
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
LAYOUT_RAW = "raw"
SUPPORTED_LAYOUTS = (LAYOUT_RAW,)
VALUE_DTYPES = ("float32", "float64", "int32", "uint16", "uint32")  # scipy.sparse (and so
# anndata) cannot hold float16


def check_format_version(fmt: Any, version: Any, layout: Any = LAYOUT_RAW) -> None:
    """THE version check: ``format``, ``format_version`` and ``layout`` must be ones this
    code reads, else :class:`FormatVersionError` naming what was found and what is read."""
    if fmt != FORMAT_NAME:
        raise FormatVersionError(f"manifest format is {fmt!r}; expected {FORMAT_NAME!r}")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise FormatVersionError(
            f"manifest format_version is {version!r}; this scmf_loader reads format_version "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. Upgrade scmodelforge-data or "
            "re-convert the dataset."
        )
    if layout not in SUPPORTED_LAYOUTS:
        raise FormatVersionError(
            f"manifest layout is {layout!r}; supported layouts: {SUPPORTED_LAYOUTS}"
        )


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
            path=req(d, "path", str, what),
            kind=req(d, "kind", str, what),
            n_cells=nonneg(req(d, "n_cells", int, what), "n_cells", what),
            n_genes=nonneg(req(d, "n_genes", int, what), "n_genes", what),
            genes_matched=nonneg(req(d, "genes_matched", int, what), "genes_matched", what),
            genes_dropped=nonneg(req(d, "genes_dropped", int, what), "genes_dropped", what),
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
        cats = req(d, "categories", list, what)
        if not all(isinstance(c, str) for c in cats):
            raise ManifestError(f"{what}: categories must all be strings")
        return cls(name=req(d, "name", str, what), categories=tuple(cats))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The manifest of a dataset directory (format v1). See ``docs/format.md``."""

    dataset_id: str
    n_cells: int
    n_genes: int
    nnz: int
    dtype: str
    vocab: VocabSection | Mapping[str, Any]
    preprocessing: PreprocessingSection | Mapping[str, Any]
    sources: Sequence[SourceEntry]
    obs_columns: Sequence[ObsColumn]
    shuffle: ShuffleSection | Mapping[str, Any]
    shards: Sequence[ShardEntry]
    cell_stats: Sequence[str] = ()
    layout: str = LAYOUT_RAW
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    #: an appended version's parent (``dataset_id``, ``location``, ``n_shards``, ``link``)
    parent: Mapping[str, Any] | None = None
    #: every version of the chain, oldest first (``dataset_id``, ``n_cells``, ``n_shards``, ``sources``)
    lineage: Sequence[Mapping[str, Any]] | None = None
    #: per source name, the parsed perturbation metadata's summary (``--perturbation``)
    perturbation: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        check_format_version(self.format, self.format_version, self.layout)
        # the sections are typed: a plain dict given by a writer becomes one (validated)
        object.__setattr__(self, "vocab", VocabSection(self.vocab))
        object.__setattr__(self, "preprocessing", PreprocessingSection(self.preprocessing))
        object.__setattr__(self, "shuffle", ShuffleSection(self.shuffle))
        if not all(isinstance(c, str) for c in self.cell_stats):
            raise ManifestError(f"manifest cell_stats must be strings, found {list(self.cell_stats)!r}")
        names = [c.name for c in self.obs_columns]
        if len(set(names)) != len(names):
            raise ManifestError(f"manifest obs_columns names a column twice: {names}")
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
        head = {
            "format": self.format,
            "format_version": self.format_version,
            "dataset_id": self.dataset_id,
            "created_by": self.created_by,
        }
        if self.parent is not None:
            head["parent"] = dict(self.parent)
        if self.lineage is not None:
            head["lineage"] = [dict(v) for v in self.lineage]
        return head | {
            "layout": self.layout,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "nnz": self.nnz,
            "dtype": self.dtype,
            "vocab": dict(self.vocab),
            "preprocessing": dict(self.preprocessing),
            "sources": [s.to_dict() for s in self.sources],
            **({"perturbation": dict(self.perturbation)} if self.perturbation is not None else {}),
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
    fmt, version = d.get("format"), d.get("format_version")
    check_format_version(fmt, version, d.get("layout", LAYOUT_RAW))  # before anything else
    return Manifest(
        format=fmt,
        format_version=version,
        dataset_id=req(d, "dataset_id", str, what),
        created_by=d.get("created_by", ""),
        layout=d.get("layout", LAYOUT_RAW),
        n_cells=nonneg(req(d, "n_cells", int, what), "n_cells", what),
        n_genes=nonneg(req(d, "n_genes", int, what), "n_genes", what),
        nnz=nonneg(req(d, "nnz", int, what), "nnz", what),
        dtype=req(d, "dtype", str, what),
        vocab=req(d, "vocab", dict, what),
        preprocessing=req(d, "preprocessing", dict, what),
        sources=[SourceEntry.from_dict(s, i) for i, s in enumerate(req(d, "sources", list, what))],
        obs_columns=[ObsColumn.from_dict(c, i) for i, c in enumerate(req(d, "obs_columns", list, what))],
        cell_stats=tuple(check_type(d.get("cell_stats", []), list, "cell_stats", what)),
        shuffle=req(d, "shuffle", dict, what),
        shards=[ShardEntry.from_dict(s, i) for i, s in enumerate(req(d, "shards", list, what))],
        parent=check_type(d["parent"], dict, "parent", what) if d.get("parent") is not None else None,
        lineage=check_type(d["lineage"], list, "lineage", what) if d.get("lineage") is not None else None,
        perturbation=(check_type(d["perturbation"], dict, "perturbation", what)
                      if d.get("perturbation") is not None else None),
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
