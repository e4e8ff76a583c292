"""The shard writer: a complete shard group as :mod:`scmf_loader.format.shard` lays it out
(``X`` as raw chunk files written by us, obs and var through anndata, imported lazily), and
:func:`shard_entry`, the manifest entry of what was written.

A CSR array is either held (a numpy array) or *streamed* (:class:`StreamedArray`: the
writer hands it the open chunk file and it writes its bytes in pieces, e.g. a shard's rows
gathered block by block from where they lie, and returns their checksum computed while the
bytes were in cache). Both give the same bytes. ``docs/format.md`` section 3 is the spec.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from scmf_loader.errors import ShardSizeError
from scmf_loader.format._common import buffer_checksum
from scmf_loader.format.shard import (
    ARRAY_NAMES,
    INDEX_DTYPE,
    INDPTR_DTYPE,
    X_ENCODING,
    ArrayEntry,
    ShardArrays,
    ShardEntry,
    other_files_digest,
    shard_array_relpath,
)

__all__ = [
    "ARRAY_CHECKSUM",
    "ShardContent",
    "StreamedArray",
    "array_checksum",
    "csr_arrays",
    "shard_entry",
    "write_shard_files",
]

#: the checksum the writer records for each CSR array (format v2)
ARRAY_CHECKSUM = "xxh3_128"


@dataclass(frozen=True)
class StreamedArray:
    """A 1-d array that is written rather than held: ``write(f)`` writes exactly ``size``
    items of ``dtype`` (little-endian) to the binary file ``f`` and returns the
    :data:`ARRAY_CHECKSUM` hex digest of those bytes."""

    dtype: np.dtype
    size: int
    write: Callable[[BinaryIO], str]

    @property
    def shape(self) -> tuple[int]:
        """``(size,)``, like a 1-d array's."""
        return (self.size,)

    @property
    def nbytes(self) -> int:
        """Bytes the chunk file holds."""
        return self.size * self.dtype.itemsize


def _little_endian(values: Any, dtype: Any = None) -> Any:
    if isinstance(values, StreamedArray):
        if np.dtype(dtype or values.dtype) != values.dtype or values.dtype.byteorder == ">":
            raise ValueError(f"a streamed array must be written as little-endian {dtype}, not {values.dtype}")
        return values
    values = np.ascontiguousarray(values, dtype=dtype)
    if values.dtype.byteorder == ">" or (values.dtype.byteorder == "=" and not np.little_endian):
        values = values.astype(values.dtype.newbyteorder("<"))
    return values


def csr_arrays(indptr: np.ndarray, indices: np.ndarray | StreamedArray,
               data: np.ndarray | StreamedArray) -> ShardArrays:
    """The three CSR arrays as the format stores them: ``indptr`` int64, ``indices`` int32,
    ``data`` as given; contiguous and little-endian (the bytes of the chunk files).
    ``indices`` and ``data`` may be :class:`StreamedArray` of those dtypes."""
    return ShardArrays(indptr=_little_endian(indptr, INDPTR_DTYPE),
                       indices=_little_endian(indices, INDEX_DTYPE), data=_little_endian(data))


def _create_raw_array(group: Any, name: str, values: Any) -> None:
    """The zarr v3 metadata of a one-chunk, uncompressed array (no chunk written: the chunk
    file of such an array is exactly the array's little-endian bytes, the format's ``raw``
    layout, and :func:`_write_chunk` writes it ourselves: zarr's codec pipeline was ~6x
    slower than a plain file write for large arrays)."""
    group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        chunks=values.shape if values.size else (1,),
        compressors=None,
        filters=None,
        fill_value=0,
    )


def _write_chunk(root: Path, name: str, values: Any) -> str | None:
    """Write the chunk file of CSR array ``name``; the digest of a streamed array, else None."""
    if not values.size:
        return None
    chunk = root / shard_array_relpath(name)
    chunk.parent.mkdir(parents=True, exist_ok=True)
    with open(chunk, "wb") as f:
        if isinstance(values, StreamedArray):
            return values.write(f)
        f.write(memoryview(values).cast("B"))
    return None


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
    ``indices`` vocabulary ids; ``indices`` and ``data`` held or :class:`StreamedArray`),
    the vocabulary size and tokens (``var_names``), the original cell ids, categorical obs
    (codes and categories per column), numeric per-cell columns (``numeric_obs``, e.g.
    ``library_size``) and numeric per-gene columns (``var_columns``, one value per token,
    e.g. ``nonzero_median``)."""

    data: np.ndarray | StreamedArray
    indices: np.ndarray | StreamedArray
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
    lock: contextlib.AbstractContextManager[Any] | None = None,
) -> dict[str, str]:
    """Write one complete shard group at ``path`` (which must not exist; callers write to a
    temporary name and rename): the group, obs, var and the ``X`` metadata through anndata's
    ``write_dispatched`` (under ``lock``, when given: anndata and zarr warnings are silenced
    with ``warnings.catch_warnings``, which is not thread-safe), then the raw chunk files of
    ``X`` outside the lock, so threads write shards in parallel. ``after_x`` is called once
    ``X`` is on disk. ``arrays`` come from :func:`csr_arrays`. Returns the digests the
    streamed arrays computed, by array name."""
    import warnings

    import anndata as ad
    import scipy.sparse as sp
    import zarr
    from anndata.experimental import write_dispatched

    root = Path(path)
    n_cells = len(arrays.indptr) - 1
    n_genes = content.n_genes

    def callback(func: Any, store: Any, elem_name: str, elem: Any, *, iospec: Any, dataset_kwargs: Any) -> None:
        if elem_name in ("/X", "X") and store.path in ("", "/"):
            g = store.create_group("X")
            g.attrs.update({**X_ENCODING, "shape": [n_cells, n_genes]})
            for name in ("data", "indices", "indptr"):
                _create_raw_array(g, name, getattr(arrays, name))
            return
        # no sharding codec for obs/var (what anndata would otherwise warn about, per thread)
        func(store, elem_name, elem, dataset_kwargs={**dataset_kwargs, "shards": None})

    with lock if lock is not None else contextlib.nullcontext():
        obs = _obs_frame(content.cell_ids, content.obs_codes, content.obs_categories, content.numeric_obs)
        placeholder = sp.csr_matrix((n_cells, n_genes), dtype=arrays.data.dtype)
        var = _var_frame(content.var_names)
        for name, values in (content.var_columns or {}).items():
            var[name] = np.asarray(values)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not unique.*")
            adata = ad.AnnData(X=placeholder, obs=obs, var=var)
        with zarr.config.set({"array.write_empty_chunks": True}):
            group = zarr.open_group(str(root), mode="w", zarr_format=3)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning)
                write_dispatched(group, "/", adata, callback=callback)
    digests = {}
    for name in ("data", "indices", "indptr"):
        digest = _write_chunk(root, name, getattr(arrays, name))
        if digest is not None:
            digests[name] = digest
    if after_x is not None:
        after_x()
    return digests


def _var_frame(names: Sequence[str]) -> Any:
    """var as a pandas DataFrame: the vocabulary tokens as index, no columns."""
    import pandas as pd

    return pd.DataFrame(index=pd.Index(list(names)))


def array_checksum(a: np.ndarray, algorithm: str = ARRAY_CHECKSUM) -> str:
    """Hex digest of an in-memory array's bytes (what its raw chunk file holds)."""
    return buffer_checksum(memoryview(np.ascontiguousarray(a)).cast("B"), algorithm)


def shard_entry(path: str | os.PathLike[str], relpath: str, arrays: ShardArrays,
                checksums: Mapping[str, str] | None = None) -> ShardEntry:
    """The manifest entry of the shard just written at ``path`` from ``arrays``: byte counts
    and :data:`ARRAY_CHECKSUM` digests of the in-memory arrays (no re-read; ``checksums``:
    digests already computed while the bytes were in cache, by array name; required for a
    streamed array of non-zero size), each checked against the file's size on disk, and the
    digest of every other file. ``relpath`` is its path in the dataset."""
    root = Path(path)
    entries = {}
    for name in ARRAY_NAMES:
        values = getattr(arrays, name)
        rel = shard_array_relpath(name)
        on_disk = (root / rel).stat().st_size if values.size else 0
        if on_disk != values.nbytes:
            raise ShardSizeError(f"{root / rel}: wrote {on_disk} bytes, expected {values.nbytes}")
        digest = (checksums or {}).get(name)
        if digest is None:
            digest = array_checksum(values if not isinstance(values, StreamedArray)
                                    else np.zeros(0, values.dtype))
        entries[name] = ArrayEntry(path=rel, nbytes=int(values.nbytes), dtype=str(values.dtype),
                                   **{ARRAY_CHECKSUM: digest})
    return ShardEntry(path=relpath, n_cells=len(arrays.indptr) - 1, nnz=int(arrays.indptr[-1]),
                      arrays=entries, other_files=other_files_digest(root))
