"""Preprocessing: the pipeline the loader applies per batch, its arithmetic, and the fitting
math it needs (numpy; scipy / scikit-misc imported only inside the fitting functions).

* :mod:`~scmf_loader.preprocess.schema`: the one list of keys, methods and HVG flavors;
* :mod:`~scmf_loader.preprocess.transform`: normalisation and ``log1p`` of CSR values;
* :mod:`~scmf_loader.preprocess.pipeline`: :class:`PreprocessingPipeline` (apply + fit);
* :mod:`~scmf_loader.preprocess.hvg`: highly variable genes from per-gene moments (scanpy's
  three flavors);
* :mod:`~scmf_loader.preprocess.scran`: scran pooled size factors.

The converter's out-of-core fitting passes stream their inputs through the same functions.
"""

from scmf_loader.preprocess.pipeline import PreprocessingPipeline
from scmf_loader.preprocess.schema import (
    CELL_STAT_OF,
    HVG_FLAVORS,
    NORMALIZE_METHODS,
    PREPROCESSING_ALIASES,
)
from scmf_loader.preprocess.transform import (
    cell_divisors,
    check_counts,
    compute_dtype,
    transform_values,
)

__all__ = [
    "CELL_STAT_OF",
    "HVG_FLAVORS",
    "NORMALIZE_METHODS",
    "PREPROCESSING_ALIASES",
    "PreprocessingPipeline",
    "cell_divisors",
    "check_counts",
    "compute_dtype",
    "transform_values",
]
