"""CELLxGENE Census: queries shared with the converter, and streaming without conversion.

Modules: :mod:`~scmf_loader.census.filters` (organism names, SOMA value filters),
:mod:`~scmf_loader.census.query` (:class:`CensusSpec`, :class:`CensusQuery`: a query resolved
once, picklable), :mod:`~scmf_loader.census.reads` (CSR reads of ``X``),
:mod:`~scmf_loader.census.handles` (TileDB contexts, the per-process handle cache, and the
fork and exit hooks, installed on the first open of a root) and
:mod:`~scmf_loader.census.dataset` (:class:`CensusDataset`).

Public names are resolved lazily (PEP 562): importing this package, or the converter's
``scmf_shards.sources.census`` (which uses only the query), imports numpy alone, never torch,
``tiledbsoma`` or ``cellxgene_census``, and has no side effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scmf_loader._lazy import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from scmf_loader.census.dataset import CensusDataset, default_block_size
    from scmf_loader.census.filters import (
        DEFAULT_OBS_COLUMNS,
        build_value_filter,
        normalize_organism,
    )
    from scmf_loader.census.query import CensusQuery, CensusSpec

_LAZY = {
    "CensusDataset": "scmf_loader.census.dataset",
    "CensusQuery": "scmf_loader.census.query",
    "CensusSpec": "scmf_loader.census.query",
    "DEFAULT_OBS_COLUMNS": "scmf_loader.census.filters",
    "build_value_filter": "scmf_loader.census.filters",
    "default_block_size": "scmf_loader.census.dataset",
    "normalize_organism": "scmf_loader.census.filters",
}

__all__ = [
    "DEFAULT_OBS_COLUMNS",
    "CensusDataset",
    "CensusQuery",
    "CensusSpec",
    "build_value_filter",
    "default_block_size",
    "normalize_organism",
]


# the public names resolve on first access (PEP 562); dir() lists __all__ only
__getattr__, __dir__ = _lazy_exports(__name__, globals(), _LAZY, __all__)
