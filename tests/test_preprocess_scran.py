"""scran pooled size factors: the deconvolution solve, recovery of true factors, empty cells,
chunked (converter) form, and (when R with scran is installed) equality with scran."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from preprocess_helpers import simulate_sized_counts

from scmf_loader.preprocess.scran import (
    LOWWEIGHT,
    _solve_ring,
    chunk_size_factors,
    generate_sphere,
    limit_cluster_size,
    pooled_size_factors,
    quick_cluster,
    rescale_factors,
    scran_size_factors,
)


def _simulate(n_cells: int, n_genes: int, seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    x, size = simulate_sized_counts(n_cells, n_genes, seed)
    return sp.csr_matrix(x), size


@pytest.mark.parametrize("n", [5, 30, 64, 101])
def test_ring_solve_is_the_least_squares_solution(n: int) -> None:
    rng = np.random.default_rng(n)
    sizes = [s for s in (3, 5, 8, 21) if s <= n]
    pool = rng.random((len(sizes), n))
    rows, rhs = [], []
    for i, s in enumerate(sizes):
        for w in range(n):
            r = np.zeros(n)
            r[(w + np.arange(s)) % n] = 1
            rows.append(r)
            rhs.append(pool[i, w])
    for p in range(n):
        r = np.zeros(n)
        r[p] = np.sqrt(LOWWEIGHT)
        rows.append(r)
        rhs.append(np.sqrt(LOWWEIGHT) * 0.3)
    ref = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    np.testing.assert_allclose(_solve_ring(pool, sizes, n, 0.3), ref, rtol=1e-9, atol=1e-12)


def test_sphere_and_cluster_limits() -> None:
    assert generate_sphere(np.array([5.0, 1.0, 4.0, 2.0, 3.0])).tolist() == [1, 4, 0, 2, 3]
    labels = limit_cluster_size(np.array([0] * 7 + [1] * 2 + [-1]), 3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 3, 3, -1]


def test_recovers_true_size_factors() -> None:
    x, size = _simulate(1200, 800, 1)
    sf = scran_size_factors(x)
    assert sf.mean() == pytest.approx(1.0)
    assert np.corrcoef(np.log(sf), np.log(size))[0, 1] > 0.95
    assert len(np.unique(quick_cluster(x))) >= 2
    assert np.array_equal(sf, scran_size_factors(x))  # deterministic


def test_scale_equivariance_and_empty_cells() -> None:
    x, _ = _simulate(400, 500, 2)
    x = x.tolil()
    x[7, :] = 0
    x = x.tocsr()
    sf = pooled_size_factors(x)
    assert sf[7] == 0.0
    assert sf[sf > 0].mean() == pytest.approx(1.0)
    # with every expressed gene used (no absolute min_mean cut), scaling all counts is a no-op
    np.testing.assert_allclose(pooled_size_factors(x * 2, min_mean=1e-8),
                               pooled_size_factors(x, min_mean=1e-8), rtol=1e-9)


def test_chunked_form_equals_in_memory_form() -> None:
    x, _ = _simulate(500, 400, 3)
    part = chunk_size_factors(x, seed=5)
    ref = int(np.argmax(part.n_expressed))
    sf = part.factors(rescale_factors(part.profiles, part.profiles[ref], 0.1))
    np.testing.assert_allclose(sf / sf.mean(), scran_size_factors(x, seed=5), rtol=1e-12)


R_SCRIPT = r"""
suppressMessages({library(scran); library(Matrix)})
a <- commandArgs(trailingOnly = TRUE)
x <- as(readMM(file.path(a[1], "x.mtx")), "CsparseMatrix")
cl <- read.csv(file.path(a[1], "cl.csv"))$cl
write.csv(data.frame(noclust = calculateSumFactors(x, min.mean = 0.1),
                     clust = calculateSumFactors(x, clusters = cl, min.mean = 0.1)),
          file.path(a[1], "out.csv"), row.names = FALSE)
"""


def _have_scran() -> bool:
    if shutil.which("Rscript") is None:
        return False
    r = subprocess.run(["Rscript", "-e", "suppressMessages(library(scran))"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_equals_r_scran(tmp_path: Path) -> None:
    import scipy.io

    if not _have_scran():
        if os.environ.get("SCMF_REQUIRE_R") == "1":  # set by .ci/run, which installs R scran
            pytest.fail("SCMF_REQUIRE_R=1 but Rscript with scran is not available")
        pytest.skip("R with scran not installed (apt-get install r-bioc-scran)")

    x, _ = _simulate(450, 600, 4)
    clusters = np.repeat([1, 2, 3], 150)
    scipy.io.mmwrite(str(tmp_path / "x.mtx"), x.T.tocoo())
    (tmp_path / "cl.csv").write_text("cl\n" + "\n".join(map(str, clusters)) + "\n")
    (tmp_path / "run.R").write_text(R_SCRIPT)
    subprocess.run(["Rscript", str(tmp_path / "run.R"), str(tmp_path)], check=True, capture_output=True)
    out = np.genfromtxt(tmp_path / "out.csv", delimiter=",", names=True)
    np.testing.assert_allclose(pooled_size_factors(x), out["noclust"], rtol=1e-9)
    np.testing.assert_allclose(pooled_size_factors(x, clusters=clusters), out["clust"], rtol=1e-9)
