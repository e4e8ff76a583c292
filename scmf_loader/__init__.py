"""scmf_loader: read scModelForge dataset directories as zero-copy PyTorch batches.

Imports with numpy, torch and zarr alone; optional paths (the AnnData quick path of
:class:`CellDataset`) import their libraries when used.

>>> ds = CellDataset("my_dataset")                      # doctest: +SKIP
>>> loader = CellDataLoader(ds, batch_size=256, num_workers=0)  # doctest: +SKIP
>>> for batch in loader: ...                           # doctest: +SKIP
"""

from scmf_loader.batch import CSRBatch
from scmf_loader.dataloader import CellDataLoader
from scmf_loader.dataset import CellDataset
from scmf_loader.errors import (
    ChecksumMismatchError,
    ConfigurationError,
    FormatVersionError,
    ManifestError,
    ManifestNotFoundError,
    ScmfError,
    ShardNotFoundError,
    ShardSizeError,
    VocabularyError,
)
from scmf_loader.partition import Partition, partition, resolve_world
from scmf_loader.samplers import (
    BatchAwareSampler,
    BatchSampler,
    BlockShuffleSampler,
    SequentialSampler,
)
from scmf_loader.store import DatasetStore, open_dataset
from scmf_loader.vocab import GeneVocab

__all__ = [
    "BatchAwareSampler",
    "BatchSampler",
    "BlockShuffleSampler",
    "CSRBatch",
    "CellDataLoader",
    "CellDataset",
    "ChecksumMismatchError",
    "ConfigurationError",
    "DatasetStore",
    "FormatVersionError",
    "GeneVocab",
    "ManifestError",
    "ManifestNotFoundError",
    "Partition",
    "ScmfError",
    "SequentialSampler",
    "ShardNotFoundError",
    "ShardSizeError",
    "VocabularyError",
    "open_dataset",
    "partition",
    "resolve_world",
]
