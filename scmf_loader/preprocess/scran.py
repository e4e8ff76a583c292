"""scran pooled size factors (Lun, Bach & Marioni 2016, *Genome Biology* 17:75).

The algorithm of ``scran::computeSumFactors`` / ``scuttle::pooledSizeFactors``:

1. *quick pre-clustering* (:func:`quick_cluster`), so that pools hold similar cells: here
   PCA of the log-normalised top-variance genes and seeded k-means, small clusters merged into
   their nearest neighbour (scran uses a shared-nearest-neighbour graph and walktrap; the
   clusters only need to group similar cells);
2. within each cluster (split round-robin above ``max_cluster_size`` cells): cells are
   normalised by library size, genes with an average below ``min_mean`` are dropped, cells
   are arranged on a ring ordered by library size (:func:`generate_sphere`), and for every
   pool size and every ring position the pool's summed profile is compared with the average
   cell: the median ratio is the pool's size factor;
3. *deconvolution*: each pool factor is the sum of its cells' factors; the over-determined
   system (plus weak equations pulling every factor to ``1 / sum(average cell)``) is solved by
   least squares. Ring pools make the normal equations circulant, so they are solved exactly
   by FFT in O(n log n) (scran uses a sparse QR; same solution);
4. *rescaling across clusters* by the median ratio of each cluster's average cell to that of
   the reference cluster (the one with the most expressed genes), then centring to mean one.
   In a conversion whose inputs measure different genes, the ratio is taken over the genes
   both inputs measured (scran on the concatenated matrix would count a missing gene as a
   zero and pull the ratio down).

Cells with no counts get size factor 0 (scran refuses them; a divisor of 0 leaves their
zeros unchanged downstream). A non-positive estimate is replaced by the positive estimates'
median ratio to the number of detected genes, times the cell's detected genes (a simpler
stand-in for ``scuttle::cleanSizeFactors``).

For a conversion, steps 1-3 run per read chunk (``quickCluster(block=chunk)``) and step 4
across all chunks (:class:`ChunkScran`, :func:`rescale_factors`), so memory is bounded by
the chunk size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scmf_loader.errors import InvalidInputError

__all__ = [
    "DEFAULT_MIN_MEAN",
    "DEFAULT_SIZES",
    "ChunkScran",
    "chunk_size_factors",
    "generate_sphere",
    "limit_cluster_size",
    "pooled_size_factors",
    "quick_cluster",
    "rescale_factors",
    "scran_size_factors",
]

DEFAULT_SIZES = tuple(range(21, 102, 5))
DEFAULT_MIN_MEAN = 0.1  # scran's choice for UMI data (median library size <= 50,000)
DEFAULT_MAX_CLUSTER_SIZE = 3000
DEFAULT_MIN_CLUSTER_SIZE = 100
LOWWEIGHT = 1e-6
_WINDOW_BLOCK = 128


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """One BLAS thread (when ``threadpoolctl`` is installed), so PCA results do not depend on
    whether a task runs in the driver or in a single-threaded dask worker."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _csr(counts: Any) -> Any:
    import scipy.sparse as sp

    m = counts.tocsr() if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    m = m.astype(np.float64)
    m.sum_duplicates()
    return m


def generate_sphere(lib_sizes: np.ndarray) -> np.ndarray:
    """The ring order of cells: by library size, odd ranks ascending then even ranks
    descending (scuttle's ``.generateSphere``), so neighbours on the ring have similar sizes."""
    o = np.argsort(np.asarray(lib_sizes), kind="stable")
    return np.concatenate([o[0::2], o[1::2][::-1]])


def _pool_factors(ring: np.ndarray, pseudo: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Median ratio of each ring pool (every start, every size) to the average cell."""
    n, _ = ring.shape
    smax = max(sizes)
    out = np.empty((len(sizes), n))
    for w0 in range(0, n, _WINDOW_BLOCK):
        w1 = min(n, w0 + _WINDOW_BLOCK)
        rows = np.arange(w0, w1 + smax) % n
        prefix = np.zeros((len(rows) + 1, ring.shape[1]))
        np.cumsum(ring[rows], axis=0, out=prefix[1:])
        for i, s in enumerate(sizes):
            pooled = prefix[s : s + (w1 - w0)] - prefix[: w1 - w0]
            out[i, w0:w1] = np.median(pooled / pseudo, axis=1)
    return out


def _solve_ring(pool: np.ndarray, sizes: Sequence[int], n: int, low_value: float) -> np.ndarray:
    """Least-squares factors of the ring cells: ``sum(pool of size s at w) = pool[s, w]`` for
    every pool, plus ``sqrt(LOWWEIGHT) * y = sqrt(LOWWEIGHT) * low_value``. The normal
    matrix is circulant: solved exactly in Fourier space."""
    lam = np.full(n // 2 + 1, LOWWEIGHT)
    rhs = np.fft.rfft(np.full(n, LOWWEIGHT * low_value))
    for i, s in enumerate(sizes):
        box = np.zeros(n)
        box[:s] = 1.0
        bf = np.fft.rfft(box)
        lam += (bf * bf.conj()).real
        rhs += np.fft.rfft(pool[i]) * bf
    return np.fft.irfft(rhs / lam, n)


def _clean(nf: np.ndarray, detected: np.ndarray) -> np.ndarray:
    bad = nf <= 0
    if not bad.any():
        return nf
    good = ~bad & (detected > 0)
    ratio = float(np.median(nf[good] / detected[good])) if good.any() else 1.0
    out = nf.copy()
    out[bad] = np.maximum(detected[bad], 1) * ratio
    return out


def _per_cluster(
    counts: Any, sizes: Sequence[int], min_mean: float
) -> tuple[np.ndarray, np.ndarray]:
    """scuttle's ``.per_cluster_normalize``: (factors of the cells, average cell over all
    genes scaled by the mean library size). ``counts``: CSR float64, cells × genes, no
    empty cell."""
    n = counts.shape[0]
    lib = np.asarray(counts.sum(axis=1)).ravel()
    inv = 1.0 / lib
    exprs = counts.multiply(inv[:, None]).tocsr()
    ave = np.asarray(exprs.mean(axis=0)).ravel() * lib.mean()
    high = np.flatnonzero(ave >= min_mean)
    if high.size == 0:
        return lib / max(float(ave.sum()), 1e-300), ave  # no gene passes: library-size factors
    use = ave[high]
    sphere = generate_sphere(lib)
    ring = exprs[:, high][sphere].toarray()
    ok = [int(s) for s in sorted(sizes) if s <= n]
    pool = _pool_factors(ring, use, ok) if ok else np.zeros((0, n))
    y = _solve_ring(pool, ok, n, 1.0 / use.sum())
    nf = np.empty(n)
    nf[sphere] = y
    nf = nf * lib
    detected = np.asarray((exprs[:, high] > 0).sum(axis=1)).ravel()
    return _clean(nf, detected), ave


def limit_cluster_size(labels: np.ndarray, max_size: int | None) -> np.ndarray:
    """Split clusters above ``max_size`` cells round-robin into ``ceil(n / max_size)`` parts
    (scuttle's ``.limit_cluster_size``); returns new integer labels (-1 kept)."""
    labels = np.asarray(labels, dtype=np.int64)
    if max_size is None:
        return labels
    out = np.full(len(labels), -1, dtype=np.int64)
    nxt = 0
    for lab in np.unique(labels[labels >= 0]).tolist():
        idx = np.flatnonzero(labels == lab)
        mult = -(-len(idx) // max_size)
        out[idx] = nxt + np.arange(len(idx)) % mult
        nxt += mult
    return out


def rescale_factors(profiles: np.ndarray, ref: np.ndarray, min_mean: float,
                    genes: np.ndarray | None = None) -> np.ndarray:
    """scuttle's ``.rescale_clusters``: each cluster's average cell (rows of ``profiles``)
    against the reference average cell ``ref``: median ratio over genes whose mean of the
    two (library-size adjusted) is at least ``min_mean``. ``genes`` (a boolean mask)
    restricts the comparison to genes both inputs measured."""
    if genes is not None:
        profiles, ref = profiles[:, genes], ref[genes]
    out = np.empty(len(profiles))
    ref_lib = ref.sum()
    for i, cur in enumerate(profiles):
        cur_lib = cur.sum()
        use = (cur / cur_lib + ref / ref_lib) / 2 * (cur_lib + ref_lib) / 2 >= min_mean
        with np.errstate(divide="ignore", invalid="ignore"):
            r = cur[use] / ref[use]
        r = r[~np.isnan(r)]
        f = float(np.median(r)) if r.size else float("nan")
        if not np.isfinite(f) or f <= 0:
            f = float(cur_lib / ref_lib)
        out[i] = f
    return out


def _log_normalized_top(counts: Any, n_top: int) -> np.ndarray:
    lib = np.asarray(counts.sum(axis=1)).ravel()
    sf = lib / lib.mean()
    y = counts.multiply((1.0 / sf)[:, None]).tocsr()
    y.data = np.log2(y.data + 1.0)
    mean = np.asarray(y.mean(axis=0)).ravel()
    var = np.asarray(y.multiply(y).mean(axis=0)).ravel() - mean**2
    top = np.sort(np.argsort(-var, kind="stable")[: min(n_top, y.shape[1])])
    dense = y[:, top].toarray()
    return dense - dense.mean(axis=0)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    n = len(x)
    centers = [x[int(rng.integers(n))]]
    d2 = ((x - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):  # k-means++
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centers.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1))
    c = np.array(centers)
    labels = np.zeros(n, dtype=np.int64)
    for it in range(iters):
        dist = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
        new = dist.argmin(axis=1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(axis=0)
    return labels


def _merge_small(x: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    labels = labels.copy()
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        if len(ids) <= 1 or counts.min() >= min_size:
            break
        small = ids[np.argmin(counts)]
        centers = {int(i): x[labels == i].mean(axis=0) for i in ids}
        others = [int(i) for i in ids if i != small]
        d = [((centers[int(small)] - centers[o]) ** 2).sum() for o in others]
        labels[labels == small] = others[int(np.argmin(d))]
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)


def quick_cluster(
    counts: Any,
    *,
    min_size: int = DEFAULT_MIN_CLUSTER_SIZE,
    n_top_genes: int = 500,
    n_pcs: int = 50,
    seed: int = 0,
    cells_per_cluster: int = 500,
) -> np.ndarray:
    """Pre-clustering for pooling: PCA of the log2-normalised top-variance genes, seeded
    k-means (about one cluster per ``cells_per_cluster`` cells, at most 50), clusters below
    ``min_size`` merged into the nearest. Fewer than ``2 * min_size`` cells: one cluster.
    ``counts``: cells × genes (no empty cell). Deterministic for a given ``seed``."""
    m = _csr(counts)
    n = m.shape[0]
    if n < 2 * min_size:
        return np.zeros(n, dtype=np.int64)
    with single_threaded_blas():
        y = _log_normalized_top(m, n_top_genes)
        cov = y.T @ y
        w, v = np.linalg.eigh(cov)
        d = min(n_pcs, y.shape[1])
        pcs = (y @ v[:, ::-1][:, :d]).astype(np.float32).astype(np.float64)
    k = int(min(50, max(2, n // cells_per_cluster)))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5C2A, n])))
    return _merge_small(pcs, _kmeans(pcs, k, rng), min_size)


def pooled_size_factors(
    counts: Any,
    *,
    clusters: np.ndarray | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    min_mean: float = DEFAULT_MIN_MEAN,
    max_cluster_size: int | None = DEFAULT_MAX_CLUSTER_SIZE,
    ref_cluster: int | None = None,
) -> np.ndarray:
    """``scuttle::pooledSizeFactors`` (``scran::computeSumFactors``) on a cells × genes count
    matrix, given optional cluster labels. Returns size factors centred to mean one over the
    cells with positive factors; empty cells get 0."""
    part = _cluster_factors(_csr(counts), clusters, sizes, min_mean, max_cluster_size)
    ref = ref_cluster if ref_cluster is not None else int(np.argmax(part.n_expressed))
    scale = rescale_factors(part.profiles, part.profiles[ref], min_mean)
    sf = part.factors(scale)
    pos = sf > 0
    return sf / sf[pos].mean() if pos.any() else sf


@dataclass
class ChunkScran:
    """Within-cluster size factors of one chunk of cells, before rescaling across clusters:
    ``nf`` per cell (0 for empty cells), ``labels`` per cell (-1 for empty cells),
    ``profiles`` (clusters × genes: each cluster's average cell) and ``n_expressed`` (genes
    with a positive average, per cluster; the reference is the cluster with the most)."""

    nf: np.ndarray
    labels: np.ndarray
    profiles: np.ndarray

    @property
    def n_expressed(self) -> np.ndarray:
        """Genes with a positive average per cluster."""
        return (self.profiles > 0).sum(axis=1)

    def factors(self, cluster_scale: np.ndarray) -> np.ndarray:
        """Per-cell factors ``nf * cluster_scale[label]`` (0 for empty cells)."""
        out = np.zeros(len(self.nf))
        ok = self.labels >= 0
        if ok.any():
            out[ok] = self.nf[ok] * np.asarray(cluster_scale)[self.labels[ok]]
        return out


def _cluster_factors(
    m: Any, clusters: np.ndarray | None, sizes: Sequence[int], min_mean: float,
    max_cluster_size: int | None,
) -> ChunkScran:
    n, g = m.shape
    if len(set(int(s) for s in sizes)) != len(sizes) or any(int(s) < 1 for s in sizes):
        raise InvalidInputError(f"scran pool sizes must be distinct positive integers, got {list(sizes)}")
    lib = np.asarray(m.sum(axis=1)).ravel()
    nonempty = lib > 0
    labels = np.full(n, -1, dtype=np.int64)
    if clusters is None:
        labels[nonempty] = 0
    else:
        clusters = np.asarray(clusters)
        if len(clusters) != n:
            raise InvalidInputError(f"clusters has {len(clusters)} labels for {n} cells")
        _, inv = np.unique(clusters, return_inverse=True)
        labels[nonempty] = inv.ravel()[nonempty]
        labels[nonempty] = np.unique(labels[nonempty], return_inverse=True)[1].ravel()
    labels = limit_cluster_size(labels, max_cluster_size)
    k = int(labels.max()) + 1 if nonempty.any() else 0
    nf = np.zeros(n)
    profiles = np.zeros((k, g))
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        nf[idx], profiles[c] = _per_cluster(m[idx], sizes, min_mean)
    return ChunkScran(nf=nf, labels=labels, profiles=profiles)


def chunk_size_factors(
    counts: Any,
    *,
    seed: int = 0,
    sizes: Sequence[int] = DEFAULT_SIZES,
    min_mean: float = DEFAULT_MIN_MEAN,
    max_cluster_size: int | None = DEFAULT_MAX_CLUSTER_SIZE,
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE,
) -> ChunkScran:
    """Steps 1-3 on one chunk of cells (cells × genes counts): quick clusters of its
    non-empty cells, then per-cluster deconvolution. Rescale with :func:`rescale_factors`."""
    m = _csr(counts)
    lib = np.asarray(m.sum(axis=1)).ravel()
    nonempty = np.flatnonzero(lib > 0)
    clusters = np.full(m.shape[0], -1, dtype=np.int64)
    if nonempty.size:
        clusters[nonempty] = quick_cluster(m[nonempty], min_size=min_cluster_size, seed=seed)
    return _cluster_factors(m, clusters, sizes, min_mean, max_cluster_size)


def scran_size_factors(
    counts: Any,
    *,
    seed: int = 0,
    sizes: Sequence[int] = DEFAULT_SIZES,
    min_mean: float = DEFAULT_MIN_MEAN,
    max_cluster_size: int | None = DEFAULT_MAX_CLUSTER_SIZE,
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE,
) -> np.ndarray:
    """``computeSumFactors(x, clusters=quickCluster(x))`` in memory: size factors of the
    cells of ``counts`` (cells × genes), centred to mean one; empty cells get 0."""
    part = chunk_size_factors(counts, seed=seed, sizes=sizes, min_mean=min_mean,
                              max_cluster_size=max_cluster_size, min_cluster_size=min_cluster_size)
    if len(part.profiles) == 0:
        return part.nf
    ref = int(np.argmax(part.n_expressed))
    sf = part.factors(rescale_factors(part.profiles, part.profiles[ref], min_mean))
    pos = sf > 0
    return sf / sf[pos].mean() if pos.any() else sf
