"""obs / var columns of an AnnData store (HDF5 or zarr), in every layout anndata reads.

Whole columns (gene ids, the values of an obs column when categories are collected) are
read with :func:`anndata.io.read_elem`. Row ranges of obs (cell ids and kept columns of
each read chunk) are sliced from the encoded arrays of anndata's documented element
encodings (``categorical``, ``nullable-integer``/``-boolean``/``-string-array``,
``string-array``, ``array``): anndata has no bounded read of a dataframe column without
xarray (``read_elem_lazy``), and reading a whole column per chunk would cost
O(cells × chunks). Dataframes written before anndata 0.7 (one structured array per frame,
categories in ``uns["<column>_categories"]``) and 0.7-era frames (``encoding-version``
0.1.0, categories referenced by an attribute) are read whole through ``read_elem``, the
way ``anndata.read_h5ad`` reads them; such files are small (they predate large atlases).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import numpy as np

from scmf_loader.errors import InvalidInputError
from scmf_shards.sources.base import strings

__all__ = ["Frame"]

_LEGACY_CACHE: OrderedDict[tuple[str, str], dict[str, np.ndarray]] = OrderedDict()
_LEGACY_CACHE_SIZE = 4


def _attr(node: Any, name: str, default: str = "") -> str:
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_elem(node: Any) -> Any:
    """``anndata.io.read_elem``, quiet about old formats (reading them is the point here)."""
    import anndata
    from anndata.io import read_elem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anndata.OldFormatWarning)
        return read_elem(node)


def _is_group(node: Any) -> bool:
    """An HDF5 group or zarr group (has members), as opposed to an array."""
    return hasattr(node, "keys") and not hasattr(node, "dtype")


def _decode(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind == "S" or (arr.dtype.kind == "O" and arr.size and isinstance(arr.flat[0], bytes)):
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in arr.tolist()],
                        dtype=object)
    return arr


class Frame:
    """One dataframe element (``obs``, ``var``, ``raw/var`` ...) of an open AnnData root.

    ``path`` names the input in error messages and keys the cache of legacy frames.
    """

    def __init__(self, root: Any, key: str, path: str) -> None:
        self.root, self.key, self.path = root, key, path
        if key not in root:
            raise InvalidInputError(f"{path}: not an AnnData store (no '{key}')")
        self.node = root[key]
        if _is_group(self.node):
            self.legacy = _attr(self.node, "encoding-version", "0.2.0") == "0.1.0"
        elif getattr(self.node.dtype, "names", None):
            self.legacy = True  # pre-0.7: one structured array
        else:
            raise InvalidInputError(f"{path}: '{key}' is neither a dataframe group nor a structured array")

    # ---- names --------------------------------------------------------------------------
    def columns(self) -> list[str]:
        """The frame's column names (not its index), in stored order."""
        if not _is_group(self.node):
            return list(self.node.dtype.names[1:])
        order = self.node.attrs.get("column-order", None)
        if order is not None and len(order):
            return [c.decode() if isinstance(c, bytes) else str(c) for c in np.asarray(order).tolist()]
        index = self._index_key()
        return [k for k in self.node if k != index and not k.startswith("__")]

    def _index_key(self) -> str:
        return _attr(self.node, "_index", "_index")

    def __len__(self) -> int:
        if not _is_group(self.node):
            return int(self.node.shape[0])
        return int(self._element(None).shape[0]) if not self.legacy else len(self.whole(None))

    # ---- whole columns ------------------------------------------------------------------
    def whole(self, column: str | None) -> np.ndarray:
        """Every value of ``column`` (``None``: the index) as strings (None = NA), read
        through ``anndata.io.read_elem``."""
        if self.legacy:
            return self._legacy()[column or "\0index"]
        value = _read_elem(self._element(column))
        if hasattr(value, "to_numpy"):  # pandas (categorical, nullable): NA becomes None
            value = value.to_numpy(dtype=object, na_value=None)
        return strings(value)

    def _element(self, column: str | None) -> Any:
        key = self._index_key() if column is None else column
        if key not in self.node:
            raise InvalidInputError(
                f"{self.path}: {self.key} has no column {column!r}; columns: {self.columns()}"
            )
        return self.node[key]

    def _legacy(self) -> dict[str, np.ndarray]:
        """All columns of a legacy frame (cached per input: these frames are small)."""
        cache_key = (self.path, self.key)
        hit = _LEGACY_CACHE.get(cache_key)
        if hit is not None:
            _LEGACY_CACHE.move_to_end(cache_key)
            return hit
        if _is_group(self.node):  # 0.7-era group: anndata reads the frame (categories by ref)
            df = _read_elem(self.node)
            out = {"\0index": strings(df.index.to_numpy(dtype=object))}
            out.update({c: strings(df[c].to_numpy(dtype=object, na_value=None)) for c in df.columns})
        else:
            out = self._structured(_read_elem(self.node))
        _LEGACY_CACHE[cache_key] = out
        if len(_LEGACY_CACHE) > _LEGACY_CACHE_SIZE:
            _LEGACY_CACHE.popitem(last=False)
        return out

    def _structured(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        """Columns of a pre-0.7 structured array; integer codes become their categories when
        ``uns["<column>_categories"]`` holds them, as anndata's read_h5ad does."""
        names = arr.dtype.names
        out = {"\0index": strings(_decode(arr[names[0]]))}
        uns = self.root["uns"] if "uns" in self.root and self.key in ("obs", "var") else None
        for name in names[1:]:
            values = _decode(arr[name])
            cats_key = f"{name}_categories"
            if uns is not None and cats_key in uns and values.dtype.kind in "iu":
                cats = np.atleast_1d(_decode(_read_elem(uns[cats_key]))).astype(object)
                if (values < len(cats)).all():
                    mapped = np.empty(len(values), dtype=object)
                    ok = values >= 0
                    mapped[ok] = cats[values[ok]]
                    mapped[~ok] = None
                    values = mapped
            out[name] = strings(values)
        return out

    # ---- row ranges ---------------------------------------------------------------------
    def rows(self, column: str | None, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` of ``column`` (``None``: the index) as strings."""
        if self.legacy:
            return self.whole(column)[start:stop]
        node = self._element(column)
        enc = _attr(node, "encoding-type", "array")
        if enc == "categorical":
            cats = np.asarray(_read_elem(node["categories"]), dtype=object)
            codes = np.asarray(node["codes"][start:stop]).astype(np.int64)
            out = np.empty(len(codes), dtype=object)
            ok = codes >= 0
            out[ok] = cats[codes[ok]]
            out[~ok] = None
            return strings(out)
        if enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
            values = _decode(node["values"][start:stop]).astype(object)
            values[np.asarray(node["mask"][start:stop], dtype=bool)] = None
            return strings(values)
        if enc in ("array", "string-array") and not _is_group(node):
            return strings(_decode(node[start:stop]))
        raise InvalidInputError(
            f"{self.path}: {self.key} column {column!r} has encoding {enc!r}, which cannot be "
            "read as a column of cell metadata"
        )
