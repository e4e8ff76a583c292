"""The one list of preprocessing names: methods, HVG flavors, keys and their aliases.

Every place that reads or writes a preprocessing configuration (the pipeline's dict form,
the converter's ``preprocessing:`` config section and CLI options, a manifest's
``preprocessing`` record) takes its names from here.
"""

from __future__ import annotations

__all__ = [
    "CELL_STAT_OF",
    "CONFIG_KEYS",
    "HVG_FLAVORS",
    "INFO_KEYS",
    "NORMALIZE_METHODS",
    "PIPELINE_KEYS",
    "PREPROCESSING_ALIASES",
]

#: normalisation methods (``normalize=None`` means none)
NORMALIZE_METHODS = ("library_size", "scran")
#: highly-variable-gene flavors (scanpy's names)
HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3")
#: per-cell statistic (an obs column of the shards) that each normalisation divides by
CELL_STAT_OF = {"library_size": "library_size", "scran": "size_factor"}
#: keys of a pipeline's dict form (``PreprocessingPipeline.to_dict``)
PIPELINE_KEYS = ("normalize", "target_sum", "log1p", "hvg_selection", "hvg_flavor",
                 "hvg_batch_key", "assume_normalized", "hvg_genes")
#: keys of the converter's ``preprocessing:`` section (the pipeline's settings, no fitted
#: genes, plus ``bake``: store transformed values instead of raw counts)
CONFIG_KEYS = (*(k for k in PIPELINE_KEYS if k != "hvg_genes"), "bake")
#: informational keys a manifest's ``preprocessing`` record adds (read and ignored)
INFO_KEYS = ("baked", "bake", "cell_stat", "scran", "n_hvg_genes")
#: other names accepted for config keys
PREPROCESSING_ALIASES = {"hvg": "hvg_selection", "n_top_genes": "hvg_selection",
                         "flavor": "hvg_flavor", "batch_key": "hvg_batch_key"}
