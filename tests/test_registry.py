"""The dataset registry: names@versions pinned by dataset_id."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import hpc_genes, write_counts_h5ad

from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.format import read_manifest
from scmf_loader.registry import (
    DatasetChangedError,
    RegistryError,
    UnknownDatasetError,
    load_registry,
    register,
    resolve,
)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from scmf_shards.convert import convert_h5ad

    d = tmp_path_factory.mktemp("registry")
    genes = hpc_genes()[:120]
    a = write_counts_h5ad(d / "a.h5ad", 150, genes, seed=1)
    b = write_counts_h5ad(d / "b.h5ad", 120, genes, seed=2)
    convert_h5ad([a], d / "data" / "one", shard_size=100, quiet=True)
    convert_h5ad([b], d / "data" / "two", shard_size=100, quiet=True)
    return d / "data" / "one", d / "data" / "two"


def test_register_and_open_by_name(two_datasets: tuple[Path, Path], tmp_path: Path) -> None:
    from scmf_loader.dataset import CellDataset

    one, two = two_datasets
    reg = tmp_path / "datasets.yaml"
    e1 = register(one, "atlas", "v1", reg)
    register(two, "atlas", "v2", reg)
    assert e1.dataset_id == read_manifest(one).dataset_id
    assert list(load_registry(reg).entries["atlas"]) == ["v1", "v2"]
    ds = CellDataset("atlas@v2", registry=reg)
    direct = CellDataset(two)
    assert len(ds) == len(direct) == 120
    np.testing.assert_array_equal(ds[np.arange(120)].values.numpy(), direct[np.arange(120)].values.numpy())
    assert register(two, "atlas", "v2", reg).dataset_id == read_manifest(two).dataset_id  # idempotent


def test_relative_uri_resolves_against_the_registry(two_datasets: tuple[Path, Path]) -> None:
    from scmf_loader.dataset import CellDataset

    one, _ = two_datasets
    reg = one.parent / "reg.yaml"
    entry = register(one, "atlas", "v1", reg)
    assert entry.uri == "one"  # below the registry's directory: stored relative
    assert len(CellDataset("atlas@v1", registry=str(reg))) == 150
    reg.unlink()


def test_unknown_name_or_version(two_datasets: tuple[Path, Path], tmp_path: Path) -> None:
    from scmf_loader.dataset import CellDataset

    reg = tmp_path / "r.yaml"
    register(two_datasets[0], "atlas", "v1", reg)
    with pytest.raises(UnknownDatasetError, match=r"r.yaml: no dataset named 'atlsa'; registered names: \['atlas'\]"):
        CellDataset("atlsa@v1", registry=reg)
    with pytest.raises(UnknownDatasetError, match=r"'atlas' has no version 'v9'; registered versions: \['v1'\]"):
        resolve("atlas@v9", reg)
    with pytest.raises(ConfigurationError, match="name@version"):
        resolve("atlas", reg)
    with pytest.raises(RegistryError, match="no such registry file"):
        resolve("atlas@v1", tmp_path / "missing.yaml")


def test_dataset_id_mismatch_is_refused(two_datasets: tuple[Path, Path], tmp_path: Path) -> None:
    from scmf_loader.dataset import CellDataset

    one, two = two_datasets
    reg = tmp_path / "r.yaml"
    reg.write_text(f"atlas:\n  v1:\n    uri: {two}\n    dataset_id: '{read_manifest(one).dataset_id}'\n")
    with pytest.raises(DatasetChangedError, match=r"registered as atlas@v1 .* the data changed under the name"):
        CellDataset("atlas@v1", registry=reg)
    with pytest.raises(RegistryError, match="already registered"):  # a version names one dataset
        register(two, "atlas", "v1", reg)
    register(two, "atlas", "v1", reg, overwrite=True)
    assert len(CellDataset("atlas@v1", registry=reg)) == 120


def test_malformed_registry(tmp_path: Path) -> None:
    reg = tmp_path / "bad.yaml"
    reg.write_text("atlas: [1, 2]\n")
    with pytest.raises(RegistryError, match="must map versions to entries"):
        load_registry(reg)
    reg.write_text("atlas:\n  v1: {uri: x}\n")
    with pytest.raises(RegistryError, match=r"atlas@v1: 'dataset_id' must be a non-empty string"):
        load_registry(reg)
    reg.write_text("atlas: {v1: [unclosed\n")
    with pytest.raises(RegistryError, match="not a valid YAML registry"):
        load_registry(reg)


def test_without_pyyaml_the_error_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "r.yaml"
    reg.write_text("{}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ScmfError, match=r"PyYAML.*scmodelforge-data\[registry\]"):
        load_registry(reg)


def test_loader_imports_without_yaml() -> None:
    import subprocess

    code = "import sys; import scmf_loader.registry, scmf_loader.mixture; assert 'yaml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
