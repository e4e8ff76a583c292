"""scmf-convert: the CLI commands, config files, verify and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from scmf_shards.cli import main


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture
def dataset(three_sources: list[Path], tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    code, text = _run("h5ad", *map(str, three_sources), "--output", str(out), "--shard-size", "500",
                      "--obs-columns", "cell_type,batch", "--quiet")
    assert code == 0, text
    return out


def test_h5ad_info_verify(dataset: Path) -> None:
    code, text = _run("info", str(dataset))
    assert code == 0
    assert "1,450" in text
    assert "a.h5ad" in text
    code, text = _run("info", str(dataset), "--json")
    info = json.loads(text)
    assert info["n_cells"] == 1450
    assert info["n_shards"] == 3
    assert info["obs_columns"] == {"source": 3, "cell_type": 4, "batch": 3}
    code, text = _run("verify", str(dataset), "--quiet")
    assert code == 0
    assert "3 shard(s) verified" in text


@pytest.mark.parametrize("array", ["data", "indices", "indptr"])
def test_verify_catches_a_single_flipped_byte(dataset: Path, array: str) -> None:
    target = dataset / "shards" / "000001.zarr" / "X" / array / "c" / "0"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    target.write_bytes(bytes(raw))
    code, text = _run("verify", str(dataset), "--quiet")
    assert code == 1
    lines = text.strip().splitlines()
    assert len(lines) == 1
    assert "checksum mismatch" in lines[0]
    assert str(target) in lines[0]


@pytest.mark.parametrize("target", ["obs/library_size/c/0", "obs/cell_type/codes/c/0", "obs/zarr.json",
                                    "var/_index/c/0"])
def test_verify_catches_a_flipped_byte_outside_the_csr_arrays(dataset: Path, target: str) -> None:
    """obs values (library_size drives loader-side normalisation), codes, metadata: all
    covered by the shard's other-files digest, in verify and in open_dataset(verify=True)."""
    from scmf_loader.errors import ChecksumMismatchError
    from scmf_loader.store import open_dataset

    f = dataset / "shards" / "000002.zarr" / target
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    code, text = _run("verify", str(dataset), "--quiet")
    assert code == 1
    lines = text.strip().splitlines()
    assert len(lines) == 1
    assert "obs/var/zarr metadata differ" in lines[0]
    assert "000002.zarr" in lines[0]
    open_dataset(dataset).close()  # sizes are unchanged: a cheap open does not notice
    with pytest.raises(ChecksumMismatchError, match="000002.zarr.*obs/var/zarr metadata"):
        open_dataset(dataset, verify=True)


def test_verify_catches_truncation_and_missing(dataset: Path) -> None:
    target = dataset / "shards" / "000000.zarr" / "X" / "data" / "c" / "0"
    target.write_bytes(target.read_bytes()[:-4])
    import shutil

    shutil.rmtree(dataset / "shards" / "000002.zarr")
    code, text = _run("verify", str(dataset), "--quiet")
    assert code == 1
    assert "truncated" in text
    assert "missing shard" in text
    (dataset / "manifest.json").unlink()
    code, text = _run("verify", str(dataset), "--quiet")
    assert code == 1
    assert "no manifest" in text
    assert "incomplete conversion" in text


def test_errors_exit_non_zero_with_one_line(tmp_path: Path) -> None:
    code, text = _run("h5ad", str(tmp_path / "nope.h5ad"), "-o", str(tmp_path / "o"))
    assert code == 1
    assert text.strip().splitlines() == [f"error: {tmp_path / 'nope.h5ad'}: no such file"]
    code, text = _run("info", str(tmp_path))
    assert code == 1
    assert "no manifest" in text
    code, text = _run("h5ad", "-o", str(tmp_path / "o"))
    assert code == 1
    assert "no input files" in text


def test_config_file_sets_options_and_cli_wins(three_sources: list[Path], tmp_path: Path) -> None:
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        "data:\n"
        "  source: local\n"
        f"  paths: [{', '.join(p.name for p in three_sources)}]\n"
        "  output: from_config\n"
        "  gene_vocab: human_protein_coding\n"
        "  obs_columns: [cell_type]\n"
        "  shard_size: 1000\n"
        "  seed: 5\n"
        "  max_genes: 2048\n"
        "  num_workers: 4\n"
    )
    code, text = _run("h5ad", "--config", str(cfg), "--shard-size", "300", "--quiet")
    assert code == 0, text
    info = json.loads(_run("info", str(tmp_path / "from_config"), "--json")[1])
    assert info["shuffle"]["seed"] == 5
    assert info["shuffle"]["shard_size"] == 300
    assert info["n_shards"] == 5
    assert "cell_type" in info["obs_columns"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  shard_sise: 3\n")
    code, text = _run("h5ad", "--config", str(bad), "-o", str(tmp_path / "x"), str(three_sources[0]))
    assert code == 1
    assert "unknown key(s) ['shard_sise']" in text


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "scmf_shards.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "h5ad" in out.stdout
    assert "verify" in out.stdout


@pytest.mark.slow
def test_bad_values_with_local_workers_print_one_line_through_the_console_script(tmp_path: Path) -> None:
    """The installed ``scmf-convert`` entry point, a local dask cluster, an input with a
    negative count: exit 1, one line on stderr (no worker log or traceback), no manifest."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    src = tmp_path / "neg.h5ad"
    X = sp.csr_matrix(np.array([[1.0, -2.0], [0.0, 3.0]], dtype=np.float32))
    ad.AnnData(X=X, obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["CD3E", "CD4"])).write_h5ad(src)
    exe = Path(sys.executable).with_name("scmf-convert")
    assert exe.is_file(), "the console script is installed with the package"
    out = subprocess.run([str(exe), "h5ad", str(src), "--output", str(tmp_path / "o"), "--workers", "2",
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {src}: rows [0, 2) of 'X' hold negative values (min -2.0); raw counts cannot be "
        "negative. For data that is already normalised (e.g. scaled), pass --assume-normalized --no-log1p"
    ]
    assert not (tmp_path / "o" / "manifest.json").exists()
