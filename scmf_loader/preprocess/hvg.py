"""Highly variable genes from streaming per-gene sums: scanpy's three flavors, out of core.

``scanpy.pp.highly_variable_genes`` needs only per-gene (per-batch) moments of the data:

* ``seurat``: mean and variance of ``expm1`` of the log-normalised values, per batch, plus the
  number of cells expressing each gene (a batch drops the genes it does not express);
* ``cell_ranger``: mean and variance of the log-normalised values (the medians and MADs it
  takes are over *genes*, from those per-gene moments), same per-batch filter;
* ``seurat_v3``: mean and variance of the counts per batch, a loess fit of log-variance on
  log-mean, then a second pass for sums of the counts clipped at
  ``mean + sqrt(n_cells) * fitted_sd``.

:class:`MomentStats` accumulates the sums of one chunk; chunks merge by addition (in a fixed
order, so the result does not depend on how many workers ran). The ``select_*`` functions
then reproduce scanpy's arithmetic and ordering step by step (``pd.cut`` bins, pandas'
skip-NaN group means, stable multi-key sorts, ``statsmodels``' MAD), so the chosen gene set
is scanpy's and every column equals scanpy's to rounding. ``seurat_v3`` uses
``skmisc.loess`` as scanpy does (package ``scikit-misc``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scmf_loader.errors import ConfigurationError, InvalidInputError, ScmfError
from scmf_loader.preprocess.schema import HVG_FLAVORS

__all__ = [
    "HvgResult",
    "MomentStats",
    "SeuratV3Fit",
    "batch_codes",
    "highly_variable_genes",
    "hvg_values",
    "select_dispersion",
    "select_seurat_v3",
    "seurat_v3_fit",
]

#: statsmodels' MAD normalising constant, scipy.stats.norm.ppf(3 / 4)
_MAD_C = 0.6744897501960817
_N_BINS = 20


# ---- accumulation ------------------------------------------------------------------------
@dataclass
class MomentStats:
    """Per batch × gene sums of one representation of the data.

    ``n``: cells per batch; ``total``/``total_sq``: float64 sums of values and of squares
    (squares formed in the value dtype, as scanpy does); ``n_pos``: cells with a value > 0.
    """

    n: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    n_pos: np.ndarray

    @classmethod
    def zeros(cls, n_batches: int, n_genes: int) -> MomentStats:
        """Empty sums for ``n_batches`` × ``n_genes``."""
        return cls(
            n=np.zeros(n_batches, dtype=np.int64),
            total=np.zeros((n_batches, n_genes)),
            total_sq=np.zeros((n_batches, n_genes)),
            n_pos=np.zeros((n_batches, n_genes), dtype=np.int64),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(batches, genes)``."""
        return self.total.shape  # type: ignore[return-value]

    def merge(self, other: MomentStats) -> MomentStats:
        """Add ``other`` into ``self`` (in place) and return ``self``."""
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.n_pos += other.n_pos
        return self

    def take(self, columns: np.ndarray) -> MomentStats:
        """The sums restricted to some genes (columns)."""
        return MomentStats(self.n.copy(), self.total[:, columns], self.total_sq[:, columns],
                           self.n_pos[:, columns])

    def add_csr(
        self, values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, codes: np.ndarray,
        clip: np.ndarray | None = None,
    ) -> None:
        """Add the rows of a CSR matrix (non-zeros ``values`` at gene ``indices``); ``codes``:
        each row's batch. With ``clip`` (batches × genes), values are first clipped at it in
        float64 (seurat_v3's second pass)."""
        nb, ng = self.shape
        codes = np.asarray(codes, dtype=np.int64)
        self.n += np.bincount(codes, minlength=nb)
        if len(values) == 0:
            return
        flat = np.repeat(codes, np.diff(indptr)) * ng + np.asarray(indices, dtype=np.int64)
        if clip is not None:
            v = np.minimum(values.astype(np.float64), clip.ravel()[flat])
            sq = v * v
        else:
            v = values.astype(np.float64)
            sq = _squares(values)
        size = nb * ng
        self.total += np.bincount(flat, weights=v, minlength=size).reshape(nb, ng)
        self.total_sq += np.bincount(flat, weights=sq, minlength=size).reshape(nb, ng)
        self.n_pos += np.bincount(flat[values > 0], minlength=size).reshape(nb, ng)

    def add_dense(self, x: np.ndarray, codes: np.ndarray, clip: np.ndarray | None = None) -> None:
        """Add the rows of a dense cells × genes array (see :meth:`add_csr`)."""
        codes = np.asarray(codes, dtype=np.int64)
        for b in np.unique(codes).tolist():
            rows = x[codes == b]
            self.n[b] += rows.shape[0]
            if clip is not None:
                r = np.minimum(rows.astype(np.float64), clip[b])
                self.total[b] += r.sum(axis=0)
                self.total_sq[b] += (r * r).sum(axis=0)
            else:
                self.total[b] += rows.sum(axis=0, dtype=np.float64)
                self.total_sq[b] += _squares(rows).sum(axis=0, dtype=np.float64)
            self.n_pos[b] += (rows > 0).sum(axis=0)


def _squares(values: np.ndarray) -> np.ndarray:
    # scanpy squares float data in its own dtype and integer data exactly
    if values.dtype.kind == "f":
        return values * values
    v = values.astype(np.float64)
    return v * v


def hvg_values(values: np.ndarray, flavor: str) -> np.ndarray:
    """The representation a flavor takes moments of: ``expm1`` of the (log-normalised)
    values for ``seurat``, the values themselves otherwise (``seurat_v3`` is given counts)."""
    if flavor == "seurat":
        return np.expm1(values)
    return values


def batch_codes(labels: Sequence[Any] | np.ndarray | None, n_cells: int) -> tuple[np.ndarray, list[Any]]:
    """Integer batch code per cell and the sorted batch categories (one batch when None)."""
    if labels is None:
        return np.zeros(n_cells, dtype=np.int64), [None]
    arr = np.asarray(labels)
    if len(arr) != n_cells:
        raise InvalidInputError(f"batch_labels has {len(arr)} entries, expected one per cell ({n_cells})")
    if arr.dtype == object and any(v is None for v in arr.tolist()):
        raise InvalidInputError("batch_labels holds missing values; every cell needs a batch")
    cats, inverse = np.unique(arr, return_inverse=True)
    return inverse.astype(np.int64).ravel(), cats.tolist()


# ---- results -----------------------------------------------------------------------------
@dataclass
class HvgResult:
    """What ``highly_variable_genes`` gives, per gene (in the order the genes were given):
    ``highly_variable`` plus scanpy's columns (``means``, ``dispersions``,
    ``dispersions_norm`` or ``variances``, ``variances_norm``, ``highly_variable_rank``, and
    ``highly_variable_nbatches`` with a batch key)."""

    flavor: str
    highly_variable: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_selected(self) -> int:
        """Number of genes selected."""
        return int(self.highly_variable.sum())


def _mean_var(n: np.ndarray | int, total: np.ndarray, total_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # scanpy's _get_mean_var: E[x], E[x^2] - E[x]^2, times n / (n - 1)
    n = int(n)
    mean = total / n
    var = total_sq / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    return mean, var


def _sort_codes(x: np.ndarray, ascending: bool) -> np.ndarray:
    """pandas' lexsort_indexer codes of one key: ranks of the distinct values, NaN last."""
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    uniq = np.unique(x[~nan])
    codes = np.searchsorted(uniq, x)
    if not ascending:
        codes = len(uniq) - 1 - codes
    codes[nan] = len(uniq)
    return codes


def _bins(means: np.ndarray, flavor: str) -> np.ndarray:
    """Bin number of each gene, as ``pd.cut`` in scanpy's ``_get_mean_bins``."""
    if means.size == 0:
        raise ScmfError("highly variable genes: no genes to bin")
    if flavor == "seurat":
        mn, mx = float(means.min()), float(means.max())
        if mn == mx:
            mn -= 0.001 * abs(mn) if mn != 0 else 0.001
            mx += 0.001 * abs(mx) if mx != 0 else 0.001
            bins = np.linspace(mn, mx, _N_BINS + 1, endpoint=True)
        else:
            bins = np.linspace(mn, mx, _N_BINS + 1, endpoint=True)
            bins[0] -= (mx - mn) * 0.001
    else:
        bins = np.r_[-np.inf, np.percentile(means, np.arange(10, 105, 5)), np.inf]
        if len(np.unique(bins)) < len(bins):
            raise ScmfError(
                "highly variable genes, flavor 'cell_ranger': the 10th..100th percentiles of "
                "the gene means are not distinct (too many genes with the same mean, e.g. "
                "genes with no counts), so the mean bins are undefined (scanpy fails the same "
                "way). Use flavor 'seurat' or 'seurat_v3', or a vocabulary of expressed genes"
            )
    return np.searchsorted(bins, means, side="left")


def _normalized_dispersion(dispersion: np.ndarray, bins: np.ndarray, flavor: str) -> np.ndarray:
    groups = np.unique(bins)
    avg = np.full(groups.max() + 1, np.nan)
    dev = np.full(groups.max() + 1, np.nan)
    for g in groups.tolist():
        d = dispersion[bins == g]
        if flavor == "seurat":
            d = d[~np.isnan(d)]
            if d.size:
                avg[g] = d.mean()
            if d.size >= 2:
                dev[g] = d.std(ddof=1)
        else:
            med = np.median(d)
            avg[g] = med
            dev[g] = np.median(np.abs(d - med) / _MAD_C)
    if flavor == "seurat":
        single = np.isnan(dev[groups])  # one gene in the bin: its normalised dispersion is 1
        dev[groups[single]] = avg[groups[single]]
        avg[groups[single]] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (dispersion - avg[bins]) / dev[bins]


def _single_batch(
    n: int, total: np.ndarray, total_sq: np.ndarray, flavor: str, n_top: int,
) -> dict[str, np.ndarray]:
    """scanpy's ``_highly_variable_genes_single_batch`` with ``n_top_genes`` on given genes."""
    mean, var = _mean_var(n, total, total_sq)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        if flavor == "seurat":
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    disp_norm = _normalized_dispersion(dispersion, _bins(mean, flavor), flavor)
    k = min(n_top, len(mean))
    finite = disp_norm[~np.isnan(disp_norm)]
    if k > finite.size:
        k = finite.size
    if k == 0:
        hv = np.zeros(len(mean), dtype=bool)
    else:
        cutoff = np.sort(finite)[::-1][k - 1]
        hv = np.nan_to_num(disp_norm, nan=-np.inf) >= cutoff
    return {"means": mean, "dispersions": dispersion, "dispersions_norm": disp_norm,
            "highly_variable": hv}


def _nanmean0(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    cnt = ok.sum(axis=0)
    s = np.where(ok, a, 0.0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def select_dispersion(
    stats: MomentStats, n_top: int, flavor: str, gene_names: Sequence[str], batched: bool,
) -> HvgResult:
    """scanpy's ``seurat``/``cell_ranger`` selection from the moments of the flavor's
    representation (see :func:`hvg_values`); ``batched``: a batch key was given."""
    if flavor not in ("seurat", "cell_ranger"):
        raise ConfigurationError(f"select_dispersion handles seurat and cell_ranger, not {flavor!r}")
    nb, ng = stats.shape
    if not batched:
        cols = _single_batch(int(stats.n.sum()), stats.total.sum(axis=0), stats.total_sq.sum(axis=0),
                             flavor, n_top)
        hv = cols.pop("highly_variable")
        return HvgResult(flavor, hv, cols)
    means = np.zeros((nb, ng))
    disp = np.zeros((nb, ng))
    dnorm = np.zeros((nb, ng))
    hv_count = np.zeros(ng, dtype=np.int64)
    for b in range(nb):
        filt = stats.n_pos[b] > 0
        if not filt.any():
            raise ScmfError(f"highly variable genes: batch {b} has no expressed gene")
        r = _single_batch(int(stats.n[b]), stats.total[b, filt], stats.total_sq[b, filt], flavor, n_top)
        means[b, filt] = r["means"]
        disp[b, filt] = r["dispersions"]
        dnorm[b, filt] = r["dispersions_norm"]
        hv_count[filt] += r["highly_variable"]
    cols = {"means": _nanmean0(means), "dispersions": _nanmean0(disp),
            "dispersions_norm": _nanmean0(dnorm), "highly_variable_nbatches": hv_count,
            "highly_variable_intersection": hv_count == nb}
    names = np.asarray(gene_names, dtype=str)
    by_name = np.argsort(names, kind="stable")  # pandas' groupby sorts genes by name
    keys = (_sort_codes(cols["dispersions_norm"][by_name], ascending=False),
            _sort_codes(hv_count[by_name].astype(np.float64), ascending=False))
    order = by_name[np.lexsort(keys)]
    hv = np.zeros(ng, dtype=bool)
    hv[order[:n_top]] = True
    return HvgResult(flavor, hv, cols)


@dataclass
class SeuratV3Fit:
    """seurat_v3's per-batch loess fit: means, regularised sd and clip values (batches × genes)."""

    mean: np.ndarray
    reg_std: np.ndarray
    clip: np.ndarray


def seurat_v3_fit(stats: MomentStats, span: float = 0.3) -> SeuratV3Fit:
    """Fit log10(variance) ~ log10(mean) by loess per batch (``skmisc.loess``, degree 2),
    from the moments of the counts; gives the clip values of the second pass."""
    try:
        from skmisc.loess import loess
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ScmfError(
            "hvg flavor 'seurat_v3' needs the package scikit-misc (pip install scikit-misc)"
        ) from exc
    nb, ng = stats.shape
    mean = np.zeros((nb, ng))
    reg_std = np.zeros((nb, ng))
    clip = np.zeros((nb, ng))
    for b in range(nb):
        n = int(stats.n[b])
        m, v = _mean_var(n, stats.total[b], stats.total_sq[b])
        not_const = v > 0
        estimat_var = np.zeros(ng, dtype=np.float64)
        y = np.log10(v[not_const])
        x = np.log10(m[not_const])
        try:
            model = loess(x, y, span=span, degree=2)
            model.fit()
        except (ValueError, RuntimeError) as exc:
            raise ScmfError(
                f"hvg flavor 'seurat_v3': the loess fit failed for batch {b} ({exc}); too few "
                "cells or variable genes"
            ) from exc
        estimat_var[not_const] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**estimat_var)
        mean[b] = m
        clip[b] = reg_std[b] * np.sqrt(n) + m
    return SeuratV3Fit(mean, reg_std, clip)


def select_seurat_v3(
    stats: MomentStats, clipped: MomentStats, fit: SeuratV3Fit, n_top: int, batched: bool,
) -> HvgResult:
    """scanpy's ``seurat_v3`` selection from the count moments, the sums of clipped counts
    (second pass) and the loess fit."""
    nb, ng = stats.shape
    ngv = np.zeros((nb, ng))
    for b in range(nb):
        n = int(stats.n[b])
        mean = fit.mean[b]
        with np.errstate(divide="ignore", invalid="ignore"):
            ngv[b] = (1 / ((n - 1) * np.square(fit.reg_std[b]))) * (
                (n * np.square(mean)) + clipped.total_sq[b] - 2 * clipped.total[b] * mean
            )
    ranked = np.argsort(np.argsort(-ngv, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum((ranked < n_top).astype(int), axis=0)
    ranked[ranked >= n_top] = np.nan
    median_ranked = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    means, variances = _mean_var(int(stats.n.sum()), stats.total.sum(axis=0), stats.total_sq.sum(axis=0))
    order = np.lexsort((_sort_codes(nbatches.astype(np.float64), ascending=False),
                        _sort_codes(median_ranked, ascending=True)))
    hv = np.zeros(ng, dtype=bool)
    hv[order[: int(n_top)]] = True
    cols = {"means": means, "variances": variances, "variances_norm": np.mean(ngv, axis=0),
            "highly_variable_rank": median_ranked}
    if batched:
        cols["highly_variable_nbatches"] = nbatches
    return HvgResult("seurat_v3", hv, cols)


# ---- in memory ---------------------------------------------------------------------------
def _rows(x: Any) -> tuple[str, Any]:
    if hasattr(x, "tocsr") and hasattr(x, "nnz"):
        csr = x.tocsr()
        csr.sum_duplicates()
        return "csr", csr
    return "dense", np.asarray(x)


def highly_variable_genes(
    x: Any,
    *,
    n_top_genes: int,
    flavor: str = "seurat",
    batch_labels: Sequence[Any] | np.ndarray | None = None,
    gene_names: Sequence[str] | None = None,
    span: float = 0.3,
) -> HvgResult:
    """``scanpy.pp.highly_variable_genes(adata, n_top_genes=..., flavor=..., batch_key=...)``
    on an in-memory matrix (dense array or scipy sparse, cells × genes): log-normalised
    values for ``seurat``/``cell_ranger``, counts for ``seurat_v3``. Same genes as scanpy."""
    if flavor not in HVG_FLAVORS:
        raise ConfigurationError(f"hvg flavor must be one of {HVG_FLAVORS}, got {flavor!r}")
    kind, m = _rows(x)
    n_cells, n_genes = m.shape
    if isinstance(n_top_genes, bool) or n_top_genes < 1:
        raise ConfigurationError(f"n_top_genes must be >= 1, got {n_top_genes}")
    if n_top_genes > n_genes:
        raise ConfigurationError(f"n_top_genes={n_top_genes} but the data has only {n_genes} genes")
    names = list(gene_names) if gene_names is not None else [str(i) for i in range(n_genes)]
    codes, cats = batch_codes(batch_labels, n_cells)
    stats = MomentStats.zeros(len(cats), n_genes)

    def add(target: MomentStats, clip: np.ndarray | None = None) -> None:
        if kind == "csr":
            vals = m.data if clip is not None else hvg_values(m.data, flavor)
            target.add_csr(vals, m.indices, m.indptr, codes, clip)
        else:
            vals = m if clip is not None else hvg_values(m, flavor)
            target.add_dense(vals, codes, clip)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        add(stats)
        if flavor != "seurat_v3":
            return select_dispersion(stats, n_top_genes, flavor, names, batch_labels is not None)
        fit = seurat_v3_fit(stats, span)
        clipped = MomentStats.zeros(len(cats), n_genes)
        add(clipped, fit.clip)
        return select_seurat_v3(stats, clipped, fit, n_top_genes, batch_labels is not None)
