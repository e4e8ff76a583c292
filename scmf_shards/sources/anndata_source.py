"""One AnnData input, ``.h5ad`` file or ``.zarr`` store (zarr v2 or v3), local or at any
fsspec URL, read through anndata's own I/O in bounded pieces (never the whole matrix).

- the matrix (``X``, ``raw/X``, legacy ``raw.X``, ``layers/NAME``) is opened with
  :func:`anndata.io.sparse_dataset` when sparse (CSR: row ranges ``m[start:stop]``; CSC:
  a one-time CSR copy, see :mod:`scmf_shards.sources.csc`); a dense matrix is sliced by
  rows from its HDF5/zarr array (``h5py``/``zarr`` slicing, what anndata's backed mode does);
- obs / var columns through :mod:`scmf_shards.sources.anndata_frames` (``read_elem``; the
  pre-0.7 structured-array layout included).

Every problem is raised as :class:`~scmf_loader.errors.InvalidInputError` naming the input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from scmf_loader.errors import InvalidInputError, ScmfError
from scmf_shards.scratch import csr_view, map_items, scratch
from scmf_shards.sources.anndata_frames import Frame
from scmf_shards.sources.base import (
    RowChunk,
    is_url,
    local_path,
    source_fingerprint,
    tree_fingerprint,
)

__all__ = ["AnnDataSource", "is_zarr_store", "open_root"]


def is_zarr_store(path: str) -> bool:
    """True when ``path`` (local or URL) is a zarr store (a directory holding zarr metadata,
    or a name ending in ``.zarr``), False for a file such as an ``.h5ad``."""
    if path.rstrip("/").endswith(".zarr"):
        return True
    if path.endswith(".h5ad"):
        return False
    if not is_url(path):
        p = local_path(path)
        return os.path.isdir(p) and any(
            os.path.exists(os.path.join(p, m)) for m in ("zarr.json", ".zgroup", ".zattrs"))
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return bool(fs.isdir(root)) and any(fs.exists(f"{root.rstrip('/')}/{m}") for m in ("zarr.json", ".zgroup"))


@contextlib.contextmanager
def open_root(path: str, zarr_store: bool) -> Iterator[Any]:
    """The root group of an AnnData store, opened read-only (h5py.File or zarr.Group)."""
    if zarr_store:
        import zarr

        target = path if is_url(path) else local_path(path)
        if not is_url(path) and not os.path.isdir(target):
            raise InvalidInputError(f"{path}: no such zarr store")
        try:
            yield zarr.open_group(target, mode="r")
        except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
            raise InvalidInputError(f"{path}: not a zarr store ({exc})") from exc
        return
    import h5py

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
    local = local_path(path)
    if not os.path.exists(local):
        raise InvalidInputError(f"{path}: no such file")
    if os.path.isdir(local):
        raise InvalidInputError(f"{path}: is a directory, neither an .h5ad file nor a zarr store")
    try:
        f = h5py.File(local, "r")
    except OSError as exc:
        raise InvalidInputError(f"{path}: not an HDF5/.h5ad file ({exc})") from exc
    with f:
        yield f


def _matrix_keys(root: Any, matrix: str, path: str) -> tuple[str, str]:
    """(matrix key, var key) of ``--matrix`` in this store."""
    if matrix == "X":
        return "X", "var"
    if matrix == "raw":
        if "raw" in root and "X" in root["raw"]:
            return "raw/X", "raw/var"
        if "raw.X" in root:  # written before anndata 0.7
            return "raw.X", "raw.var"
        raise InvalidInputError(f"{path}: has no raw matrix (no 'raw/X'), asked for by --matrix raw")
    return f"layers/{matrix[6:]}", "var"


class AnnDataSource:
    """One AnnData input, opened lazily: only metadata is read on construction.

    ``matrix`` is ``"X"``, ``"raw"`` (``raw.X``) or ``"layer:NAME"``; ``gene_column`` is
    ``"var_names"`` or a ``var`` column (of ``raw.var`` when ``matrix="raw"``).
    """

    def __init__(self, path: str | os.PathLike[str], matrix: str = "X", gene_column: str = "var_names") -> None:
        self.path = os.fspath(path)
        self.matrix = matrix
        self.gene_column = gene_column
        if matrix not in ("X", "raw") and not (matrix.startswith("layer:") and len(matrix) > 6):
            raise InvalidInputError(f"--matrix {matrix!r} is not understood; use 'X', 'raw' or 'layer:NAME'")
        self.zarr = is_zarr_store(self.path)
        self.kind = "anndata_zarr" if self.zarr else "h5ad"
        self._csr_copy: str | None = None  # set by prepare() for a CSC matrix
        with open_root(self.path, self.zarr) as root:
            self._inspect(root)

    # ---- metadata -------------------------------------------------------------------------
    def _fail(self, problem: str) -> InvalidInputError:
        return InvalidInputError(f"{self.path}: {problem}")

    def _inspect(self, root: Any) -> None:
        if "obs" not in root:
            raise self._fail("not an AnnData store (no 'obs')")
        self._x_key, self._var_key = _matrix_keys(root, self.matrix, self.path)
        if self._x_key not in root:
            raise self._fail(f"has no matrix '{self._x_key}' (asked for by --matrix {self.matrix})")
        self._describe_matrix(root[self._x_key])
        if self.dtype.kind not in "iuf":
            raise self._fail(f"matrix '{self._x_key}' has non-numeric dtype {self.dtype}")
        if self.n_cells == 0:
            raise self._fail("holds no cells (empty file)")
        if self.n_genes == 0:
            raise self._fail("holds no genes")
        self._genes: list[str] | None = self._read_genes(root)
        if len(self._genes) != self.n_genes:
            raise self._fail(f"var has {len(self._genes)} genes but '{self._x_key}' has {self.n_genes} columns")
        obs = Frame(root, "obs", self.path)
        if len(obs) != self.n_cells:
            raise self._fail(f"obs has {len(obs)} rows but '{self._x_key}' has {self.n_cells}")
        self.obs_columns = tuple(obs.columns())

    def _describe_matrix(self, node: Any) -> None:
        if hasattr(node, "keys") and not hasattr(node, "dtype"):  # a group: sparse
            from anndata.io import sparse_dataset

            try:
                m = sparse_dataset(node)
            except Exception as exc:
                raise self._fail(f"matrix '{self._x_key}' is not a sparse matrix anndata reads ({exc})") from exc
            self.layout = m.format
            self.n_cells, self.n_genes = (int(s) for s in m.shape)
            self.dtype = np.dtype(m.dtype)
            return
        if len(node.shape) != 2:
            raise self._fail(f"matrix '{self._x_key}' is not 2-dimensional")
        self.layout = "dense"
        self.n_cells, self.n_genes = (int(s) for s in node.shape)
        self.dtype = np.dtype(node.dtype)

    def _read_genes(self, root: Any) -> list[str]:
        var = Frame(root, self._var_key, self.path)
        column = None if self.gene_column == "var_names" else self.gene_column
        if column is not None and column not in var.columns():
            raise self._fail(f"var has no column {self.gene_column!r}; columns: {var.columns()}")
        return [str(g) for g in var.whole(column).tolist()]

    @property
    def genes(self) -> list[str]:
        """Gene ids of the chosen matrix's columns (``gene_column``), as strings."""
        if self._genes is None:  # a copy sent to a worker: read again only if asked
            with open_root(self.path, self.zarr) as root:
                self._genes = self._read_genes(root)
        return self._genes

    def __getstate__(self) -> dict[str, Any]:
        # tasks carry the source to workers, which never need the gene list: leave it out
        return {**self.__dict__, "_genes": None}

    def has_raw(self) -> bool:
        """Whether the store holds a raw matrix (``raw/X`` or legacy ``raw.X``)."""
        with open_root(self.path, self.zarr) as root:
            return ("raw" in root and "X" in root["raw"]) or "raw.X" in root

    # ---- identity -------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, object]:
        """What identifies this input's content for ``dataset_id``: size and sha256 of the
        file (of every file of a zarr store), plus how it is read. Reads everything once."""
        size, digest = tree_fingerprint(self.path) if self.zarr else source_fingerprint(self.path)
        return {"kind": self.kind, "size": size, "sha256": digest, "matrix": self.matrix,
                "gene_column": self.gene_column}

    def manifest_fields(self, fingerprint: dict[str, object]) -> dict[str, object]:
        """Extra provenance recorded for this source in the manifest."""
        return {"size": fingerprint["size"], "sha256": fingerprint["sha256"], "matrix": self.matrix,
                "gene_column": self.gene_column, "layout": self.layout, "dtype": str(self.dtype)}

    # ---- obs ------------------------------------------------------------------------------
    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """Raise if any requested obs column is missing from this input."""
        missing = [c for c in columns if c not in self.obs_columns]
        if missing:
            raise self._fail(f"obs has no column(s) {missing}; available: {list(self.obs_columns)}")

    def obs_values(self, column: str) -> np.ndarray:
        """All values of one obs column as strings (None = NA); used to collect categories."""
        self.check_obs_columns([column])
        with open_root(self.path, self.zarr) as root:
            return Frame(root, "obs", self.path).whole(column)

    # ---- rows -----------------------------------------------------------------------------
    def prepare(self, work_dir: str | os.PathLike[str]) -> AnnDataSource:
        """The one-time step before rows are read: a CSC matrix is copied as CSR into
        ``work_dir`` (:mod:`scmf_shards.sources.csc`); other layouts need nothing."""
        if self.layout != "csc":
            return self
        import copy

        from scmf_shards.sources.csc import transpose_csc

        with open_root(self.path, self.zarr) as root:
            node = root[self._x_key]
            transpose_csc(node, (self.n_cells, self.n_genes), self.dtype, work_dir)
        prepared = copy.copy(self)
        prepared._csr_copy = os.fspath(work_dir)
        return prepared

    def read_rows(self, start: int, stop: int, obs_columns: Sequence[str] = (),
                  reuse: bool = False) -> RowChunk:
        """Rows ``[start, stop)`` as a CSR matrix over the source genes (``indices`` int32,
        ``indptr`` int64), with cell ids and obs. ``reuse``: the matrix may live in this
        thread's scratch buffers (valid until its next reusing read), see :meth:`_direct_rows`."""
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.n_cells})")
        with open_root(self.path, self.zarr) as root:
            matrix = self._rows(root, start, stop, reuse)
            obs = Frame(root, "obs", self.path)
            cell_ids = obs.rows(None, start, stop)
            values = {c: obs.rows(c, start, stop) for c in obs_columns}
        return RowChunk(start=start, stop=stop, matrix=matrix, cell_ids=cell_ids, obs=values)

    def _rows(self, root: Any, start: int, stop: int, reuse: bool = False) -> sp.csr_matrix:
        where = f"'{self._x_key}' rows [{start}, {stop})"
        try:
            if self.layout == "dense":
                m = sp.csr_matrix(np.asarray(root[self._x_key][start:stop]))
            elif self.layout == "csc":
                m = self._csc_copy().rows(start, stop)
            else:
                m = self._direct_rows(root, start, stop, reuse)
                if m is None:
                    from anndata.io import sparse_dataset

                    m = sparse_dataset(root[self._x_key], should_cache_indptr=False)[start:stop]
        except ScmfError:
            raise
        except Exception as exc:
            raise self._fail(f"cannot read {where} ({type(exc).__name__}: {exc})") from exc
        indptr = m.indptr.astype(np.int64, copy=False)
        if len(indptr) != stop - start + 1 or (np.diff(indptr) < 0).any() or int(indptr[-1]) != len(m.data):
            raise self._fail(f"'{self._x_key}/indptr' is malformed near rows [{start}, {stop})")
        indices = m.indices
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.n_genes):
            raise self._fail(f"'{self._x_key}/indices' holds a column outside [0, {self.n_genes})")
        indices = indices.astype(np.int32, copy=False)
        return csr_view(m.data, indices, indptr, (stop - start, self.n_genes))

    def _direct_rows(self, root: Any, start: int, stop: int, reuse: bool) -> sp.csr_matrix | None:
        """Rows ``[start, stop)`` of a CSR matrix in a local ``.h5ad``, read without anndata's
        fresh arrays: where the file stores ``indices`` and ``data`` contiguously and
        unfiltered, as read-only memory maps of just those rows' bytes (no copy, no fresh
        memory: read from the page cache; unmapped when the chunk is dropped); otherwise,
        with ``reuse``, read by h5py into this thread's scratch buffers (no fresh pages to
        zero per chunk). None where neither applies (anndata reads those)."""
        if self.zarr or self.layout != "csr" or is_url(self.path):
            return None
        node = root[self._x_key]
        mapped = all(_plain_dataset(node[k]) for k in ("indptr", "indices", "data"))
        if not mapped and not reuse:
            return None
        indptr = np.asarray(node["indptr"][start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        if not 0 <= lo <= hi <= node["data"].shape[0] or node["indices"].shape != node["data"].shape:
            raise self._fail(f"'{self._x_key}/indptr' is malformed near rows [{start}, {stop})")
        if mapped:
            indices, data = (map_items(local_path(self.path), node[k].dtype, node[k].id.get_offset(), lo, hi)
                             for k in ("indices", "data"))
        else:
            indices, data = (_read_range(node[k], lo, hi, f"h5ad.{k}") for k in ("indices", "data"))
        return csr_view(data, indices, indptr - lo, (stop - start, self.n_genes))

    def _csc_copy(self) -> Any:
        from scmf_shards.sources.csc import CsrCopy, process_copy, transpose_csc

        directory = self._csr_copy
        if directory is None:  # not prepared: this process makes (once) its own copy

            def make(out: Any) -> Any:
                with open_root(self.path, self.zarr) as root:
                    return transpose_csc(root[self._x_key], (self.n_cells, self.n_genes), self.dtype, out)

            directory = process_copy((self.path, self._x_key), make)
        return CsrCopy(directory, self.n_genes)


def _plain_dataset(ds: Any) -> bool:
    """Whether an HDF5 dataset is 1-d, contiguous, unfiltered and little-endian: its bytes lie
    in the file as they are in memory (:func:`~scmf_shards.scratch.map_items` maps them)."""
    return (len(ds.shape) == 1 and ds.chunks is None and ds.id.get_offset() is not None
            and ds.id.get_create_plist().get_nfilters() == 0 and ds.dtype.byteorder in "<=|")


def _read_range(ds: Any, lo: int, hi: int, role: str) -> np.ndarray:
    """Items ``[lo, hi)`` of an HDF5 dataset, read into this thread's scratch buffer ``role``."""
    out = scratch(role, hi - lo, ds.dtype)
    if hi > lo:
        ds.read_direct(out, np.s_[lo:hi])
    return out
