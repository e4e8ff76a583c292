"""Conversion stages that fit preprocessing on all inputs, and the per-chunk transform.

Before the scatter stage of a conversion (see :mod:`scmf_shards.convert`), the driver runs
up to three extra stages of independent tasks, one task per read chunk, through the same
:class:`~scmf_shards.executor.TaskRunner`:

1. ``scran`` (``normalize: scran``): per chunk, quick clusters and within-cluster pooled
   size factors (:func:`~scmf_loader.preprocess.scran.chunk_size_factors`); a cheap second
   stage rescales every cluster against the reference cluster of the whole dataset, and the
   driver centres the factors to mean one over all cells;
2. ``moments`` (HVG selection): per chunk and batch, per-gene sums of the flavor's
   representation of the vocabulary-aligned values;
3. ``clip`` (``seurat_v3`` only): per-gene sums of counts clipped at the loess fit.

Each task writes its result to ``.scmf-tmp/preprocess/<stage>/cNNNNNN.npz`` (temporary name,
then rename; reused by a re-run) and the driver merges the files in chunk order, so the
result does not depend on the number of workers and memory stays bounded by one chunk.
The fitted result (:class:`FittedPreprocessing`) gives each scatter task a
:class:`ChunkTransform`: keep only HVG columns, and (baked) normalise and log-transform.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scmf_loader.errors import ConfigurationError, InvalidInputError, ScmfError
from scmf_loader.preprocess.hvg import (
    MomentStats,
    hvg_values,
    select_dispersion,
    select_seurat_v3,
    seurat_v3_fit,
)
from scmf_loader.preprocess.pipeline import PreprocessingPipeline
from scmf_loader.preprocess.scran import (
    DEFAULT_MAX_CLUSTER_SIZE,
    DEFAULT_MIN_CLUSTER_SIZE,
    DEFAULT_MIN_MEAN,
    DEFAULT_SIZES,
    ChunkScran,
    chunk_size_factors,
    rescale_factors,
)
from scmf_loader.preprocess.transform import (
    cell_divisors,
    check_counts,
    compute_dtype,
    transform_values,
)
from scmf_shards import faults
from scmf_shards.align import GeneAlignment, align_rows_with_totals
from scmf_shards.preprocess.config import (
    DEFAULT_BAKE,
    PREPROCESSING_ALIASES,
    PREPROCESSING_KEYS,
    allows_negative,
    check_preprocessing,
    parse_preprocessing,
    pipeline_of,
)
from scmf_shards.values import check_values

__all__ = [  # the configuration names are re-exported from scmf_shards.preprocess.config
    "PREPROCESSING_ALIASES",
    "PREPROCESSING_KEYS",
    "ChunkTransform",
    "FittedPreprocessing",
    "StatsTask",
    "allows_negative",
    "check_preprocessing",
    "fit_preprocessing",
    "parse_preprocessing",
    "pipeline_of",
    "run_stats",
]

# ---- per-chunk work ------------------------------------------------------------------------
def _restrict(m: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    mask = keep[m.indices]
    if mask.all():
        return m
    pos = np.zeros(len(mask) + 1, dtype=np.int64)
    np.cumsum(mask, out=pos[1:])
    return sp.csr_matrix((m.data[mask], m.indices[mask], pos[m.indptr]), shape=m.shape)


@dataclass(frozen=True)
class ChunkTransform:
    """What a scatter (or stats) task does to one chunk after vocabulary alignment.

    ``keep``: boolean mask over vocabulary ids of the genes stored (HVGs), or None;
    ``values``: normalise/log1p the stored values (baked); ``scran_file`` and
    ``cluster_scale``: this chunk's within-cluster size factors and their final scale.
    """

    normalize: str | None
    target_sum: float
    log1p: bool
    check: bool
    dtype: str
    keep: np.ndarray | None = None
    values: bool = False
    scran_file: str | None = None
    cluster_scale: np.ndarray | None = None

    def size_factors(self) -> np.ndarray:
        """This chunk's final scran size factors (0 for empty cells)."""
        if self.scran_file is None or self.cluster_scale is None:
            raise ScmfError("no scran size factors for this chunk")
        with np.load(self.scran_file) as f:
            part = ChunkScran(nf=f["nf"], labels=f["labels"], profiles=np.zeros((0, 0)))
        return part.factors(self.cluster_scale)

    def divisors(self, library_size: np.ndarray, size_factor: np.ndarray | None) -> np.ndarray | None:
        """Per-cell divisors of this chunk's cells (None without normalisation)."""
        if self.normalize is None:
            return None
        stat = size_factor if self.normalize == "scran" else library_size
        return cell_divisors(stat, normalize=self.normalize, target_sum=self.target_sum, dtype=self.dtype)

    def normalized(self, aligned: sp.csr_matrix, library_size: np.ndarray,
                   size_factor: np.ndarray | None) -> np.ndarray:
        """The chunk's normalised (and log1p) non-zeros."""
        return transform_values(aligned.data, aligned.indptr, self.divisors(library_size, size_factor),
                                self.log1p, compute_dtype(self.dtype))

    def apply(self, raw: sp.csr_matrix, aligned: sp.csr_matrix, library_size: np.ndarray,
              where: str, order: np.ndarray | None = None) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
        """Check counts, restrict to the kept genes and (baked) transform the values.
        Returns the new aligned chunk and extra per-cell columns (``size_factor``).
        ``order``: the rows of ``aligned`` and ``library_size`` are the chunk's rows taken in
        this order (``raw`` stays in source order); per-cell results follow ``aligned``."""
        if self.check:
            check_counts(raw.data, where)
        extra: dict[str, np.ndarray] = {}
        sf = None
        if self.normalize == "scran":
            sf = self.size_factors()
            if order is not None:
                sf = sf[order]
            extra["size_factor"] = sf
        if self.keep is not None:
            aligned = _restrict(aligned, self.keep)
        if self.values:
            data = self.normalized(aligned, library_size, sf)
            aligned = sp.csr_matrix((data, aligned.indices, aligned.indptr), shape=aligned.shape)
        return aligned, extra


@dataclass(frozen=True)
class StatsTask:
    """One chunk of one fitting stage (``scran``, ``rescale``, ``moments`` or ``clip``)."""

    stage: str
    chunk: Any
    source: Any
    matrix: str
    alignment: Any  # GeneAlignment or StoredAlignment (keep_columns, vocab_ids)
    n_genes: int
    out_file: str
    seed: int = 0
    transform: ChunkTransform | None = None
    flavor: str = "seurat"
    batch_column: str | None = None
    batch_categories: tuple[str, ...] = ()
    clip: np.ndarray | None = None  # seurat_v3 clip values; rescale: the reference's genes
    scran_file: str | None = None
    ref_profile: np.ndarray | None = None
    min_mean: float = DEFAULT_MIN_MEAN
    allow_negative: bool = False


def _where(task: StatsTask) -> str:
    return f"{task.source.path}: rows [{task.chunk.start}, {task.chunk.stop}) of '{task.matrix}'"


def _save(path: str, **arrays: np.ndarray) -> None:
    p = Path(path)
    tmp = p.with_name(f"{p.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    faults.fault_point("stats:tmp")
    os.replace(tmp, p)
    faults.fault_point("stats:saved")


def _read(task: StatsTask) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray, np.ndarray]:
    cols = (task.batch_column,) if task.batch_column else ()
    rows = task.source.read_rows(task.chunk.start, task.chunk.stop, cols)
    raw = rows.matrix
    data = raw.data
    check_values(data, data.dtype, _where(task), allow_negative=task.allow_negative)
    if task.transform is not None and task.transform.check:
        check_counts(data, _where(task))
    a, library_size = align_rows_with_totals(
        raw, GeneAlignment(task.alignment.keep_columns, task.alignment.vocab_ids, task.source.n_genes))
    if rows.library_size is not None:  # totals over genes the source did not return
        library_size = np.asarray(rows.library_size, dtype=np.float64)
    aligned = sp.csr_matrix((a.data, a.indices, a.indptr), shape=(a.shape[0], task.n_genes))
    if task.batch_column:
        lookup = {c: i for i, c in enumerate(task.batch_categories)}
        values = rows.obs[task.batch_column]
        codes = np.fromiter((lookup.get(v, -1) if v is not None else -1 for v in values),
                            dtype=np.int64, count=len(values))
        if (codes < 0).any():
            raise InvalidInputError(
                f"{_where(task)}: obs column {task.batch_column!r} has a missing value; the "
                "HVG batch key needs a batch for every cell"
            )
    else:
        codes = np.zeros(aligned.shape[0], dtype=np.int64)
    return raw, aligned, library_size, codes


def run_stats(task: StatsTask) -> dict[str, Any]:
    """Run one stage on one chunk; the result goes to ``task.out_file`` (kept if present).
    Returns a small summary (``scran``: genes expressed per cluster; ``rescale``: the
    cluster rescaling factors and the sum and count of positive size factors)."""
    out = Path(task.out_file)
    if task.stage == "rescale":
        with np.load(task.scran_file) as f:  # type: ignore[arg-type]
            part = ChunkScran(nf=f["nf"], labels=f["labels"], profiles=f["profiles"])
        genes = np.zeros(task.n_genes, dtype=bool)
        genes[task.alignment.vocab_ids] = True
        if task.clip is not None:  # the reference chunk's measured genes
            genes &= task.clip.astype(bool)
        scale = (rescale_factors(part.profiles, task.ref_profile, task.min_mean, genes)
                 if len(part.profiles) else np.zeros(0))
        sf = part.factors(scale)
        pos = sf > 0
        return {"scale": scale, "sum": float(sf[pos].sum()), "count": int(pos.sum())}
    if out.is_file():
        if task.stage == "scran":
            with np.load(out) as f:
                return {"n_expressed": (f["profiles"] > 0).sum(axis=1)}
        return {}
    raw, aligned, library_size, codes = _read(task)
    if task.stage == "scran":
        part = chunk_size_factors(aligned, seed=task.seed, min_mean=task.min_mean)
        _save(task.out_file, nf=part.nf, labels=part.labels, profiles=part.profiles)
        return {"n_expressed": part.n_expressed}
    nb = len(task.batch_categories) or 1
    stats = MomentStats.zeros(nb, task.n_genes)
    if task.flavor == "seurat_v3":
        values = aligned.data
    else:
        if task.transform is None:
            raise ScmfError("moments stage without a transform")
        sf = task.transform.size_factors() if task.transform.normalize == "scran" else None
        values = hvg_values(task.transform.normalized(aligned, library_size, sf), task.flavor)
    stats.add_csr(values, aligned.indices, aligned.indptr, codes, task.clip)
    _save(task.out_file, n=stats.n, total=stats.total, total_sq=stats.total_sq, n_pos=stats.n_pos)
    return {}


def _load_moments(path: Path) -> MomentStats:
    with np.load(path) as f:
        return MomentStats(f["n"], f["total"], f["total_sq"], f["n_pos"])


# ---- the driver ----------------------------------------------------------------------------
@dataclass
class FittedPreprocessing:
    """The result of fitting: the pipeline (with its HVG genes), what each chunk's scatter
    task does, and what the manifest records."""

    pipeline: PreprocessingPipeline
    bake: bool
    dtype: str
    keep: np.ndarray | None
    scran_files: list[str] | None = None
    cluster_scales: list[np.ndarray] | None = None
    scran_params: dict[str, Any] | None = None

    @property
    def cell_stats(self) -> tuple[str, ...]:
        """Per-cell obs columns the shards store."""
        return ("library_size", "size_factor") if self.pipeline.normalize == "scran" else ("library_size",)

    def transform_for(self, chunk: int) -> ChunkTransform:
        """The scatter-time transform of chunk ``chunk``."""
        p = self.pipeline
        return ChunkTransform(
            normalize=p.normalize, target_sum=p.target_sum, log1p=p.log1p,
            check=p.normalize is not None, dtype=self.dtype, keep=self.keep,
            values=self.bake and p.transforms_values,
            scran_file=self.scran_files[chunk] if self.scran_files else None,
            cluster_scale=self.cluster_scales[chunk] if self.cluster_scales else None,
        )

    def manifest_dict(self) -> dict[str, Any]:
        """The manifest's ``preprocessing``: every parameter, the HVG gene ids (vocabulary
        tokens), whether values are baked, and the per-cell statistic to divide by."""
        d = self.pipeline.to_dict()
        d["n_hvg_genes"] = None if self.pipeline.hvg_genes is None else len(self.pipeline.hvg_genes)
        d["baked"] = self.bake
        d["cell_stat"] = self.pipeline.cell_stat
        if self.scran_params is not None:
            d["scran"] = self.scran_params
        return d


def _batch_categories(sources: Sequence[Any], key: str) -> tuple[str, ...]:
    values: set[str] = set()
    for s in sources:
        col = s.obs_values(key)
        if any(v is None for v in col):
            raise InvalidInputError(
                f"{s.path}: obs column {key!r} (the HVG batch key) has missing values; every "
                "cell needs a batch"
            )
        values.update(col)
    return tuple(sorted(values))


def fit_preprocessing(
    config: Mapping[str, Any],
    sources: Sequence[Any],
    chunks: Sequence[Any],
    alignments: Sequence[GeneAlignment],
    gene_names: Sequence[str],
    *,
    seed: int,
    dtype: str,
    matrix: str,
    work_dir: Path,
    runner: Any,
) -> FittedPreprocessing | None:
    """Run the fitting stages over all chunks of all sources (see the module docstring) and
    return what the scatter stage and the manifest need; None without preprocessing.

    ``gene_names``: the gene space the alignments map into (the vocabulary's tokens);
    HVGs are chosen among the genes at least one source has."""
    if not config:
        return None
    pipe = pipeline_of(config)
    bake = bool(config.get("bake", DEFAULT_BAKE))
    n_genes = len(gene_names)
    work_dir.mkdir(parents=True, exist_ok=True)
    fitted = FittedPreprocessing(pipeline=pipe, bake=bake, dtype=dtype, keep=None)

    def tasks(stage: str, **kw: Any) -> list[StatsTask]:
        (work_dir / stage).mkdir(exist_ok=True)
        return [
            StatsTask(stage=stage, chunk=c, source=sources[c.source], matrix=matrix,
                      alignment=alignments[c.source], n_genes=n_genes,
                      out_file=str(work_dir / stage / f"c{c.index:06d}.npz"),
                      seed=seed * 1_000_003 + c.index,
                      allow_negative=bool(pipe.assume_normalized and not pipe.log1p),
                      **{k: (v(c) if callable(v) else v) for k, v in kw.items()})
            for c in chunks
        ]

    if pipe.normalize == "scran":
        _fit_scran(fitted, tasks, runner)
    if pipe.hvg_selection is not None:
        _fit_hvg(fitted, pipe, sources, alignments, gene_names, tasks, runner, work_dir)
    return fitted


def _fit_scran(fitted: FittedPreprocessing, tasks: Any, runner: Any) -> None:
    base = fitted.transform_for(0)
    stage = tasks("scran", transform=base, min_mean=DEFAULT_MIN_MEAN)
    summaries = runner.map(run_stats, stage, desc="scran size factors")
    best, ref = -1, (0, 0)
    for i, s in enumerate(summaries):
        for k, n_expr in enumerate(np.asarray(s["n_expressed"]).tolist()):
            if n_expr > best:
                best, ref = n_expr, (i, k)
    if best < 0:
        raise InvalidInputError("scran: every cell of the inputs is empty (no counts)")
    files = [t.out_file for t in stage]
    with np.load(files[ref[0]]) as f:
        ref_profile = np.array(f["profiles"][ref[1]])
    ref_genes = np.zeros(len(ref_profile), dtype=bool)
    ref_genes[stage[ref[0]].alignment.vocab_ids] = True
    rescale = runner.map(run_stats, tasks("rescale", scran_file=lambda c: files[c.index],
                                           ref_profile=ref_profile, clip=ref_genes,
                                           min_mean=DEFAULT_MIN_MEAN),
                         desc="scran rescale")
    total = sum(r["sum"] for r in rescale)
    count = sum(r["count"] for r in rescale)
    mean = total / count
    fitted.scran_files = files
    fitted.cluster_scales = [np.asarray(r["scale"]) / mean for r in rescale]
    fitted.scran_params = {
        "sizes": list(DEFAULT_SIZES), "min_mean": DEFAULT_MIN_MEAN,
        "max_cluster_size": DEFAULT_MAX_CLUSTER_SIZE, "min_cluster_size": DEFAULT_MIN_CLUSTER_SIZE,
        "clusters": "per read chunk: PCA of log-normalised top-variance genes + seeded k-means",
        "centred": "mean 1 over cells with counts",
    }


def _fit_hvg(fitted: FittedPreprocessing, pipe: PreprocessingPipeline, sources: Sequence[Any],
             alignments: Sequence[GeneAlignment], gene_names: Sequence[str], tasks: Any,
             runner: Any, work_dir: Path) -> None:
    universe = np.unique(np.concatenate([a.vocab_ids for a in alignments])).astype(np.int64)
    n_top = int(pipe.hvg_selection or 0)
    if n_top > len(universe):
        raise ConfigurationError(
            f"--hvg {n_top} asks for more genes than the inputs have in the vocabulary ({len(universe)})"
        )
    key = pipe.hvg_batch_key
    cats = _batch_categories(sources, key) if key else ()
    batch_kw: dict[str, Any] = {"flavor": pipe.hvg_flavor, "batch_column": key, "batch_categories": cats}
    no_keep = ChunkTransform(normalize=pipe.normalize, target_sum=pipe.target_sum, log1p=pipe.log1p,
                             check=pipe.normalize is not None, dtype=fitted.dtype)
    scales = fitted.cluster_scales
    stage = tasks("moments", transform=lambda c: replace(
        no_keep, scran_file=fitted.scran_files[c.index] if fitted.scran_files else None,
        cluster_scale=scales[c.index] if scales else None), **batch_kw)
    runner.map(run_stats, stage, desc="hvg statistics")
    stats = _merge(t.out_file for t in stage)
    sub = stats.take(universe)
    names = [gene_names[i] for i in universe.tolist()]
    batched = key is not None
    if pipe.hvg_flavor == "seurat_v3":
        fit = seurat_v3_fit(sub)
        clip = np.zeros(stats.shape)
        clip[:, universe] = fit.clip
        clip_stage = tasks("clip", clip=clip, transform=no_keep, **batch_kw)
        runner.map(run_stats, clip_stage, desc="hvg seurat_v3 clipped sums")
        clipped = _merge(t.out_file for t in clip_stage).take(universe)
        result = select_seurat_v3(sub, clipped, fit, n_top, batched)
    else:
        result = select_dispersion(sub, n_top, pipe.hvg_flavor, names, batched)
    keep_ids = universe[result.highly_variable]
    keep = np.zeros(len(gene_names), dtype=bool)
    keep[keep_ids] = True
    fitted.keep = keep
    pipe.hvg_genes = tuple(gene_names[i] for i in keep_ids.tolist())
    np.save(work_dir / "hvg_ids.npy", keep_ids)


def _merge(files: Any) -> MomentStats:
    acc: MomentStats | None = None
    for f in files:
        part = _load_moments(Path(f))
        acc = part if acc is None else acc.merge(part)
    if acc is None:
        raise ScmfError("no chunks to compute statistics from")
    return acc
