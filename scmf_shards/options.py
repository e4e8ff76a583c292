"""Options of a conversion: ONE list of option names (:data:`OPTIONS`) from which the CLI
options (:mod:`scmf_shards.cli`), the YAML keys of the ``data:`` section
(:mod:`scmf_shards.config`) and the Python API (:class:`ConvertOptions`, the
``preprocessing`` mapping) derive.

Each :class:`Option` names one setting once: its Python name (a :class:`ConvertOptions`
field, a ``preprocessing`` key, or a query argument of ``convert_census``), its CLI flag,
the YAML keys that also set it, and its help text; defaults come from
:class:`ConvertOptions` itself (shown in ``--help`` as ``[default]``).

Names per layer: the user-facing name of storing preprocessed values is ``bake`` (CLI
``--bake``, YAML ``bake:``, ``preprocessing={"bake": True}``); the manifest records the
fact as ``baked`` (see :data:`MANIFEST_NAMES`). The preprocessing keys and their YAML
aliases are the loader's (:mod:`scmf_loader.preprocess.schema`, which reads them back from
manifests); the ``preprocessing`` options here add their CLI flags and help, and a test
checks that both lists hold the same names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.format import VALUE_DTYPES

__all__ = [
    "MANIFEST_NAMES",
    "OPTIONS",
    "RESERVED_OBS_COLUMNS",
    "ConvertOptions",
    "Option",
    "default_memory_limit",
    "options_in",
    "parse_size",
]

RESERVED_OBS_COLUMNS = ("source",)
#: option name -> the manifest key that records it (where the two differ)
MANIFEST_NAMES = {"bake": "baked"}


@dataclass(frozen=True)
class Option:
    """One setting. ``group``: ``common`` (every converting command), ``h5ad``, ``census``
    (query arguments of ``convert_census``), ``preprocessing`` (keys of the ``preprocessing``
    mapping), ``output`` (the output path) or ``run`` (set by arguments or YAML only, no flag
    of its own). :class:`ConvertOptions` has one field per ``common`` and ``h5ad`` option,
    plus ``preprocessing``. ``kind``: ``str``, ``int`` (``min``),
    ``float``, ``bool`` (``--x/--no-x``), ``flag`` (``--x``), ``dir`` or ``choice``."""

    name: str
    group: str
    help: str
    kind: str = "str"
    flag: str | None = None  # default: --name-with-dashes
    short: str | None = None
    min: int | None = None
    choices: tuple[str, ...] = ()
    yaml: tuple[str, ...] = ()  # YAML keys that also set it (preprocessing keys: see below)

    @property
    def cli_flag(self) -> str:
        """The long CLI flag, e.g. ``--shard-size``."""
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("inputs", "run", "Input files (paths or fsspec URLs).", yaml=("paths",)),
    Option("output", "output", "Dataset directory to write.", short="-o"),
    Option("source", "run", "local/h5ad or cellxgene_census/census: which command the file is for."),
    Option("vocab", "common", "human_protein_coding, human+mouse (mouse genes on their one-to-one human "
           "orthologs; also mouse_protein_coding, human+mouse:mouse_only=token), union, or a vocabulary "
           "file (.json/.tsv)",
           yaml=("gene_vocab",)),
    Option("obs_columns", "common", "Comma-separated obs columns to keep."),
    Option("shard_size", "common", "Maximum cells per shard. Shards are balanced: N cells make "
           "ceil(N / shard_size) shards whose sizes differ by at most one (1,100 cells with 500 give "
           "3 shards of 366-367)", kind="int", min=1),
    Option("chunk_size", "common", "Cells read per task; bounds memory", kind="int", min=1),
    Option("shuffle", "common", "Global seeded shuffle", kind="bool"),
    Option("seed", "common", "Shuffle seed", kind="int", min=0),
    Option("dtype", "common", "Stored value dtype", kind="choice", choices=VALUE_DTYPES),
    Option("workers", "common", "Threads converting at once in this process (reading, aligning and "
           "writing shards) [the cores this process may use, at most 4].", kind="int", min=1,
           yaml=("num_shards_workers",)),
    Option("scheduler", "common", "Address of a dask.distributed scheduler."),
    Option("scratch_dir", "common", "Where the shuffle's temporary buckets go (fast local disk, /dev/shm) "
           "[inside --output]; every worker must see it.", kind="dir"),
    Option("memory_limit", "common", "Memory the conversion may hold, e.g. 4GB or 200MB: when the "
           "shuffled dataset fits, shards are gathered straight from memory (one pass, no scratch "
           "buckets); otherwise through scratch buckets (two passes) [a quarter of the RAM]."),
    Option("overwrite", "common", "Replace an existing scmf dataset.", kind="flag"),
    Option("quiet", "common", "No progress bars.", kind="flag", short="-q"),
    Option("organism", "common", "Organism(s) of the inputs: homo_sapiens, mus_musculus (also human, "
           "mouse), comma-separated for several. Census: one query per organism [homo_sapiens]; "
           "AnnData: told per source from obs/uns organism or the gene ids when not given."),
    Option("perturbation", "common", "Parse perturbation metadata into the obs columns perturbation, "
           "perturbation_type, perturbation_targets, dose_um, time_h, is_control: auto (detect the "
           "columns) or COLUMN[,COLUMN] (docs/perturbation.md)."),
    Option("strict_perturbation", "common", "Refuse perturbation labels, doses, times or target genes "
           "that do not parse (default: kept as unknown and listed).", kind="flag"),
    Option("gene_column", "h5ad", "var column holding gene ids"),
    Option("matrix", "h5ad", "X, raw, or layer:NAME"),
    Option("census_version", "census", "Census release: a date (2025-11-08), or stable/latest (resolved "
           "and recorded) [stable; with --uri, the root's own build date]."),
    Option("obs_filter", "census", "SOMA obs value filter, e.g. \"tissue in ['lung','heart'] and "
           "is_primary_data == True\"."),
    Option("var_filter", "census", "SOMA var value filter (genes to keep)."),
    Option("uri", "census", "A Census-shaped SOMA root (local path or s3://) instead of the public Census."),
    Option("filters", "run", "Census obs filters: a mapping of obs column -> value(s) (YAML only)."),
    Option("preprocessing", "run", "The preprocessing mapping (YAML: a preprocessing: section)."),
    Option("normalize", "preprocessing", "library_size (scale cells to --target-sum), scran (pooled size "
           "factors) or none. Any preprocessing option turns preprocessing on [library_size]."),
    Option("target_sum", "preprocessing", "Counts per cell after library_size normalisation [10000].",
           kind="float"),
    Option("log1p", "preprocessing", "Natural log(1 + x) after normalising [on].", kind="bool"),
    Option("hvg_selection", "preprocessing", "Keep this many highly variable genes (chosen on all inputs "
           "together).", kind="int", flag="--hvg"),
    Option("hvg_flavor", "preprocessing", "seurat (default), cell_ranger or seurat_v3 (scanpy's flavors; "
           "seurat_v3 needs scikit-misc)."),
    Option("hvg_batch_key", "preprocessing", "obs column: select HVGs within each batch and merge "
           "(scanpy's batch_key)."),
    Option("bake", "preprocessing", "Store preprocessed values (bake) or raw counts plus per-cell "
           "library_size/size_factor that the loader applies per batch [no-bake].", kind="bool"),
    Option("assume_normalized", "preprocessing", "The input is already normalised: no counts check, no "
           "normalisation.", kind="flag"),
)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes of a size such as ``4GB``, ``200MB``, ``1.5GiB`` or ``1000000`` (decimal units;
    ``KiB``/``MiB``/``GiB`` binary; case-insensitive). Raises ScmfError on anything else."""
    if isinstance(value, bool):
        raise ScmfError(f"{what} must be a size such as 4GB or 200MB, got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        text = str(value).strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        number_text, unit = digits, text[len(digits):]
        try:
            number = float(number_text)
        except ValueError:
            number = -1.0
        if unit not in _UNITS:
            number = -1.0
    if not number >= 0 or number != number:
        raise ScmfError(f"{what} must be a size such as 4GB or 200MB, got {value!r}")
    return int(number * _UNITS[unit])


def default_memory_limit() -> int:
    """The default ``memory_limit``: a quarter of this machine's RAM (or of the cgroup's
    memory limit when that is lower), leaving room for the page cache and other processes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total // 4


def options_in(*groups: str) -> tuple[Option, ...]:
    """The options of the given groups, in :data:`OPTIONS` order."""
    return tuple(o for o in OPTIONS if o.group in groups)


def default_workers() -> int:
    """The default ``workers``: the cores this process may run on, at most 4 (the converter's
    threads overlap reading, aligning and writing; beyond a few, the disk is the limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Everything that controls a conversion (see :data:`OPTIONS` for each option's meaning).

    ``vocab`` is a shipped vocabulary (``"human_protein_coding"``, ``"human+mouse"``, see
    :data:`~scmf_loader.vocab.BUILTIN_VOCABS`), ``"union"`` or a vocabulary file;
    ``organism`` names the inputs' organism(s) (``"homo_sapiens,mus_musculus"``; default:
    told per source, see :mod:`scmf_shards.convert.derived`); ``perturbation`` is ``"auto"`` or
    ``"COLUMN[,COLUMN]"`` (parsed into the obs columns of ``docs/perturbation.md``) and
    ``strict_perturbation`` refuses what does not parse; ``matrix`` is
    ``"X"``, ``"raw"`` or ``"layer:NAME"``; ``shard_size`` is the maximum number of cells per
    shard (shards are balanced: ``ceil(n / shard_size)`` shards of sizes differing by at
    most one); ``chunk_size`` is cells read per task (bounds memory; part of the dataset
    definition because it shapes the shuffle); ``workers``/``scheduler`` say where tasks run
    and never change the output; ``scratch_dir`` puts the shuffle's temporary buckets (as
    many bytes as the dataset) on another file system, e.g. node-local SSD or ``/dev/shm``
    (default: inside the output); ``preprocessing`` maps the ``preprocessing`` options
    (:func:`options_in` ``("preprocessing")``) to values.
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
    workers: int | None = None  # None: default_workers()
    scheduler: str | None = None
    scratch_dir: str | None = None
    memory_limit: str | int | None = None
    overwrite: bool = False
    quiet: bool = False
    organism: str | None = None
    perturbation: str | None = None
    strict_perturbation: bool = False
    preprocessing: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_columns", tuple(self.obs_columns))
        for name in ("organism", "perturbation"):  # a list (YAML, Python) reads as COL,COL
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, ",".join(str(v) for v in value))
        if self.strict_perturbation and not self.perturbation:
            raise ConfigurationError("strict_perturbation needs perturbation (--perturbation auto|COLUMN[,COLUMN])")
        if self.shard_size < 1:
            raise ScmfError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.chunk_size < 1:
            raise ScmfError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.workers is None:
            object.__setattr__(self, "workers", default_workers())
        if self.workers < 1:
            raise ScmfError(f"workers must be >= 1, got {self.workers}")
        if self.dtype not in VALUE_DTYPES:
            raise ScmfError(f"dtype {self.dtype!r} not supported; choose one of {VALUE_DTYPES}")
        if self.memory_limit is not None:
            parse_size(self.memory_limit, "memory_limit")  # refused before any work
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ScmfError(f"seed must be a non-negative integer, got {self.seed!r}")
        clash = [c for c in self.obs_columns if c in RESERVED_OBS_COLUMNS]
        if clash:
            raise ScmfError(f"obs column name(s) {clash} are reserved by the format")
        if len(set(self.obs_columns)) != len(self.obs_columns):
            raise ScmfError(f"obs_columns lists a column twice: {list(self.obs_columns)}")
        # preprocessing: validated and canonicalised (defaults filled in) before any work, so
        # equal configurations hash to the same dataset_id
        from scmf_shards.preprocess.config import parse_preprocessing

        object.__setattr__(self, "preprocessing", parse_preprocessing(self.preprocessing, self.dtype))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all options."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of option ``name`` (None where it has none)."""
        f = next((f for f in fields(cls) if f.name == name), None)
        if f is None or f.default is MISSING:
            return None
        return f.default

    @property
    def memory_limit_bytes(self) -> int:
        """``memory_limit`` in bytes; unset: :func:`default_memory_limit`."""
        if self.memory_limit is None:
            return default_memory_limit()
        return parse_size(self.memory_limit, "memory_limit")

    def definition(self) -> dict[str, Any]:
        """The options that define the data (hashed into ``dataset_id``); where and how
        tasks run (workers, scheduler, scratch_dir, memory_limit, quiet, overwrite) is excluded."""
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
            # set only: datasets converted without them keep their ids
            **({"perturbation": self.perturbation} if self.perturbation else {}),
        }
