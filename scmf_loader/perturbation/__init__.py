"""Perturbation data on the loader side: :class:`PerturbationDataset` (batches with
perturbation fields and a matched control per cell) and :class:`PerturbationSampler`
(perturbation-balanced batches). numpy and torch only; the converter's parsing lives in
``scmf_shards.perturbation``. See ``docs/perturbation.md``."""

from __future__ import annotations

from scmf_loader.perturbation.dataset import (
    COLUMNS,
    DEFAULT_MATCH_ON,
    PERTURBATION_TYPES,
    MissingControlError,
    PerturbationBatch,
    PerturbationDataset,
    PerturbationSchemaError,
)
from scmf_loader.perturbation.sampler import PerturbationSampler

__all__ = [
    "COLUMNS",
    "DEFAULT_MATCH_ON",
    "PERTURBATION_TYPES",
    "MissingControlError",
    "PerturbationBatch",
    "PerturbationDataset",
    "PerturbationSampler",
    "PerturbationSchemaError",
]
