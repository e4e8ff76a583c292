"""The shard layout: one AnnData-compatible Zarr v3 group per shard, CSR arrays as raw chunks.

Everything that knows where a shard keeps what lives here, reader and writer side by side:

- the names, paths and dtypes of the CSR arrays and the ``X`` encoding attributes
  (``encoding-type``/``encoding-version``, defined once: :data:`X_ENCODING`);
- the shard's manifest entry (:class:`ShardEntry`, :class:`ArrayEntry`, :class:`OtherFiles`);
- the reader: :func:`map_csr` maps the raw chunk files copy-on-write, :func:`read_x_metadata`
  reads the zarr metadata, ``read_obs_*`` read the obs columns;
- the writer lives next door, in :mod:`scmf_loader.format.writer` (a complete shard group:
  ``X`` ourselves, obs and var through anndata; and the manifest entry of what was written).

``docs/format.md`` section 3 is the prose spec of this layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scmf_loader.errors import ManifestError, ShardCorruptError, ShardNotFoundError, ShardSizeError
from scmf_loader.format._common import (
    CHECKSUM_ALGORITHMS,
    check_relpath,
    nonneg,
    req,
    sha256_file,
)
from scmf_loader.format._plain import read_plain_array

__all__ = [
    "ARRAY_NAMES",
    "INDEX_DTYPE",
    "INDPTR_DTYPE",
    "OBS_INDEX_DEFAULT",
    "SHARDS_DIR",
    "X_ENCODING",
    "ArrayEntry",
    "OtherFiles",
    "ShardArrays",
    "ShardEntry",
    "array_dtypes",
    "array_nbytes",
    "map_csr",
    "other_files_digest",
    "read_obs_codes",
    "read_obs_index",
    "read_obs_values",
    "read_x_metadata",
    "shard_array_relpath",
    "shard_relpath",
]

SHARDS_DIR = "shards"
ARRAY_NAMES = ("data", "indices", "indptr")
INDEX_DTYPE = "int32"
INDPTR_DTYPE = "int64"
#: attributes of the ``X`` group (AnnData's on-disk spec for a CSR matrix)
X_ENCODING: Mapping[str, str] = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
#: name of obs's index column when ``obs.attrs["_index"]`` does not say
OBS_INDEX_DEFAULT = "_index"


def shard_relpath(index: int) -> str:
    """Relative path of shard ``index`` inside a dataset directory (``shards/000007.zarr``)."""
    return f"{SHARDS_DIR}/{index:06d}.zarr"


def shard_array_relpath(name: str) -> str:
    """Path of the raw chunk file of CSR array ``name`` inside a shard (zarr v3, one chunk)."""
    if name not in ARRAY_NAMES:
        raise ValueError(f"unknown CSR array {name!r}; expected one of {ARRAY_NAMES}")
    return f"X/{name}/c/0"


def array_dtypes(value_dtype: str) -> dict[str, str]:
    """The dtype of each CSR array for a dataset whose values are ``value_dtype``."""
    return {"data": value_dtype, "indices": INDEX_DTYPE, "indptr": INDPTR_DTYPE}


def array_nbytes(n_cells: int, nnz: int, value_dtype: str) -> dict[str, int]:
    """The exact byte count of each CSR array of a shard of ``n_cells`` and ``nnz``."""
    return {
        "data": nnz * np.dtype(value_dtype).itemsize,
        "indices": nnz * np.dtype(INDEX_DTYPE).itemsize,
        "indptr": (n_cells + 1) * np.dtype(INDPTR_DTYPE).itemsize,
    }


# ---- the shard's manifest entry ------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ArrayEntry:
    """One raw CSR array file of a shard: relative path, byte count, dtype and its checksum
    (at least one of :data:`CHECKSUM_ALGORITHMS`: ``sha256`` in format v1, ``xxh3_128`` in
    format v2; every one present is checked)."""

    path: str
    nbytes: int
    sha256: str | None = None
    xxh3_128: str | None = None
    dtype: str

    def __post_init__(self) -> None:
        if not self.checksums:
            raise ManifestError(f"array {self.path}: no checksum; expected one of {list(CHECKSUM_ALGORITHMS)}")

    @property
    def checksums(self) -> dict[str, str]:
        """``{algorithm: hex digest}`` of every checksum this entry carries."""
        return {a: getattr(self, a) for a in CHECKSUM_ALGORITHMS if getattr(self, a) is not None}

    @property
    def digest(self) -> str:
        """The entry's content identity, ``"<algorithm>:<hex>"`` (the strongest it carries:
        a shard array's bytes are the same iff their digests are)."""
        algorithm, value = next(iter(self.checksums.items()))
        return f"{algorithm}:{value}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str) -> ArrayEntry:
        """Parse and validate one array entry."""
        sums = {a: req(d, a, str, what) for a in CHECKSUM_ALGORITHMS if a in d}
        if not sums:
            raise ManifestError(f"{what}: no checksum; expected a key among {list(CHECKSUM_ALGORITHMS)}")
        return cls(
            path=check_relpath(req(d, "path", str, what), what),
            nbytes=nonneg(req(d, "nbytes", int, what), "nbytes", what),
            dtype=req(d, "dtype", str, what),
            **sums,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (fixed key order; absent checksums left out)."""
        return {"path": self.path, "nbytes": self.nbytes, **self.checksums, "dtype": self.dtype}


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
            n_files=nonneg(req(d, "n_files", int, what), "n_files", what),
            nbytes=nonneg(req(d, "nbytes", int, what), "nbytes", what),
            sha256=req(d, "sha256", str, what),
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
        arrays_raw = req(d, "arrays", dict, what)
        missing = [n for n in ARRAY_NAMES if n not in arrays_raw]
        if missing:
            raise ManifestError(f"{what}: arrays {missing} missing; expected {list(ARRAY_NAMES)}")
        arrays = {n: ArrayEntry.from_dict(arrays_raw[n], f"{what}.arrays.{n}") for n in ARRAY_NAMES}
        return cls(
            path=check_relpath(req(d, "path", str, what), what),
            n_cells=nonneg(req(d, "n_cells", int, what), "n_cells", what),
            nnz=nonneg(req(d, "nnz", int, what), "nnz", what),
            arrays=arrays,
            other_files=(OtherFiles.from_dict(d["other_files"], f"{what}.other_files")
                         if "other_files" in d else None),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (fixed key order)."""
        out: dict[str, Any] = {
            "path": self.path,
            "n_cells": self.n_cells,
            "nnz": self.nnz,
            "arrays": {n: a.to_dict() for n, a in self.arrays.items()},
        }
        if self.other_files is not None:
            out["other_files"] = asdict(self.other_files)
        return out


# ---- reader ----------------------------------------------------------------------------------
class ShardArrays(NamedTuple):
    """The CSR arrays of one shard: read-only views of its memory-mapped chunk files."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def _map_one(f: Path, dtype: str, nbytes: int) -> np.ndarray:
    if nbytes == 0:
        return np.empty(0, dtype=dtype)
    try:
        # Copy-on-write (MAP_PRIVATE): reads stay zero copy, and an in-place write through a
        # torch view (torch ignores numpy's read-only flag) copies only the touched pages of
        # this process instead of crashing on a read-only map; the file never changes.
        mm = np.memmap(f, dtype=dtype, mode="c", shape=(nbytes // np.dtype(dtype).itemsize,))
    except FileNotFoundError:
        raise ShardNotFoundError(f"{f}: shard array file is missing (listed in the manifest)") from None
    except ValueError as exc:  # file shorter than the requested shape
        raise ShardSizeError(f"{f}: shorter than the {nbytes} bytes the manifest says ({exc})") from None
    view = mm.view(np.ndarray)  # plain ndarray: slicing is ~20x cheaper than on np.memmap
    view.flags.writeable = False  # numpy users get an error, not a silent private copy
    return view


def map_csr(shard_dir: str | os.PathLike[str], entry: ShardEntry, value_dtype: str) -> ShardArrays:
    """Memory-map the three CSR chunk files of a shard (one file descriptor each, held by
    the returned arrays). Raises ShardNotFoundError or ShardSizeError naming the file."""
    root = Path(shard_dir)
    dtypes = array_dtypes(value_dtype)
    arrays = {n: _map_one(root / entry.arrays[n].path, dtypes[n], entry.arrays[n].nbytes)
              for n in ARRAY_NAMES}
    return ShardArrays(indptr=arrays["indptr"], indices=arrays["indices"], data=arrays["data"])


def read_x_metadata(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The zarr metadata of ``X`` as plain JSON: ``{"X": <X/zarr.json>, "data": ..., ...}``
    (a few small files; no zarr import). Raises ShardCorruptError when one is missing or
    is not JSON."""
    root = Path(shard_dir)
    out = {}
    for key, rel in (("X", "X/zarr.json"), *((n, f"X/{n}/zarr.json") for n in ARRAY_NAMES)):
        f = root / rel
        try:
            out[key] = json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ShardCorruptError(f"{f}: zarr metadata of the shard's X is missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardCorruptError(f"{f}: zarr metadata is not valid JSON ({exc})") from None
    return out


def _read_obs_member(shard_dir: Path, get: Callable[[Any], Any], what: str, plain: str | None = None) -> np.ndarray:
    """An obs member: ``plain`` (its path under ``obs``) read without zarr where
    :func:`read_plain_array` can, else ``get(obs group)`` through zarr."""
    if plain is not None:
        found = read_plain_array(shard_dir / "obs" / plain)
        if found is not None:
            return found
    import zarr  # imported lazily: only obs reads zarr-free code cannot do need it

    try:
        group = zarr.open_group(str(shard_dir), mode="r")
    except FileNotFoundError:
        raise ShardNotFoundError(f"{shard_dir}: shard is missing") from None
    try:
        return np.asarray(get(group["obs"]))
    except KeyError:
        raise ShardCorruptError(
            f"{shard_dir}: obs has no {what}, which the manifest lists; the shard is corrupt "
            "or from another dataset: re-copy or re-convert"
        ) from None


def read_obs_codes(shard_dir: str | os.PathLike[str], column: str) -> np.ndarray:
    """The categorical codes of obs ``column`` (``obs/<column>/codes``), stored dtype."""
    return _read_obs_member(Path(shard_dir), lambda obs: obs[column]["codes"][...], f"column {column!r}",
                            f"{column}/codes")


def read_obs_values(shard_dir: str | os.PathLike[str], name: str) -> np.ndarray:
    """The numeric obs column ``name`` (``obs/<name>``), e.g. a per-cell statistic."""
    return _read_obs_member(Path(shard_dir), lambda obs: obs[name][...], f"column {name!r}", name)


def read_obs_index(shard_dir: str | os.PathLike[str]) -> np.ndarray:
    """The obs index (the original cell ids)."""
    return _read_obs_member(
        Path(shard_dir), lambda obs: obs[obs.attrs.get("_index", OBS_INDEX_DEFAULT)][...], "index"
    )
