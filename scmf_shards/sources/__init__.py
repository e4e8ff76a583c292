"""Input sources of a conversion: readers that yield raw CSR row chunks and obs values."""

from scmf_shards.sources.h5ad import H5adSource, RowChunk

__all__ = ["H5adSource", "RowChunk"]
