"""Lazy reader of one ``.h5ad`` file: row ranges of a CSR, CSC or dense matrix, gene ids and
obs columns, read straight from HDF5 in bounded pieces (never the whole file in memory).

The file may be a local path or any fsspec URL (``file://``, ``memory://``, ``s3://`` ...).
Every problem is raised as :class:`~scmf_loader.errors.InvalidInputError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from scmf_loader.errors import InvalidInputError
from scmf_loader.labels import stringify
from scmf_shards.scratch import scratch

__all__ = ["H5adSource", "RowChunk", "is_url", "source_fingerprint"]

_CSC_COLUMN_BLOCK = 1 << 24  # non-zeros scanned per step when reading rows of a CSC matrix


def is_url(path: str) -> bool:
    """True for an fsspec URL (``proto://...``), False for a plain local path."""
    return "://" in path and not path.startswith("file://")


def _local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


@contextlib.contextmanager
def _open_h5(path: str) -> Iterator[h5py.File]:
    if is_url(path):
        import fsspec

        try:
            fobj = fsspec.open(path, "rb").open()
        except (FileNotFoundError, OSError) as exc:
            raise InvalidInputError(f"{path}: cannot open ({exc})") from exc
        try:
            with h5py.File(fobj, "r") as f:
                yield f
        except OSError as exc:
            raise InvalidInputError(f"{path}: not an HDF5/.h5ad file ({exc})") from exc
        finally:
            fobj.close()
        return
    local = _local_path(path)
    if not os.path.exists(local):
        raise InvalidInputError(f"{path}: no such file")
    if os.path.isdir(local):
        raise InvalidInputError(f"{path}: is a directory, expected an .h5ad file")
    try:
        f = h5py.File(local, "r")
    except OSError as exc:
        raise InvalidInputError(f"{path}: not an HDF5/.h5ad file ({exc})") from exc
    with f:
        yield f


def source_fingerprint(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a source file, streamed in 8 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    if is_url(path):
        import fsspec

        opener: Any = fsspec.open(path, "rb")
    else:
        opener = open(_local_path(path), "rb")  # noqa: SIM115
    buf = bytearray(8 << 20)  # one reused buffer: no per-block allocation
    view = memoryview(buf)
    with opener as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            size += n
            h.update(view[:n])
    return size, h.hexdigest()


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "SO":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


@dataclass
class RowChunk:
    """Raw rows ``[start, stop)`` of a source: a CSR matrix over the source's genes (values in
    the source dtype) and the requested obs columns as object arrays of strings (None = NA)."""

    start: int
    stop: int
    matrix: sp.csr_matrix
    cell_ids: np.ndarray
    obs: dict[str, np.ndarray]
    library_size: np.ndarray | None = None  # totals over all genes of the source, when
    #                                          ``matrix`` holds only some of them (float64)


class H5adSource:
    """One ``.h5ad`` input, opened lazily. Only metadata is read on construction.

    ``matrix`` is ``"X"``, ``"raw"`` (``raw/X``) or ``"layer:NAME"``; ``gene_column`` is
    ``"var_names"`` or a ``var`` column (of ``raw/var`` when ``matrix="raw"``).
    """

    kind = "h5ad"

    def __init__(self, path: str, matrix: str = "X", gene_column: str = "var_names") -> None:
        self.path = str(path)
        self.matrix = matrix
        self.gene_column = gene_column
        if matrix == "X":
            self._x_key, self._var_key = "X", "var"
        elif matrix == "raw":
            self._x_key, self._var_key = "raw/X", "raw/var"
        elif matrix.startswith("layer:") and len(matrix) > 6:
            self._x_key, self._var_key = f"layers/{matrix[6:]}", "var"
        else:
            raise InvalidInputError(
                f"--matrix {matrix!r} is not understood; use 'X', 'raw' or 'layer:NAME'"
            )
        with _open_h5(self.path) as f:
            self._inspect(f)

    @property
    def genes(self) -> list[str]:
        """Gene ids of the chosen matrix's columns (``gene_column``), as strings."""
        if self._genes is None:  # a copy sent to a worker: read again only if asked
            with _open_h5(self.path) as f:
                self._genes = self._read_genes(f)
        return self._genes

    def __getstate__(self) -> dict[str, Any]:
        # tasks carry the source to workers, which never need the gene list: leave it out
        # (20k gene names would make every task description ~300 KB)
        return {**self.__dict__, "_genes": None}

    # ---- metadata -----------------------------------------------------------------------
    def _fail(self, problem: str) -> InvalidInputError:
        return InvalidInputError(f"{self.path}: {problem}")

    def _inspect(self, f: h5py.File) -> None:
        for key in ("obs", self._var_key):
            if key not in f:
                raise self._fail(f"not an AnnData .h5ad file (no '{key}' group)")
        if self._x_key not in f:
            raise self._fail(f"has no matrix '{self._x_key}' (asked for --matrix {self.matrix})")
        x = f[self._x_key]
        if isinstance(x, h5py.Group):
            enc = x.attrs.get("encoding-type", "")
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc not in ("csr_matrix", "csc_matrix"):
                raise self._fail(f"matrix '{self._x_key}' has unsupported encoding {enc!r}")
            self.layout = "csr" if enc == "csr_matrix" else "csc"
            self.n_cells, self.n_genes = (int(s) for s in x.attrs["shape"])
            self.dtype = np.dtype(x["data"].dtype)
        else:
            if x.ndim != 2:
                raise self._fail(f"matrix '{self._x_key}' is not 2-dimensional")
            self.layout = "dense"
            self.n_cells, self.n_genes = (int(s) for s in x.shape)
            self.dtype = np.dtype(x.dtype)
        if self.dtype.kind not in "iuf":
            raise self._fail(f"matrix '{self._x_key}' has non-numeric dtype {self.dtype}")
        if self.n_cells == 0:
            raise self._fail("holds no cells (empty file)")
        if self.n_genes == 0:
            raise self._fail("holds no genes")
        self._genes: list[str] | None = self._read_genes(f)
        if len(self._genes) != self.n_genes:
            raise self._fail(
                f"var has {len(self._genes)} genes but '{self._x_key}' has {self.n_genes} columns"
            )
        self.obs_columns = tuple(self._frame_columns(f["obs"]))

    def _frame_columns(self, group: h5py.Group) -> list[str]:
        if not isinstance(group, h5py.Group):
            raise self._fail("obs/var stored in a pre-0.7 layout, which is not supported")
        return [k for k in group if k != group.attrs.get("_index", "_index") and not k.startswith("__")]

    def _index_key(self, group: h5py.Group) -> str:
        key = group.attrs.get("_index", "_index")
        return key.decode() if isinstance(key, bytes) else str(key)

    def _read_genes(self, f: h5py.File) -> list[str]:
        var = f[self._var_key]
        if not isinstance(var, h5py.Group):
            raise self._fail("var stored in a pre-0.7 layout, which is not supported")
        key = self._index_key(var) if self.gene_column == "var_names" else self.gene_column
        if key not in var:
            raise self._fail(
                f"var has no column {self.gene_column!r}; columns: {self._frame_columns(var)}"
            )
        return [str(g) for g in self._read_column(var[key], 0, None)]

    def _read_column(self, node: h5py.Dataset | h5py.Group, start: int, stop: int | None) -> np.ndarray:
        """Values ``[start, stop)`` of one dataframe column, as an object array (None = NA)."""
        enc = node.attrs.get("encoding-type", "array")
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        sl = slice(start, stop)
        if enc == "categorical":
            cats = _decode(node["categories"][()])
            codes = node["codes"][sl].astype(np.int64)
            out = np.empty(len(codes), dtype=object)
            ok = codes >= 0
            out[ok] = np.asarray(cats, dtype=object)[codes[ok]]
            out[~ok] = None
            return out
        if enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
            values = _decode(node["values"][sl]).astype(object)
            mask = node["mask"][sl].astype(bool)
            values[mask] = None
            return values
        if isinstance(node, h5py.Dataset):
            return _decode(node[sl]).astype(object)
        raise self._fail(f"column {node.name!r} has unsupported encoding {enc!r}")

    def fingerprint(self) -> dict[str, object]:
        """What identifies this input's content for ``dataset_id``: size and sha256 of the
        file, plus how it is read. Streams the whole file once."""
        size, digest = source_fingerprint(self.path)
        return {"kind": self.kind, "size": size, "sha256": digest, "matrix": self.matrix,
                "gene_column": self.gene_column}

    def manifest_fields(self, fingerprint: dict[str, object]) -> dict[str, object]:
        """Extra provenance recorded for this source in the manifest."""
        return {"size": fingerprint["size"], "sha256": fingerprint["sha256"], "matrix": self.matrix,
                "gene_column": self.gene_column, "layout": self.layout, "dtype": str(self.dtype)}

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """Raise if any requested obs column is missing from this file."""
        missing = [c for c in columns if c not in self.obs_columns]
        if missing:
            raise self._fail(f"obs has no column(s) {missing}; available: {list(self.obs_columns)}")

    def obs_values(self, column: str) -> np.ndarray:
        """All values of one obs column as strings (None = NA); used to collect categories."""
        with _open_h5(self.path) as f:
            return _stringify(self._read_column(f["obs"][column], 0, None))

    # ---- rows ---------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int, obs_columns: Sequence[str] = (),
                  reuse: bool = False) -> RowChunk:
        """Rows ``[start, stop)`` as a CSR matrix over the source genes, with cell ids and obs.
        ``reuse`` reads a CSR matrix's values and indices into this thread's scratch buffers
        (:mod:`scmf_shards.scratch`): valid until the next reusing read on this thread."""
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.n_cells})")
        with _open_h5(self.path) as f:
            x = f[self._x_key]
            if self.layout == "csr":
                matrix = self._csr_rows(x, start, stop, reuse)
            elif self.layout == "csc":
                matrix = self._csc_rows(x, start, stop)
            else:
                matrix = sp.csr_matrix(np.asarray(x[start:stop, :]))
            obs = f["obs"]
            cell_ids = _stringify(self._read_column(obs[self._index_key(obs)], start, stop))
            values = {c: _stringify(self._read_column(obs[c], start, stop)) for c in obs_columns}
        return RowChunk(start=start, stop=stop, matrix=matrix, cell_ids=cell_ids, obs=values)

    def _csr_rows(self, x: h5py.Group, start: int, stop: int, reuse: bool = False) -> sp.csr_matrix:
        indptr = np.asarray(x["indptr"][start : stop + 1], dtype=np.int64)
        if len(indptr) != stop - start + 1 or np.any(np.diff(indptr) < 0):
            raise self._fail(f"'{self._x_key}/indptr' is malformed near rows [{start}, {stop})")
        lo, hi = int(indptr[0]), int(indptr[-1])
        if hi > x["data"].shape[0] or hi > x["indices"].shape[0]:
            raise self._fail(f"'{self._x_key}/indptr' points past the end of data/indices")
        if reuse and hi > lo:
            data = scratch("h5ad.data", hi - lo, x["data"].dtype)
            indices = scratch("h5ad.indices", hi - lo, np.int32)
            x["data"].read_direct(data, np.s_[lo:hi])
            x["indices"].read_direct(indices, np.s_[lo:hi])
        else:
            data = x["data"][lo:hi]
            indices = np.asarray(x["indices"][lo:hi], dtype=np.int32)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_genes):
            raise self._fail(f"'{self._x_key}/indices' holds a column outside [0, {self.n_genes})")
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_genes))

    def _csc_rows(self, x: h5py.Group, start: int, stop: int) -> sp.csr_matrix:
        # Rows of a CSC matrix: scan columns in blocks of bounded non-zeros, keep the
        # entries whose row falls in [start, stop). Memory is bounded by the block size.
        indptr = np.asarray(x["indptr"][:], dtype=np.int64)
        rows_acc, cols_acc, vals_acc = [], [], []
        col = 0
        while col < self.n_genes:
            end = int(np.searchsorted(indptr, indptr[col] + _CSC_COLUMN_BLOCK, side="right")) - 1
            end = min(max(end, col + 1), self.n_genes)
            lo, hi = int(indptr[col]), int(indptr[end])
            rows = np.asarray(x["indices"][lo:hi], dtype=np.int64)
            keep = (rows >= start) & (rows < stop)
            if keep.any():
                pos = np.flatnonzero(keep)
                col_of = np.searchsorted(indptr[col : end + 1], lo + pos, side="right") - 1 + col
                rows_acc.append(rows[pos] - start)
                cols_acc.append(col_of.astype(np.int32))
                vals_acc.append(x["data"][lo:hi][pos])
            col = end
        if rows_acc:
            coo = sp.coo_matrix(
                (np.concatenate(vals_acc), (np.concatenate(rows_acc), np.concatenate(cols_acc))),
                shape=(stop - start, self.n_genes),
            )
        else:
            coo = sp.coo_matrix((stop - start, self.n_genes), dtype=self.dtype)
        return coo.tocsr()


def _stringify(values: np.ndarray) -> np.ndarray:
    items = values.tolist()
    if set(map(type, items)) <= {str, type(None)}:  # the common case (decoded categories and
        out = np.empty(len(items), dtype=object)   # string indexes): no per-value Python loop
        out[:] = items
        return out
    return stringify(items)
