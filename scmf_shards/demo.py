"""The embedded demo dataset: 559 real PBMC cells (10x counts) from the celltypist wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["demo_h5ad_path"]


def demo_h5ad_path() -> Path:
    """Path of ``pbmc_sample.h5ad`` shipped with scmf_shards (559 cells × 32,786 genes by
    symbol, raw counts; see ``scripts/build_demo_data.py`` and NOTICE for its origin)."""
    ref = resources.files("scmf_shards") / "data" / "pbmc_sample.h5ad"
    return Path(str(ref))
