"""The shard layout: one AnnData-compatible Zarr v3 group per shard, CSR arrays as raw chunks.

Everything that knows where a shard keeps what lives here, reader and writer side by side:

- the names, paths and dtypes of the CSR arrays and the ``X`` encoding attributes
  (``encoding-type``/``encoding-version``, defined once: :data:`X_ENCODING`);
- the shard's manifest entry (:class:`ShardEntry`, :class:`ArrayEntry`, :class:`OtherFiles`);
- the reader: :func:`map_csr` maps the raw chunk files copy-on-write, :func:`read_x_metadata`
  reads the zarr metadata, ``read_obs_*`` read the obs columns;
- the writer: :func:`write_shard_files` writes a complete shard group (``X`` ourselves, obs and
  var through anndata, imported lazily) and :func:`shard_entry` describes what was written.

``docs/format.md`` section 3 is the prose spec of this layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scmf_loader.errors import ManifestError, ShardCorruptError, ShardNotFoundError, ShardSizeError
from scmf_loader.format._common import (
    CHECKSUM_ALGORITHMS,
    buffer_checksum,
    check_relpath,
    nonneg,
    req,
    sha256_file,
)

__all__ = [
    "ARRAY_CHECKSUM",
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
    "array_checksum",
    "array_dtypes",
    "array_nbytes",
    "csr_arrays",
    "map_csr",
    "other_files_digest",
    "read_obs_codes",
    "read_obs_index",
    "read_obs_values",
    "read_x_metadata",
    "shard_array_relpath",
    "shard_entry",
    "shard_relpath",
    "write_shard_files",
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


def _read_obs_member(shard_dir: Path, get: Callable[[Any], Any], what: str) -> np.ndarray:
    import zarr  # imported lazily: only obs reads need it

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
    return _read_obs_member(Path(shard_dir), lambda obs: obs[column]["codes"][...], f"column {column!r}")


def read_obs_values(shard_dir: str | os.PathLike[str], name: str) -> np.ndarray:
    """The numeric obs column ``name`` (``obs/<name>``), e.g. a per-cell statistic."""
    return _read_obs_member(Path(shard_dir), lambda obs: obs[name][...], f"column {name!r}")


def read_obs_index(shard_dir: str | os.PathLike[str]) -> np.ndarray:
    """The obs index (the original cell ids)."""
    return _read_obs_member(
        Path(shard_dir), lambda obs: obs[obs.attrs.get("_index", OBS_INDEX_DEFAULT)][...], "index"
    )


# ---- writer ----------------------------------------------------------------------------------
def _little_endian(values: np.ndarray, dtype: Any = None) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=dtype)
    if values.dtype.byteorder == ">" or (values.dtype.byteorder == "=" and not np.little_endian):
        values = values.astype(values.dtype.newbyteorder("<"))
    return values


def csr_arrays(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> ShardArrays:
    """The three CSR arrays as the format stores them: ``indptr`` int64, ``indices`` int32,
    ``data`` as given; contiguous and little-endian (the bytes of the chunk files)."""
    return ShardArrays(indptr=_little_endian(indptr, INDPTR_DTYPE),
                       indices=_little_endian(indices, INDEX_DTYPE), data=_little_endian(data))


def _write_raw_array(group: Any, root: Path, name: str, values: np.ndarray) -> None:
    """Create a one-chunk, uncompressed zarr v3 array and write its chunk file directly.

    The chunk file of such an array is exactly the array's little-endian bytes (the format's
    ``raw`` layout); writing it ourselves avoids zarr's codec pipeline, which was ~6x slower
    than a plain file write for large arrays."""
    values = _little_endian(values)
    group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        chunks=values.shape if values.size else (1,),
        compressors=None,
        filters=None,
        fill_value=0,
    )
    if values.size:
        chunk = root / shard_array_relpath(name)
        chunk.parent.mkdir(parents=True, exist_ok=True)
        with open(chunk, "wb") as f:
            f.write(memoryview(values).cast("B"))


def _write_x(store: Any, root: Path, arrays: ShardArrays, n_genes: int) -> None:
    """The ``X`` group: encoding attributes and the three raw CSR arrays."""
    g = store.create_group("X")
    g.attrs.update({**X_ENCODING, "shape": [len(arrays.indptr) - 1, n_genes]})
    _write_raw_array(g, root, "data", arrays.data)
    _write_raw_array(g, root, "indices", arrays.indices)
    _write_raw_array(g, root, "indptr", arrays.indptr)


def _obs_frame(cell_ids: np.ndarray, obs_codes: Mapping[str, np.ndarray],
               obs_categories: Mapping[str, Sequence[str]],
               numeric_obs: Mapping[str, np.ndarray] | None) -> Any:
    """obs as a pandas DataFrame: the cell ids as index, one categorical per kept column
    (codes index the dataset-wide categories), one float column per cell statistic."""
    import pandas as pd

    obs = pd.DataFrame(
        {
            name: pd.Categorical.from_codes(np.asarray(codes), categories=list(obs_categories[name]))
            for name, codes in obs_codes.items()
        },
        index=pd.Index(np.asarray(cell_ids, dtype=object).astype(str), name=None),
    )
    for name, values in (numeric_obs or {}).items():
        obs[name] = np.asarray(values)
    return obs


@dataclass(frozen=True)
class ShardContent:
    """Everything one shard holds, as the writer takes it: the CSR arrays (rows are cells,
    ``indices`` vocabulary ids), the vocabulary size and tokens (``var_names``), the
    original cell ids, categorical obs (codes and categories per column), numeric per-cell
    columns (``numeric_obs``, e.g. ``library_size``) and numeric per-gene columns
    (``var_columns``, one value per token, e.g. ``nonzero_median``)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    n_genes: int
    cell_ids: np.ndarray
    obs_codes: Mapping[str, np.ndarray]
    obs_categories: Mapping[str, Sequence[str]]
    var_names: Sequence[str]
    numeric_obs: Mapping[str, np.ndarray] | None = None
    var_columns: Mapping[str, np.ndarray] | None = None


def write_shard_files(
    path: str | os.PathLike[str],
    arrays: ShardArrays,
    content: ShardContent,
    after_x: Callable[[], None] | None = None,
) -> None:
    """Write one complete shard group at ``path`` (which must not exist; callers write to a
    temporary name and rename). ``X`` is written by us as raw chunks inside anndata's
    ``write_dispatched`` so obs and var are anndata's own encoding; ``after_x`` is called
    once ``X`` is on disk. ``arrays`` come from :func:`csr_arrays`."""
    import warnings

    import anndata as ad
    import scipy.sparse as sp
    import zarr
    from anndata.experimental import write_dispatched

    root = Path(path)
    n_cells = len(arrays.indptr) - 1
    n_genes = content.n_genes
    obs = _obs_frame(content.cell_ids, content.obs_codes, content.obs_categories, content.numeric_obs)
    placeholder = sp.csr_matrix((n_cells, n_genes), dtype=arrays.data.dtype)
    var = _var_frame(content.var_names)
    for name, values in (content.var_columns or {}).items():
        var[name] = np.asarray(values)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not unique.*")
        adata = ad.AnnData(X=placeholder, obs=obs, var=var)

    def callback(func: Any, store: Any, elem_name: str, elem: Any, *, iospec: Any, dataset_kwargs: Any) -> None:
        if elem_name in ("/X", "X") and store.path in ("", "/"):
            _write_x(store, root, arrays, n_genes)
            if after_x is not None:
                after_x()
            return
        # no sharding codec for obs/var (what anndata would otherwise warn about, per thread)
        func(store, elem_name, elem, dataset_kwargs={**dataset_kwargs, "shards": None})

    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(str(root), mode="w", zarr_format=3)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            write_dispatched(group, "/", adata, callback=callback)


def _var_frame(names: Sequence[str]) -> Any:
    """var as a pandas DataFrame: the vocabulary tokens as index, no columns."""
    import pandas as pd

    return pd.DataFrame(index=pd.Index(list(names)))


#: the checksum the writer records for each CSR array (format v2)
ARRAY_CHECKSUM = "xxh3_128"


def array_checksum(a: np.ndarray, algorithm: str = ARRAY_CHECKSUM) -> str:
    """Hex digest of an in-memory array's bytes (what its raw chunk file holds)."""
    return buffer_checksum(memoryview(np.ascontiguousarray(a)).cast("B"), algorithm)


def shard_entry(path: str | os.PathLike[str], relpath: str, arrays: ShardArrays,
                checksums: Mapping[str, str] | None = None) -> ShardEntry:
    """The manifest entry of the shard just written at ``path`` from ``arrays``: byte counts
    and :data:`ARRAY_CHECKSUM` digests of the in-memory arrays (no re-read; ``checksums``:
    digests already computed while the bytes were in cache, by array name), each checked
    against the file's size on disk, and the digest of every other file. ``relpath`` is its
    path in the dataset."""
    root = Path(path)
    entries = {}
    for name in ARRAY_NAMES:
        values = getattr(arrays, name)
        rel = shard_array_relpath(name)
        on_disk = (root / rel).stat().st_size if values.size else 0
        if on_disk != values.nbytes:
            raise ShardSizeError(f"{root / rel}: wrote {on_disk} bytes, expected {values.nbytes}")
        digest = (checksums or {}).get(name) or array_checksum(values)
        entries[name] = ArrayEntry(path=rel, nbytes=int(values.nbytes), dtype=str(values.dtype),
                                   **{ARRAY_CHECKSUM: digest})
    return ShardEntry(path=relpath, n_cells=len(arrays.indptr) - 1, nnz=int(arrays.indptr[-1]),
                      arrays=entries, other_files=other_files_digest(root))
