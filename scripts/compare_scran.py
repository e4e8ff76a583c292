"""Compare scmf's scran pooled size factors with R's scran::computeSumFactors (opt-in).

Needs R with scran (Debian: ``apt-get install -y r-bioc-scran``). One command::

    python scripts/compare_scran.py                 # simulated 4,000 cells + the PBMC demo
    python scripts/compare_scran.py --json out.json # also write the numbers

For each dataset it runs, on the same count matrix:

* ``noclust``: deconvolution without pre-clustering, R ``calculateSumFactors(x)`` vs
  ``pooled_size_factors(x)`` (the same algorithm, so this checks the implementation);
* ``same clusters``: both given R's ``quickCluster(x)`` clusters;
* ``full``: R ``calculateSumFactors(x, clusters=quickCluster(x))`` vs scmf's
  ``scran_size_factors(x)`` (its own quick clustering) — what a user of either gets;

and reports the Pearson correlation of log size factors (the issue's bar: >= 0.99) and the
largest relative difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

R_CODE = r"""
suppressMessages({library(scran); library(Matrix)})
args <- commandArgs(trailingOnly = TRUE)
x <- as(readMM(file.path(args[1], "counts.mtx")), "CsparseMatrix")
set.seed(0)
t0 <- Sys.time()
cl <- quickCluster(x)
sf_full <- calculateSumFactors(x, clusters = cl, min.mean = 0.1)
t_full <- as.numeric(difftime(Sys.time(), t0, units = "secs"))
sf_noclust <- calculateSumFactors(x, min.mean = 0.1)
write.csv(data.frame(full = sf_full, noclust = sf_noclust, cluster = as.integer(cl)),
          file.path(args[1], "r_out.csv"), row.names = FALSE)
cat(t_full, "\n", file = file.path(args[1], "r_time.txt"))
"""


def simulate(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    """Negative-binomial counts: 6 cell types (10% of genes 4-fold up in each), log-normal
    cell size factors (sd 0.5), dispersion 0.2; cells × genes."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.3, 2.0, n_genes)
    types = rng.integers(0, 6, n_cells)
    fold = np.ones((6, n_genes))
    for t in range(6):
        fold[t, rng.choice(n_genes, n_genes // 10, replace=False)] = 4.0
    size = np.exp(rng.normal(0.0, 0.5, n_cells))
    mu = size[:, None] * base[None, :] * fold[types]
    lam = rng.gamma(1 / 0.2, mu * 0.2)
    return sp.csr_matrix(rng.poisson(lam).astype(np.float64))


def pbmc_demo() -> sp.csr_matrix | None:
    """The embedded 559-cell PBMC sample (real 10x counts), genes with any count."""
    try:
        import anndata as ad

        from scmf_shards.demo import demo_h5ad_path

        x = sp.csr_matrix(ad.read_h5ad(demo_h5ad_path()).X).astype(np.float64)
    except (ImportError, FileNotFoundError):
        return None
    return x[:, np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)]


def run_r(x: sp.csr_matrix, rscript: str, work: Path) -> dict[str, np.ndarray | float]:
    scipy.io.mmwrite(str(work / "counts.mtx"), x.T.tocoo())
    (work / "run.R").write_text(R_CODE)
    subprocess.run([rscript, str(work / "run.R"), str(work)], check=True)
    import csv

    with open(work / "r_out.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "full": np.array([float(r["full"]) for r in rows]),
        "noclust": np.array([float(r["noclust"]) for r in rows]),
        "cluster": np.array([int(r["cluster"]) for r in rows]),
        "time": float((work / "r_time.txt").read_text().split()[0]),
    }


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Pearson correlation of log factors and the largest relative difference."""
    ok = (a > 0) & (b > 0)
    la, lb = np.log(a[ok]), np.log(b[ok])
    return {"log_pearson": float(np.corrcoef(la, lb)[0, 1]),
            "max_rel_diff": float(np.max(np.abs(a[ok] - b[ok]) / b[ok]))}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; exit 1 when a correlation is below 0.99."""
    from scmf_loader.preprocess.scran import pooled_size_factors, scran_size_factors

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--genes", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rscript", default=shutil.which("Rscript") or "Rscript")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if shutil.which(args.rscript) is None:
        print("Rscript not found: install R and scran (apt-get install -y r-bioc-scran)", file=sys.stderr)
        return 2
    datasets = {f"simulated {args.cells} cells x {args.genes} genes": simulate(args.cells, args.genes, args.seed)}
    demo = pbmc_demo()
    if demo is not None:
        datasets[f"PBMC demo {demo.shape[0]} cells x {demo.shape[1]} genes (real 10x)"] = demo
    results = {}
    worst = 1.0
    for name, x in datasets.items():
        with tempfile.TemporaryDirectory() as tmp:
            r = run_r(x, args.rscript, Path(tmp))
        t0 = time.perf_counter()
        ours_full = scran_size_factors(x, min_mean=0.1)
        t_ours = time.perf_counter() - t0
        ours_noclust = pooled_size_factors(x, min_mean=0.1)
        ours_same = pooled_size_factors(x, clusters=r["cluster"], min_mean=0.1)
        r_same = r["full"]  # R with its quickCluster clusters: the clusters ours_same was given
        res = {
            "noclust": compare(ours_noclust, r["noclust"]),
            "same_clusters": compare(ours_same, r_same),
            "full": compare(ours_full, r["full"]),
            "seconds": {"scmf_full": round(t_ours, 2), "R_full": round(float(r["time"]), 2)},
            "n_clusters": {"R_quickCluster": int(len(np.unique(r["cluster"])))},
        }
        results[name] = res
        worst = min(worst, res["noclust"]["log_pearson"], res["same_clusters"]["log_pearson"],
                    res["full"]["log_pearson"])
        print(f"## {name}")
        for k in ("noclust", "same_clusters", "full"):
            print(f"  {k:14s} log-SF Pearson r = {res[k]['log_pearson']:.6f}   "
                  f"max rel diff = {res[k]['max_rel_diff']:.2e}")
        print(f"  time (full): scmf {res['seconds']['scmf_full']} s, R {res['seconds']['R_full']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"worst correlation {worst:.6f} ({'OK' if worst >= 0.99 else 'BELOW 0.99'})")
    return 0 if worst >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
