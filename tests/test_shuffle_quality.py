"""Global pre-shuffle quality: inputs each sorted by cell type come out of the converter with
every 256-cell block a near-uniform sample of the whole dataset (chi-square per block)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import hpc_genes, write_counts_h5ad
from scipy import stats

from scmf_loader.opening import open_dataset
from scmf_shards.convert import convert_h5ad

BLOCK = 256
TYPES = ["B cell", "NK cell", "T cell", "monocyte", "platelet"]
# cells of each type per input; every input is written sorted by cell type
COMPOSITION = {
    "a.h5ad": {"T cell": 20_000, "B cell": 12_000, "NK cell": 6_000, "platelet": 2_000},
    "b.h5ad": {"monocyte": 15_000, "B cell": 10_000, "NK cell": 5_000},
    "c.h5ad": {"T cell": 4_000, "monocyte": 24_000, "platelet": 2_000},
}


def _rejection_rates(labels: np.ndarray, expected: np.ndarray, alphas: tuple[float, ...]) -> tuple[int, list[float]]:
    """Chi-square goodness of fit of each full block of ``labels`` (codes) against
    proportions ``expected``: the number of blocks and the fraction rejected at each alpha."""
    blocks = labels[: len(labels) // BLOCK * BLOCK].reshape(-1, BLOCK)
    counts = np.stack([np.bincount(b, minlength=len(expected)) for b in blocks])
    exp = BLOCK * expected
    stat = ((counts - exp) ** 2 / exp).sum(axis=1)
    p = stats.chi2.sf(stat, df=len(expected) - 1)
    return len(blocks), [float((p < a).mean()) for a in alphas]


@pytest.mark.slow
def test_blocks_of_cell_type_sorted_inputs_match_the_dataset(tmp_path: Path) -> None:
    genes = hpc_genes()[:40]
    paths = []
    for i, (name, comp) in enumerate(COMPOSITION.items()):
        cell_type = [t for t in TYPES for _ in range(comp.get(t, 0))]  # sorted by cell type
        paths.append(write_counts_h5ad(tmp_path / name, len(cell_type), genes, seed=i, density=0.05,
                                       obs={"cell_type": cell_type}))
    out = tmp_path / "ds"
    m = convert_h5ad(paths, out, shard_size=10_000, chunk_size=4_096, obs_columns=("cell_type",), quiet=True)
    assert m.n_cells == 100_000
    store = open_dataset(out)
    cats = list(store.categories["cell_type"])
    assert cats == TYPES
    per_shard = [np.asarray(store.obs_codes(s, "cell_type"), dtype=np.int64) for s in range(store.n_shards)]
    totals = np.bincount(np.concatenate(per_shard), minlength=len(cats))
    proportions = totals / totals.sum()
    expected_totals = [sum(c.get(t, 0) for c in COMPOSITION.values()) for t in TYPES]
    assert totals.tolist() == expected_totals
    assert (BLOCK * proportions).min() >= 5  # the chi-square approximation holds

    alphas = (0.01, 0.05)
    n_blocks, rejected = 0, np.zeros(len(alphas))
    for codes in per_shard:  # blocks never straddle shards: the loader reads them this way
        n, rates = _rejection_rates(codes, proportions, alphas)
        n_blocks += n
        rejected += np.asarray(rates) * n
    rates = rejected / n_blocks
    assert n_blocks == 390
    assert rates[0] <= 3 * alphas[0], rates  # about the nominal rate, never a large multiple
    assert rates[1] <= 2 * alphas[1], rates

    # the test has power: blocks of the inputs in their own (sorted) order nearly all reject
    raw = np.concatenate([np.repeat([cats.index(t) for t in c], list(c.values())) for c in COMPOSITION.values()])
    _, raw_rates = _rejection_rates(raw, proportions, alphas)
    assert raw_rates[0] > 0.95
