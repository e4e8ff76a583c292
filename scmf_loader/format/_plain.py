"""Zarr-free reads of the small numeric arrays of a shard (obs columns, var columns).

Importing zarr costs ~0.2 s of a fresh process, more than a whole epoch's one-time work
otherwise; the numeric obs columns the loader reads (categorical codes, per-cell stats) are
one-dimensional zarr v3 arrays with the ``bytes`` codec, optionally followed by ``zstd``,
which need only JSON, numpy and ``numcodecs`` (zarr's own codec library). Anything else is
left to zarr (:func:`read_plain_array` returns None).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_plain_array"]

#: zarr v3 ``data_type`` names the plain reader takes (fixed-size numbers)
_PLAIN_TYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                          "float32", "float64"})


def _plain_codecs(codecs: Any, dtype: np.dtype) -> tuple[np.dtype, bool] | None:
    """``(dtype with its byte order, zstd-compressed)`` for the codec chains ``[bytes]`` and
    ``[bytes, zstd]``; None for any other."""
    if not isinstance(codecs, list) or not 1 <= len(codecs) <= 2 or not all(isinstance(c, dict) for c in codecs):
        return None
    first = codecs[0]
    if first.get("name") != "bytes":
        return None
    endian = (first.get("configuration") or {}).get("endian", "little")
    if endian not in ("little", "big"):
        return None
    dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    if len(codecs) == 1:
        return dtype, False
    return (dtype, True) if codecs[1].get("name") == "zstd" else None


def read_plain_array(array_dir: str | os.PathLike[str]) -> np.ndarray | None:
    """A one-dimensional zarr v3 array of fixed-size numbers whose codecs are ``bytes``
    (then optionally ``zstd``), read without zarr (its import alone costs ~0.2 s in a fresh
    process): its ``zarr.json`` parsed, each chunk file ``c/<i>`` decoded (a missing one is
    the fill value). Returns None for anything else (another layout, codec or data type, a
    missing or undecodable file): the caller then reads it through zarr, which also reports
    what is wrong."""
    root = Path(array_dir)
    try:
        meta = json.loads((root / "zarr.json").read_text(encoding="utf-8"))
        shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        keys = meta.get("chunk_key_encoding", {"name": "default"})
        ok = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
              and meta.get("data_type") in _PLAIN_TYPES and meta["chunk_grid"].get("name") == "regular"
              and keys.get("name") == "default" and (keys.get("configuration") or {}).get("separator", "/") == "/"
              and len(shape) == 1 and len(chunk) == 1 and chunk[0] >= 1 and not meta.get("storage_transformers"))
        plain = _plain_codecs(meta.get("codecs"), np.dtype(meta["data_type"])) if ok else None
        if plain is None:
            return None
        return _read_chunks(root, int(shape[0]), int(chunk[0]), plain, meta.get("fill_value", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None


def _read_chunks(root: Path, n: int, chunk: int, plain: tuple[np.dtype, bool], fill: Any) -> np.ndarray | None:
    dtype, zstd = plain
    out = np.empty(n, dtype=dtype.newbyteorder("="))
    decode = None
    if zstd:
        from numcodecs.zstd import Zstd  # zarr's own codec library; no zarr import

        decode = Zstd().decode
    for i, lo in enumerate(range(0, n, chunk)):
        hi = min(lo + chunk, n)
        try:
            raw = (root / "c" / str(i)).read_bytes()
        except FileNotFoundError:
            out[lo:hi] = fill
            continue
        raw = decode(raw) if decode is not None else raw
        if len(raw) != chunk * dtype.itemsize:  # zarr v3 stores whole chunks, the last one too
            return None
        out[lo:hi] = np.frombuffer(raw, dtype=dtype, count=hi - lo)
    return out
