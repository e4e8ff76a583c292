"""``scmf-convert --perturbation`` (issue 15 item 1): Norman-style CRISPR and sci-Plex-style
compound screens converted with ``--perturbation auto``; every stored label checked against
written-out expected values through ``anndata.read_zarr``; ``PerturbationDataset`` over the
result pairs each perturbed cell with a control of its match group, identically across runs;
``--strict-perturbation`` refuses unparseable labels with one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from conftest import hpc_genes

from scmf_loader.dataloader import CellDataLoader
from scmf_loader.format import read_manifest
from scmf_loader.perturbation import PerturbationDataset
from scmf_shards.cli import main

COLUMNS = ("perturbation", "perturbation_type", "perturbation_targets", "dose_um", "time_h", "is_control")
CEBPA, CEBPB, KLF1 = "ENSG00000245848", "ENSG00000172216", "ENSG00000105610"  # human_protein_coding tokens

# Norman 2019 guide identities → (perturbation, type, targets, dose µM, time h, is_control)
NORMAN = {
    "CEBPA+CEBPB": ("CEBPA+CEBPB", "combination", f"{CEBPA};{CEBPB}", None, None, "False"),
    "CEBPA_only": ("CEBPA", "genetic", CEBPA, None, None, "False"),
    "sgCEBPA_2": ("CEBPA", "genetic", CEBPA, None, None, "False"),
    "KLF1+ctrl": ("KLF1", "genetic", KLF1, None, None, "False"),
    "ctrl": ("control", "control", None, None, None, "True"),
    "non-targeting": ("control", "control", None, None, None, "True"),
    "NT": ("control", "control", None, None, None, "True"),
    "safe-targeting": ("control", "control", None, None, None, "True"),
    "NegCtrl0_NegCtrl0__NegCtrl0_NegCtrl0": ("control", "control", None, None, None, "True"),
}
# sci-Plex (product_name, dose_value, dose_unit, time) → expected; stored floats are repr strings
SCIPLEX = {
    ("Dexamethasone", 10.0, "nM", 24): ("Dexamethasone", "chemical", None, "0.01", "24.0", "False"),
    ("Dexamethasone", 100.0, "nM", 24): ("Dexamethasone", "chemical", None, "0.1", "24.0", "False"),
    ("Dexamethasone", 1000.0, "nM", 72): ("Dexamethasone", "chemical", None, "1.0", "72.0", "False"),
    ("Nutlin-3a", 0.1, "uM", 24): ("Nutlin-3a", "chemical", None, "0.1", "24.0", "False"),
    ("Nutlin-3a", 500.0, "nM", 72): ("Nutlin-3a", "chemical", None, "0.5", "72.0", "False"),
    ("Vehicle", 0.0, "nM", 24): ("control", "control", None, "0.0", "24.0", "True"),
    ("DMSO", 0.0, "nM", 72): ("control", "control", None, "0.0", "72.0", "True"),
}


def _write(path: Path, obs: pd.DataFrame, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    genes = hpc_genes()[:200]
    x = sp.random(len(obs), len(genes), density=0.1, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def norman_obs(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "guide_identity": pd.Categorical(rng.choice(list(NORMAN), n)),
        "gem_group": pd.Categorical(rng.choice(["1", "2", "3"], n)),
        "UMI_count": rng.integers(1000, 9000, n).astype(float),
    }, index=[f"n{i}" for i in range(n)])


def sciplex_obs(n: int = 420, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keys = list(SCIPLEX)
    rows = [keys[i] for i in rng.integers(0, len(keys), n)]
    frame = pd.DataFrame(rows, columns=["product_name", "dose_value", "dose_unit", "time"])
    frame["target"] = [{"Dexamethasone": "NR3C1", "Nutlin-3a": "MDM2"}.get(r[0]) for r in rows]
    frame["cell_line"] = pd.Categorical(rng.choice(["A549", "MCF7", "K562"], n))
    frame.index = [f"s{i}" for i in range(n)]
    return frame


def stored_obs(out: Path) -> pd.DataFrame:
    """Every cell's obs (as stored strings; None = missing), read with anndata."""
    frames = []
    for s in read_manifest(out).shards:
        obs = ad.read_zarr(out / s.path).obs
        frames.append(pd.DataFrame({c: obs[c].astype(object).where(obs[c].notna(), None) for c in obs.columns},
                                   index=obs.index))
    return pd.concat(frames)


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def norman(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, Any]:
    d = tmp_path_factory.mktemp("norman")
    obs = norman_obs()
    path = _write(d / "norman.h5ad", obs, 0)
    result = _invoke("h5ad", str(path), "-o", str(d / "out"), "--perturbation", "auto",
                     "--obs-columns", "gem_group", "--shard-size", "200")
    return d / "out", obs, result


def test_norman_labels_stored(norman: tuple[Path, pd.DataFrame, Any]) -> None:
    out, obs, result = norman
    assert result.exit_code == 0, result.output
    assert "perturbation columns:" in result.output  # the report on stderr
    stored = stored_obs(out)
    assert len(stored) == len(obs)
    assert list(stored.columns) == ["source", "gem_group", *COLUMNS, "library_size"]
    for cell, label in obs["guide_identity"].astype(str).items():
        assert tuple(stored.loc[cell, list(COLUMNS)]) == NORMAN[label], (cell, label)
        assert stored.loc[cell, "gem_group"] == obs.loc[cell, "gem_group"]
    m = read_manifest(out)
    section = m.perturbation["norman.h5ad"]
    assert section["columns"]["labels"] == [["guide_identity", "genetic"]]
    counts = obs["guide_identity"].astype(str).map(lambda v: NORMAN[v][1]).value_counts()
    assert section["counts"] == {k: int(counts.get(k, 0)) for k in
                                 ("control", "genetic", "chemical", "combination", "unknown")}
    assert section["unknown"] == {}
    raw = json.loads((out / "manifest.json").read_text())
    assert list(raw).index("perturbation") == list(raw).index("sources") + 1


def _pairs(out: Path, seed: int) -> dict[int, int]:
    ds = PerturbationDataset(out, seed=seed)
    loader = CellDataLoader(ds, batch_size=50, num_workers=0, seed=seed)
    pairs: dict[int, int] = {}
    for batch in loader:
        pairs.update(zip(batch["cells"].cell_ids.tolist(), batch["control_ids"].tolist(), strict=True))
    return pairs


def test_norman_matched_controls(norman: tuple[Path, pd.DataFrame, Any]) -> None:
    out, obs, _ = norman
    ds = PerturbationDataset(out, seed=4)
    assert ds.match_on == ("gem_group",)
    a, b = _pairs(out, 4), _pairs(out, 4)
    assert a == b  # two runs, one seed: the same pairs
    assert len(a) >= len(obs) - 50
    cells = ds.cell_names(np.array(list(a)))
    controls = ds.cell_names(np.array(list(a.values())))
    for cell, ctrl in zip(cells, controls, strict=True):
        assert NORMAN[obs.loc[ctrl, "guide_identity"]][5] == "True"  # a control cell
        assert obs.loc[ctrl, "gem_group"] == obs.loc[cell, "gem_group"]  # of the same gem group


def test_sciplex_from_yaml(tmp_path: Path) -> None:
    obs = sciplex_obs()
    _write(tmp_path / "sciplex.h5ad", obs, 1)
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  paths: [sciplex.h5ad]\n  output: out\n  perturbation: auto\n"
                      "  strict_perturbation: true\n  obs_columns: [cell_line]\n  shard_size: 150\n")
    result = _invoke("h5ad", "--config", str(config), "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    stored = stored_obs(out)
    for cell, row in obs.iterrows():
        key = (row["product_name"], row["dose_value"], row["dose_unit"], row["time"])
        assert tuple(stored.loc[cell, list(COLUMNS)]) == SCIPLEX[key], (cell, key)
    section = read_manifest(out).perturbation["sciplex.h5ad"]
    assert section["columns"] == {"labels": [["product_name", "chemical"]], "dose": "dose_value",
                                  "dose_unit": "dose_unit", "time": "time", "time_unit": None}
    ds = PerturbationDataset(out, seed=0)
    assert ds.match_on == ("cell_line",)
    batch = ds.__getitems__(np.arange(40))
    for i, cell in enumerate(ds.cell_names(batch["cells"].cell_ids)):
        expected = SCIPLEX[tuple(obs.loc[cell, ["product_name", "dose_value", "dose_unit", "time"]])]
        assert float(batch["dose_um"][i]) == pytest.approx(float(expected[3]), rel=1e-6)
        assert float(batch["time_h"][i]) == float(expected[4])
        ctrl = ds.cell_names(batch["control_ids"][i : i + 1])[0]
        assert obs.loc[ctrl, "product_name"] in ("Vehicle", "DMSO")
        assert obs.loc[ctrl, "cell_line"] == obs.loc[cell, "cell_line"]


def test_same_inputs_same_dataset(tmp_path: Path) -> None:
    from scmf_shards.convert import convert_h5ad

    path = _write(tmp_path / "norman.h5ad", norman_obs(200, 3), 3)
    a = convert_h5ad([path], tmp_path / "a", perturbation="auto", quiet=True)
    b = convert_h5ad([path], tmp_path / "b", perturbation="guide_identity", quiet=True, workers=2)
    plain = convert_h5ad([path], tmp_path / "c", quiet=True)
    assert a.dataset_id != plain.dataset_id  # the option defines the data
    assert a.dataset_id != b.dataset_id
    assert stored_obs(tmp_path / "a").equals(stored_obs(tmp_path / "b"))
    assert "perturbation" not in json.loads((tmp_path / "c" / "manifest.json").read_text())


def test_unparseable_labels(tmp_path: Path) -> None:
    obs = norman_obs(120, 2)
    obs["guide_identity"] = obs["guide_identity"].astype(str)
    obs.iloc[:7, 0] = "???"
    path = _write(tmp_path / "bad.h5ad", obs, 2)
    strict = _invoke("h5ad", str(path), "-o", str(tmp_path / "out"), "--perturbation", "guide_identity",
                     "--strict-perturbation")
    assert strict.exit_code == 1
    lines = strict.output.strip().splitlines()
    assert len(lines) == 1, strict.output
    assert lines[0].startswith("error: "), lines[0]
    assert "bad.h5ad" in lines[0]
    assert "'???' (7 cells)" in lines[0]
    assert "--strict-perturbation" in lines[0]
    assert not (tmp_path / "out").exists()
    kept = _invoke("h5ad", str(path), "-o", str(tmp_path / "out"), "--perturbation", "guide_identity")
    assert kept.exit_code == 0, kept.output
    assert "'???' (7 cells)" in kept.output  # listed on stderr
    stored = stored_obs(tmp_path / "out")
    unknown = stored.loc[obs.index[:7]]
    assert set(unknown["perturbation"]) == {"unknown"}
    assert set(unknown["is_control"]) == {"False"}
    assert read_manifest(tmp_path / "out").perturbation["bad.h5ad"]["unknown"] == {"guide_identity": {"???": 7}}


def test_option_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "n.h5ad", norman_obs(60, 4), 4)
    result = _invoke("h5ad", str(path), "-o", str(tmp_path / "out"), "--perturbation", "no_such_column")
    assert result.exit_code == 1
    assert "no_such_column" in result.output
    assert "n.h5ad" in result.output
    result = _invoke("h5ad", str(path), "-o", str(tmp_path / "out"), "--strict-perturbation")
    assert result.exit_code == 1
    assert "--perturbation" in result.output
    assert not (tmp_path / "out").exists()


def test_appended_version_parses_the_new_inputs(tmp_path: Path) -> None:
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.versions import append_dataset

    base_obs, new_obs = norman_obs(150, 5), norman_obs(90, 6)
    new_obs.index = [f"new{i}" for i in range(len(new_obs))]
    convert_h5ad([_write(tmp_path / "a.h5ad", base_obs, 5)], tmp_path / "v1", perturbation="auto",
                 obs_columns=("gem_group",), quiet=True)
    append_dataset(tmp_path / "v1", [_write(tmp_path / "b.h5ad", new_obs, 6)], tmp_path / "v2")
    stored = stored_obs(tmp_path / "v2")
    for cell, label in pd.concat([base_obs, new_obs])["guide_identity"].astype(str).items():
        assert tuple(stored.loc[cell, list(COLUMNS)]) == NORMAN[label], (cell, label)
    m = read_manifest(tmp_path / "v2")
    assert sorted(m.perturbation) == ["a.h5ad", "b.h5ad"]
    assert m.parent["dataset_id"] == read_manifest(tmp_path / "v1").dataset_id
    assert PerturbationDataset(tmp_path / "v2", seed=0).match_on == ("gem_group",)
