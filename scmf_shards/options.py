"""Options of a conversion: one frozen dataclass shared by the Python API, CLI and YAML."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from scmf_loader.errors import ScmfError
from scmf_loader.format import VALUE_DTYPES

__all__ = ["RESERVED_OBS_COLUMNS", "ConvertOptions"]

RESERVED_OBS_COLUMNS = ("source",)


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Everything that controls a conversion.

    Attributes mirror the ``scmf-convert h5ad`` options: ``vocab`` is
    ``"human_protein_coding"``, ``"union"`` or a vocabulary file; ``matrix`` is ``"X"``,
    ``"raw"`` or ``"layer:NAME"``; ``shard_size`` is cells per shard; ``chunk_size`` is cells
    read per task (bounds memory; part of the dataset definition because it shapes the
    shuffle); ``workers``/``scheduler`` say where tasks run and never change the output;
    ``scratch_dir`` puts the shuffle's temporary buckets (as many bytes as the dataset) on
    another file system, e.g. node-local SSD or ``/dev/shm`` (default: inside the output).
    """

    vocab: str = "human_protein_coding"
    gene_column: str = "var_names"
    matrix: str = "X"
    obs_columns: tuple[str, ...] = ()
    shard_size: int = 50_000
    chunk_size: int = 16_384
    shuffle: bool = True
    seed: int = 0
    dtype: str = "float32"
    workers: int = 1
    scheduler: str | None = None
    scratch_dir: str | None = None
    overwrite: bool = False
    quiet: bool = False
    preprocessing: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_columns", tuple(self.obs_columns))
        if self.shard_size < 1:
            raise ScmfError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.chunk_size < 1:
            raise ScmfError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.workers < 1:
            raise ScmfError(f"workers must be >= 1, got {self.workers}")
        if self.dtype not in VALUE_DTYPES:
            raise ScmfError(f"dtype {self.dtype!r} not supported; choose one of {VALUE_DTYPES}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ScmfError(f"seed must be a non-negative integer, got {self.seed!r}")
        clash = [c for c in self.obs_columns if c in RESERVED_OBS_COLUMNS]
        if clash:
            raise ScmfError(f"obs column name(s) {clash} are reserved by the format")
        if len(set(self.obs_columns)) != len(self.obs_columns):
            raise ScmfError(f"obs_columns lists a column twice: {list(self.obs_columns)}")
        # preprocessing: validated and canonicalised (defaults filled in) before any work, so
        # equal configurations hash to the same dataset_id
        from scmf_shards.preprocess.stats import parse_preprocessing

        object.__setattr__(self, "preprocessing", parse_preprocessing(self.preprocessing, self.dtype))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all options."""
        return tuple(f.name for f in fields(cls))

    def definition(self) -> dict[str, Any]:
        """The options that define the data (hashed into ``dataset_id``); where and how
        tasks run (workers, scheduler, scratch_dir, quiet, overwrite) is excluded."""
        return {
            "gene_column": self.gene_column,
            "matrix": self.matrix,
            "obs_columns": list(self.obs_columns),
            "shard_size": self.shard_size,
            "chunk_size": self.chunk_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "dtype": self.dtype,
            "preprocessing": dict(self.preprocessing),
        }
