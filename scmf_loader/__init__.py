"""scmf_loader: read scModelForge dataset directories as zero-copy PyTorch batches.

Imports with numpy, torch and zarr alone; optional paths (the AnnData quick path of
:class:`CellDataset`, :class:`~scmf_loader.census.CensusDataset`) import their libraries when
used. Public names are resolved lazily (PEP 562), so ``import scmf_loader.format`` — what the
converter's worker processes do — does not import torch.

>>> ds = CellDataset("my_dataset")                      # doctest: +SKIP
>>> loader = CellDataLoader(ds, batch_size=256, num_workers=0)  # doctest: +SKIP
>>> for batch in loader: ...                           # doctest: +SKIP
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from scmf_loader._lazy import lazy_exports as _lazy_exports
from scmf_loader.errors import (
    ChecksumMismatchError,
    ConfigurationError,
    FormatVersionError,
    ManifestError,
    ManifestNotFoundError,
    ObsColumnNotFoundError,
    ScmfError,
    ShardCorruptError,
    ShardNotFoundError,
    ShardSizeError,
    VocabularyError,
)
from scmf_loader.vocab import GeneVocab

if _TYPE_CHECKING:
    from scmf_loader.batch import CSRBatch
    from scmf_loader.census import CensusDataset
    from scmf_loader.dataloader import CellDataLoader
    from scmf_loader.dataset import CellDataset
    from scmf_loader.mixture import MixtureDataset, MixtureSampler
    from scmf_loader.opening import open_dataset
    from scmf_loader.perturbation import PerturbationDataset, PerturbationSampler
    from scmf_loader.preprocess import PreprocessingPipeline
    from scmf_loader.samplers import (
        BatchAwareSampler,
        BatchSampler,
        BlockShuffleSampler,
        SequentialSampler,
    )
    from scmf_loader.store import DatasetStore
    from scmf_loader.streaming import StreamingCellDataset
    from scmf_loader.world import Partition, partition, resolve_world

_LAZY = {
    "AnnDataStore": "scmf_loader.adata",
    "BatchAwareSampler": "scmf_loader.samplers",
    "BatchSampler": "scmf_loader.samplers",
    "BlockShuffleSampler": "scmf_loader.samplers",
    "CSRBatch": "scmf_loader.batch",
    "CellDataLoader": "scmf_loader.dataloader",
    "CellDataset": "scmf_loader.dataset",
    "CensusDataset": "scmf_loader.census",
    "DatasetStore": "scmf_loader.store",
    "MixtureDataset": "scmf_loader.mixture",
    "MixtureSampler": "scmf_loader.mixture",
    "Partition": "scmf_loader.world",
    "PerturbationDataset": "scmf_loader.perturbation",
    "PerturbationSampler": "scmf_loader.perturbation",
    "PreprocessingPipeline": "scmf_loader.preprocess",
    "SequentialSampler": "scmf_loader.samplers",
    "StreamingCellDataset": "scmf_loader.streaming",
    "open_dataset": "scmf_loader.opening",
    "partition": "scmf_loader.world",
    "resolve_world": "scmf_loader.world",
}

__all__ = [
    "AnnDataStore",
    "BatchAwareSampler",
    "BatchSampler",
    "BlockShuffleSampler",
    "CSRBatch",
    "CellDataLoader",
    "CellDataset",
    "CensusDataset",
    "ChecksumMismatchError",
    "ConfigurationError",
    "DatasetStore",
    "FormatVersionError",
    "GeneVocab",
    "ManifestError",
    "ManifestNotFoundError",
    "MixtureDataset",
    "MixtureSampler",
    "ObsColumnNotFoundError",
    "Partition",
    "PerturbationDataset",
    "PerturbationSampler",
    "PreprocessingPipeline",
    "ScmfError",
    "SequentialSampler",
    "ShardCorruptError",
    "ShardNotFoundError",
    "ShardSizeError",
    "StreamingCellDataset",
    "VocabularyError",
    "open_dataset",
    "partition",
    "resolve_world",
]


# the public names resolve on first access (PEP 562); dir() lists __all__ only
__getattr__, __dir__ = _lazy_exports(__name__, globals(), _LAZY, __all__)
