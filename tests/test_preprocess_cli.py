"""``scmf-convert h5ad`` preprocessing options, the YAML ``preprocessing:`` section, and
``scmf-convert preprocess``: one-line errors before any work, scanpy-identical output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hpc_genes
from preprocess_helpers import counts, read_h5ad, scanpy_hvg, scanpy_normalize, write_h5ad

from scmf_loader.format import read_manifest
from scmf_shards.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("prep_cli")
    return write_h5ad(d / "in.h5ad", counts(300, 100, 7, zero_genes=[1], zero_cells=[2]), hpc_genes()[:100], 7)


def _run(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-sum", "0"], "target_sum must be a positive number"),
        (["--hvg", "10", "--hvg-flavor", "pearson"], "hvg_flavor must be one of"),
        (["--hvg", "5000"], "more highly variable genes than the inputs have"),
        (["--hvg", "10", "--hvg-batch-key", "donor"], "obs has no column(s) ['donor']"),
        (["--normalize", "tpm"], "normalize must be one of"),
        (["--hvg", "0"], "hvg_selection must be >= 1"),
    ],
)
def test_bad_options_fail_in_one_line(src: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = _run("h5ad", str(src), "-o", str(tmp_path / "out"), "-q", *args)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]
    assert not (tmp_path / "out").exists()  # nothing started


def test_h5ad_options_and_yaml_agree(src: Path, tmp_path: Path) -> None:
    r = _run("h5ad", str(src), "-o", str(tmp_path / "cli"), "-q", "--normalize", "library_size",
             "--target-sum", "5000", "--hvg", "20", "--hvg-flavor", "cell_ranger", "--hvg-batch-key", "batch",
             "--bake")
    assert r.exit_code == 0, r.output
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        "data:\n"
        f"  paths: [{src}]\n"
        f"  output: {tmp_path / 'yaml'}\n"
        "  preprocessing:\n"
        "    normalize: library_size\n    target_sum: 5000\n    hvg_selection: 20\n"
        "    hvg_flavor: cell_ranger\n    hvg_batch_key: batch\n    bake: false\n"
    )
    r = _run("h5ad", "--config", str(cfg), "-q", "--bake")  # the explicit flag wins over the file
    assert r.exit_code == 0, r.output
    a, b = read_manifest(tmp_path / "cli"), read_manifest(tmp_path / "yaml")
    assert a.dataset_id == b.dataset_id
    assert a.preprocessing == b.preprocessing
    p = a.preprocessing
    assert (p["target_sum"], p["hvg_flavor"], p["hvg_batch_key"], p["baked"]) == (5000.0, "cell_ranger", "batch", True)
    assert len(p["hvg_genes"]) == 20
    assert all(g.startswith("ENSG") for g in p["hvg_genes"])


def test_non_counts_need_assume_normalized(tmp_path: Path) -> None:
    p = write_h5ad(tmp_path / "norm.h5ad", np.log1p(counts(40, 30, 8)), hpc_genes()[:30], 8)
    r = _run("h5ad", str(p), "-o", str(tmp_path / "a"), "-q", "--normalize", "library_size")
    assert r.exit_code == 1
    assert "non-integer" in r.output
    assert "--assume-normalized" in r.output
    r = _run("h5ad", str(p), "-o", str(tmp_path / "b"), "-q", "--assume-normalized", "--no-log1p", "--hvg", "5")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra", [[], ["--hvg", "15", "--hvg-flavor", "seurat"]])
def test_preprocess_command_equals_scanpy(src: Path, tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "out.h5ad"
    r = _run("preprocess", str(src), "-o", str(out), "-q", "--chunk-size", "64", *extra)
    assert r.exit_code == 0, r.output
    got = read_h5ad(out)
    ref = scanpy_normalize(read_h5ad(src))
    if extra:
        ref = ref[:, scanpy_hvg(ref, 15, "seurat", None)["highly_variable"].to_numpy()]
    assert list(got.var_names) == list(ref.var_names)
    assert list(got.obs_names) == list(ref.obs_names)
    np.testing.assert_array_equal(got.X.toarray(), ref.X.toarray())
    rec = got.uns["scmf_preprocessing"]
    assert rec["normalize"] == "library_size"
    assert rec["log1p"] is True
    assert (list(rec["hvg_genes"]) == list(ref.var_names)) if extra else rec["hvg_genes"] is None
    r = _run("preprocess", str(src), "-o", str(out), "-q")
    assert r.exit_code == 1
    assert "exists" in r.output


def test_preprocess_scran_writes_size_factors(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "sf.h5ad"
    r = _run("preprocess", str(src), "-o", str(out), "-q", "--normalize", "scran", "--no-log1p")
    assert r.exit_code == 0, r.output
    got = read_h5ad(out)
    sf = got.obs["size_factor"].to_numpy()
    assert sf[2] == 0.0
    assert sf[sf > 0].mean() == pytest.approx(1.0)
    x = read_h5ad(src).X.toarray()
    d = sf.astype(np.float32)
    d[d == 0] = 1
    np.testing.assert_array_equal(got.X.toarray(), x / d[:, None])
