"""PerturbationDataset and PerturbationSampler (scmf_loader.perturbation) on a converted dataset
whose obs holds the normalised perturbation columns (made by scmf_shards.perturbation from a
Norman/sci-Plex-style obs and passed through ``obs_columns``, as the converter's
``--perturbation`` will store them)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hpc_genes
from sampler_harness import check_determinism_and_epochs, check_resume, run_all

from scmf_loader.dataloader import CellDataLoader
from scmf_loader.dataset import CellDataset
from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.perturbation import (
    PERTURBATION_TYPES,
    MissingControlError,
    PerturbationBatch,
    PerturbationDataset,
    PerturbationSampler,
    PerturbationSchemaError,
)
from scmf_loader.vocab import GeneVocab

# raw label → (perturbation, type, target symbols, dose µM, time h); the time comes from the
# label's "(…, 24h)" or the "time" column, whichever the cell has
LABELS = {
    "CEBPA+CEBPB": ("CEBPA+CEBPB", "combination", ("CEBPA", "CEBPB"), math.nan),
    "CEBPA_only": ("CEBPA", "genetic", ("CEBPA",), math.nan),
    "sgKLF1_2": ("KLF1", "genetic", ("KLF1",), math.nan),
    "non-targeting": ("control", "control", (), math.nan),
    "NT": ("control", "control", (), math.nan),
    "Dexamethasone (10 nM)": ("Dexamethasone", "chemical", (), 0.01),
    "Nutlin-3a (1000nM)": ("Nutlin-3a", "chemical", (), 1.0),
    "DMSO": ("control", "control", (), math.nan),
}
TIMES = {"24h": 24.0, "3 d": 72.0}
N_CELLS = 1200


def raw_obs(n: int = N_CELLS, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "condition": rng.choice(list(LABELS), n, p=[0.1, 0.1, 0.1, 0.15, 0.1, 0.15, 0.15, 0.15]),
        "time": rng.choice(list(TIMES), n),
        "plate": rng.choice(["P1", "P2", "P3"], n),
        "cell_line": rng.choice(["K562", "A549"], n),
    }, index=[f"cell{i}" for i in range(n)])


def write_h5ad(path: Path, obs: pd.DataFrame, genes: list[str], seed: int = 0) -> Path:
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    x = sp.random(len(obs), len(genes), density=0.05, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def normalised(obs: pd.DataFrame, vocab: GeneVocab) -> pd.DataFrame:
    from scmf_shards.perturbation import parse_perturbations

    table = parse_perturbations(obs, "condition,time", vocab=vocab, strict=True)
    return obs.join(table.frame)


@pytest.fixture(scope="module")
def vocab() -> GeneVocab:
    return GeneVocab.human_protein_coding()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, vocab: GeneVocab) -> tuple[Path, pd.DataFrame]:
    obs = normalised(raw_obs(), vocab)
    genes = hpc_genes()[:300]
    return write_h5ad(tmp_path_factory.mktemp("pert") / "screen.h5ad", obs, genes), obs


@pytest.fixture(scope="module")
def dataset_dir(source: tuple[Path, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.perturbation.schema import COLUMNS

    out = tmp_path_factory.mktemp("pert_ds") / "ds"
    convert_h5ad([source[0]], out, obs_columns=(*COLUMNS, "condition", "plate", "cell_line"), shard_size=300,
                 chunk_size=256, quiet=True)
    return out


def _decode(ds: CellDataset, column: str, codes: torch.Tensor) -> list[str | None]:
    return ds.decode(column, codes.numpy())


def check_batch(ds: PerturbationDataset, batch: PerturbationBatch, obs: pd.DataFrame, vocab: GeneVocab,
                plain: CellDataset) -> None:
    """Every field against the raw labels (written-out expectations), and every control a
    control of the same plate and cell line, whose rows are that cell's rows."""
    cells, controls = batch["cells"], batch["controls"]
    n = len(cells)
    assert len(controls) == n
    names = ds.cell_names(cells.cell_ids)
    for i, name in enumerate(names):
        row = obs.loc[name]
        perturbation, kind, targets, dose = LABELS[row["condition"]]
        assert ds.perturbations[int(batch["perturbation"][i])] == perturbation
        assert PERTURBATION_TYPES[int(batch["perturbation_type"][i])] == kind
        want = [vocab.lookup(t) for t in targets]
        got = batch["targets"][i].tolist()
        assert got[: len(want)] == want
        assert all(t == 0 for t in got[len(want):])
        d = float(batch["dose_um"][i])
        assert (math.isnan(d) and math.isnan(dose)) or d == pytest.approx(dose, rel=1e-6)
        assert float(batch["time_h"][i]) == TIMES[row["time"]]
        assert bool(batch["is_control"][i]) is (kind == "control")
    # matched controls: control cells sharing the match_on values, distinct from the cell
    ctrl_names = ds.cell_names(batch["control_ids"])
    torch.testing.assert_close(controls.cell_ids, batch["control_ids"])
    for name, ctrl in zip(names, ctrl_names, strict=True):
        assert LABELS[obs.loc[ctrl, "condition"]][1] == "control"
        for column in ds.match_on:
            assert obs.loc[ctrl, column] == obs.loc[name, column]
        assert ctrl != name
    assert _decode(ds, "is_control", controls.obs["is_control"]) == ["True"] * n
    rows = plain.__getitems__(batch["control_ids"].numpy())  # the control cells' own rows
    torch.testing.assert_close(controls.indptr, rows.indptr)
    torch.testing.assert_close(controls.indices, rows.indices)
    torch.testing.assert_close(controls.values, rows.values)


def test_batches_fields_and_matched_controls(dataset_dir: Path, source: tuple[Path, pd.DataFrame], vocab: GeneVocab) -> None:
    ds = PerturbationDataset(dataset_dir, seed=3)
    assert ds.match_on == ("plate", "cell_line")  # the default columns this dataset keeps
    assert sorted(ds.perturbations) == sorted({v[0] for v in LABELS.values()})
    loader = CellDataLoader(ds, batch_size=64, num_workers=0, seed=3)
    plain = CellDataset(dataset_dir)
    n = 0
    for batch in loader:
        assert isinstance(batch, PerturbationBatch)
        check_batch(ds, batch, source[1], vocab, plain)
        n += batch.n_cells
    assert n == N_CELLS // 64 * 64
    assert batch["targets"].shape[1] == 2  # padded to the widest target list (CEBPA+CEBPB)


def pairs(ds: PerturbationDataset, loader: CellDataLoader) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b["cells"].cell_ids.numpy().copy(), b["control_ids"].numpy().copy()) for b in loader]


def test_same_seed_same_pairs_other_seed_or_epoch_other_pairs(dataset_dir: Path) -> None:
    def run(seed: int, epoch: int = 0) -> dict[int, int]:
        ds = PerturbationDataset(dataset_dir, seed=seed)
        sampler = PerturbationSampler(ds, 60, k=12, seed=seed)
        loader = CellDataLoader(ds, num_workers=0, sampler=sampler)
        loader.set_epoch(epoch)
        out: dict[int, int] = {}
        for cells, ctrls in pairs(ds, loader):
            out.update(zip(cells.tolist(), ctrls.tolist(), strict=True))
        return out

    a, b = run(5), run(5)
    assert a == b  # two runs, one seed: identical pairs
    other = run(6)
    common = set(a) & set(other)
    assert sum(a[c] != other[c] for c in common) > 0.8 * len(common)
    later = run(5, epoch=1)
    common = set(a) & set(later)
    assert sum(a[c] != later[c] for c in common) > 0.8 * len(common)
    # controls are spread over the group's controls, not one per group
    assert len(set(a.values())) > 50


def test_resume_gives_the_same_pairs(dataset_dir: Path) -> None:
    def loader() -> CellDataLoader:
        ds = PerturbationDataset(dataset_dir, seed=1)
        return CellDataLoader(ds, num_workers=0, sampler=PerturbationSampler(ds, 50, k=10, seed=1))

    ref = loader()
    ref.set_epoch(2)
    full = pairs(ref.dataset, ref)
    first = loader()
    first.set_epoch(2)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = pairs(resumed.dataset, resumed)
    assert len(rest) == len(full) - 5
    for (a, b), (c, d) in zip(rest, full[5:], strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_workers_and_padded_output(dataset_dir: Path) -> None:
    ds = PerturbationDataset(dataset_dir, seed=2)
    plain = [b for b in CellDataLoader(ds, batch_size=100, num_workers=0, seed=2)]
    with_workers = list(CellDataLoader(ds, batch_size=100, num_workers=2, seed=2, persistent_workers=False))
    assert len(plain) == len(with_workers)
    for a, b in zip(plain, with_workers, strict=True):
        for key in ("control_ids", "perturbation", "targets", "is_control", "time_h"):
            torch.testing.assert_close(a[key], b[key])
        torch.testing.assert_close(a["controls"].values, b["controls"].values)
    # later epochs through workers: the sampler sets the dataset's epoch before workers start
    # (persistent workers keep the copy they started with; see docs/perturbation.md)
    def epoch1(workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        d = PerturbationDataset(dataset_dir, seed=2)
        loader = CellDataLoader(d, num_workers=workers, sampler=PerturbationSampler(d, 100, k=20, seed=2),
                                persistent_workers=False)
        loader.set_epoch(1)
        return pairs(d, loader)

    for (a, b), (c, d) in zip(epoch1(0), epoch1(2), strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    padded = next(iter(CellDataLoader(ds, batch_size=32, num_workers=0, seed=2, output="padded", max_genes=16)))
    assert padded["gene_indices"].shape == (32, 17)
    assert padded["control_gene_indices"].shape == (32, 17)
    assert padded["control_attention_mask"].dtype == torch.bool
    assert padded["perturbation"].shape == (32,)
    assert padded["cell_ids"].shape == (32,)
    binned = next(iter(CellDataLoader(ds, batch_size=32, num_workers=0, seed=2, output="binned", n_bins=5, max_genes=16)))
    cells_only = plain[0]["cells"].to_binned(5, 16)
    assert binned["control_expression"].shape == (32, 17)
    assert int(binned["control_expression"].max()) <= 4
    assert set(cells_only) <= set(binned)
    with pytest.raises(ConfigurationError, match="dense"):
        next(iter(CellDataLoader(ds, batch_size=32, num_workers=0, output="dense")))
    dense = plain[0].dense()
    assert dense["control_expression"].shape == (100, ds.n_genes)


def test_single_cell_access(dataset_dir: Path, source: tuple[Path, pd.DataFrame], vocab: GeneVocab) -> None:
    ds = PerturbationDataset(dataset_dir, match_on=["cell_line"], obs_columns=["plate"])
    assert set(ds.obs_columns) >= {"plate", "cell_line", "perturbation", "is_control"}
    assert "condition" not in ds.obs_columns
    obs = source[1]
    for i in (0, 7, len(ds) - 1):
        item = ds[i]
        row = obs.loc[ds.cell_names([i])[0]]
        perturbation, kind, targets, _ = LABELS[row["condition"]]
        assert item["perturbation_name"] == perturbation
        assert item["perturbation_type"] == kind
        assert item["targets"].tolist() == [vocab.lookup(t) for t in targets]
        assert item["time_h"] == TIMES[row["time"]]
        assert obs.loc[ds.cell_names([item["control_id"]])[0], "cell_line"] == row["cell_line"]
        assert item["control_id"] == int(ds[[i]]["control_ids"][0])


def stored(obs: pd.DataFrame) -> pd.DataFrame:
    """obs as the shards store it (string categories, NaN missing), for the AnnData quick path."""
    return pd.DataFrame({c: pd.Categorical([None if pd.isna(v) else str(v) for v in obs[c]]) for c in obs},
                        index=obs.index)


def quick(obs: pd.DataFrame, vocab: GeneVocab) -> object:
    import anndata as ad
    import scipy.sparse as sp

    genes = hpc_genes()[:50]
    x = sp.random(len(obs), len(genes), density=0.2, format="csr", random_state=0).astype(np.float32)
    return ad.AnnData(X=x, obs=stored(obs), var=pd.DataFrame(index=genes))


def test_bad_input(vocab: GeneVocab) -> None:
    obs = normalised(raw_obs(200, seed=4), vocab)
    with pytest.raises(ConfigurationError, match=r"match_on column\(s\) \['batch'\] not kept"):
        PerturbationDataset(quick(obs, vocab), vocab, match_on=["plate", "batch"])
    # a match group without controls: every control of HeLa removed
    obs2 = obs.copy()
    obs2["cell_line"] = np.where(obs2["is_control"], obs2["cell_line"], "HeLa")
    obs2.loc[obs2.index[0], "cell_line"] = "HeLa"  # one perturbed cell left out somewhere
    with pytest.raises(MissingControlError, match=r"match group plate='P\d', cell_line='HeLa' \(\d+ perturbed cells\)"):
        PerturbationDataset(quick(obs2, vocab), vocab)
    PerturbationDataset(quick(obs2, vocab), vocab, match_on=())  # any control will do: fine
    with pytest.raises(PerturbationSchemaError, match=r"lacks the perturbation column\(s\) \['dose_um'\]"):
        PerturbationDataset(quick(obs.drop(columns=["dose_um"]), vocab), vocab)
    bad = obs.copy()
    bad["perturbation_type"] = bad["perturbation_type"].astype(str).replace("genetic", "crispr")
    with pytest.raises(PerturbationSchemaError, match="crispr"):
        PerturbationDataset(quick(bad, vocab), vocab)
    assert issubclass(MissingControlError, ScmfError)
    assert issubclass(PerturbationSchemaError, ScmfError)


def test_anndata_quick_path(source: tuple[Path, pd.DataFrame], vocab: GeneVocab) -> None:
    obs = source[1]
    adata = quick(obs, vocab)
    ds = PerturbationDataset(adata, vocab, seed=9)
    batch = ds[np.arange(0, 40)]
    check_batch(ds, batch, obs, vocab, CellDataset(adata, vocab))


def test_sampler_caps_perturbations_per_batch(dataset_dir: Path) -> None:
    ds = PerturbationDataset(dataset_dir)
    for k, bs in ((8, 48), (20, 60), (3, 18)):
        s = PerturbationSampler(ds, bs, k=k, seed=k)
        assert s.n_batches == 4 * (300 // bs)
        seen = []
        for b in s:
            assert len(b) == bs
            codes = np.concatenate([ds.obs_codes(int(np.searchsorted(ds.shard_offsets, i, "right")) - 1, "perturbation")
                                    [[i - int(ds.shard_offsets[np.searchsorted(ds.shard_offsets, i, "right") - 1])]]
                                    for i in b.tolist()])
            assert np.bincount(codes).max() <= k
            shards = np.searchsorted(ds.shard_offsets, b, side="right") - 1
            assert len(set(shards.tolist())) == 1  # a batch reads one shard
            seen.append(b)
        # every perturbation of the dataset gets into the epoch's batches
        got = np.unique(np.concatenate([ds[b]["perturbation"].numpy() for b in seen[:20]]))
        assert len(got) == len(ds.perturbations)
    with pytest.raises(ConfigurationError, match="cannot fill a batch"):
        PerturbationSampler(ds, 64, k=2)
    with pytest.raises(ConfigurationError, match="k must be"):
        PerturbationSampler(ds, 64, k=0)


def test_sampler_harness(dataset_dir: Path, source: tuple[Path, pd.DataFrame], vocab: GeneVocab) -> None:
    one_shard = PerturbationDataset(quick(source[1], vocab), vocab)  # one input = one shard
    for drop_last in (False, True):
        run_all(lambda r, w, d=drop_last: PerturbationSampler(one_shard, 40, k=8, drop_last=d, seed=3, rank=r, world_size=w),
                exact=False)
    ds = PerturbationDataset(dataset_dir)  # 4 shards: determinism and resume over ranks
    rng = np.random.default_rng(0)
    for world in (1, 3):
        make = lambda r, w: PerturbationSampler(ds, 40, k=8, seed=4, rank=r, world_size=w)  # noqa: E731
        check_determinism_and_epochs(make, world)
        check_resume(make, world, rng)


def test_loader_module_imports_no_converter_or_pandas() -> None:
    code = ("import sys, scmf_loader.perturbation as p; "
            "bad = [m for m in ('scmf_shards', 'pandas', 'anndata', 'scipy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schema_names_agree_with_the_converter() -> None:
    import scmf_loader.perturbation.dataset as loader
    from scmf_shards.perturbation import schema

    assert loader.COLUMNS == schema.COLUMNS
    assert loader.PERTURBATION_TYPES == schema.PERTURBATION_TYPES
    assert loader.TARGET_SEPARATOR == schema.TARGET_SEPARATOR
