"""The ``.h5ad`` reader under its original names: :class:`H5adSource` is
:class:`~scmf_shards.sources.anndata_source.AnnDataSource` (which reads ``.h5ad`` files and
``.zarr`` stores through anndata's I/O), and the helpers other modules import from here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from scmf_shards.sources.anndata_source import AnnDataSource, open_root
from scmf_shards.sources.base import RowChunk, is_url, source_fingerprint

__all__ = ["H5adSource", "RowChunk", "is_url", "source_fingerprint"]

#: the reader of one AnnData input (``.h5ad`` or ``.zarr``), under its original name
H5adSource = AnnDataSource


@contextlib.contextmanager
def _open_h5(path: str) -> Iterator[Any]:
    """The root of an AnnData input opened read-only (an HDF5 file or a zarr group)."""
    from scmf_shards.sources.anndata_source import is_zarr_store

    with open_root(path, is_zarr_store(path)) as root:
        yield root
