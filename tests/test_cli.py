"""scmf-convert: the CLI commands, config files, verify and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    result = CliRunner().invoke(main, ["verify", str(dataset), "--quiet"])
    assert result.exit_code == 1
    assert result.stdout == ""  # problems go to stderr, each an error: line
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "checksum mismatch" in lines[0]
    assert str(target) in lines[0]


@pytest.mark.parametrize("target", ["obs/library_size/c/0", "obs/cell_type/codes/c/0", "obs/zarr.json",
                                    "var/_index/c/0"])
def test_verify_catches_a_flipped_byte_outside_the_csr_arrays(dataset: Path, target: str) -> None:
    """obs values (library_size drives loader-side normalisation), codes, metadata: all
    covered by the shard's other-files digest, in verify and in open_dataset(verify=True)."""
    from scmf_loader.errors import ChecksumMismatchError
    from scmf_loader.opening import open_dataset

    f = dataset / "shards" / "000002.zarr" / target
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    result = CliRunner().invoke(main, ["verify", str(dataset), "--quiet"])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
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


# ---- one list of option names; config warnings; one-line errors; readable info ----------------
def test_cli_options_yaml_keys_and_api_derive_from_one_list() -> None:
    from dataclasses import fields

    from scmf_loader.dataloader import OUTPUTS
    from scmf_loader.format import VALUE_DTYPES
    from scmf_loader.preprocess.schema import CONFIG_KEYS
    from scmf_shards.config import LOADER_OUTPUTS, OPTION_KEYS
    from scmf_shards.options import OPTIONS, ConvertOptions, options_in

    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    api = {f.name for f in fields(ConvertOptions)}
    assert api == {o.name for o in options_in("common", "h5ad")} | {"preprocessing"}
    assert {o.name for o in options_in("preprocessing")} == set(CONFIG_KEYS)
    assert set(OPTION_KEYS) == {o.name for o in OPTIONS if o.group != "preprocessing"}
    assert set(OUTPUTS) <= set(LOADER_OUTPUTS)
    assert next(o for o in OPTIONS if o.name == "dtype").choices == tuple(VALUE_DTYPES)
    for command, groups in [("h5ad", ("output", "common", "h5ad", "preprocessing")),
                            ("census", ("output", "common", "census", "preprocessing"))]:
        params = {p.name: p for p in main.commands[command].params if p.name != "config_path"}
        assert set(params) - {"inputs"} == {o.name for o in options_in(*groups)}, command
        for o in options_in(*groups):
            assert o.cli_flag in params[o.name].opts, (command, o.name)


def test_shard_size_help_says_maximum_and_balanced() -> None:
    text = CliRunner().invoke(main, ["h5ad", "--help"], terminal_width=200).output
    line = " ".join(text.split())
    assert "--shard-size INTEGER RANGE Maximum cells per shard. Shards are balanced" in line
    assert "[50000]" in line


def test_loader_keys_in_the_config_warn_and_name_the_converter_setting(
    three_sources: list[Path], tmp_path: Path
) -> None:
    from scmf_shards.config import load_config

    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"data:\n  paths: [{three_sources[0].name}]\n  output: ds\n  num_workers: 4\n"
                   "  batch_size: 256\n  shuffle: false\n")
    with pytest.warns(UserWarning, match="is a loader setting") as caught:
        options = load_config(cfg)
    messages = sorted(str(w.message) for w in caught)
    assert messages == [f"{cfg}: batch_size is a loader setting (ignored by the converter)",
                        f"{cfg}: num_workers is a loader setting (ignored by the converter); "
                        "the converter's is workers"]
    assert options["shuffle"] is False  # a converter option too: the global pre-shuffle
    assert "num_workers" not in options
    assert "workers" not in options
    cfg2 = tmp_path / "padded.yaml"
    cfg2.write_text("data:\n  output: padded\n")
    with pytest.warns(UserWarning, match="output: padded is a loader setting"):
        assert load_config(cfg2) == {}
    result = CliRunner().invoke(main, ["h5ad", "--config", str(cfg), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert sorted(result.stderr.splitlines()) == [f"warning: {m}" for m in messages]


def test_manifest_name_baked_in_the_config_points_to_the_option(tmp_path: Path) -> None:
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  preprocessing: {normalize: library_size, baked: true}\n")
    code, text = _run("h5ad", "x.h5ad", "--config", str(cfg), "-o", str(tmp_path / "o"))
    assert code == 1
    assert text.strip().splitlines() == [
        f"error: {cfg}: preprocessing key 'baked' is what the manifest records; the option is 'bake'"]


def test_s3_input_without_credentials_is_one_line_and_fast(tmp_path: Path) -> None:
    """No credentials that work and no network: a dead local endpoint refuses at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="dummy", AWS_SECRET_ACCESS_KEY="dummy", AWS_ENDPOINT_URL="http://127.0.0.1:9",
               AWS_MAX_ATTEMPTS="1", AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    url = "s3://no-such-bucket/x.h5ad"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "scmf_shards.cli", "h5ad", url, "-o", str(tmp_path / "o"),
                          "--quiet"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {url}: cannot open (")
    assert "127.0.0.1:9" in lines[0]
    assert time.monotonic() - start < 90


def test_info_summarises_long_lists(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "hvg"
    code, text = _run("h5ad", *map(str, three_sources), "-o", str(out), "--hvg", "30", "--quiet")
    assert code == 0, text
    code, text = _run("info", str(out))
    assert code == 0
    assert max(len(line) for line in text.splitlines()) < 400  # the full list: 30 x 19 characters more
    genes = json.loads(_run("info", str(out), "--json")[1])["preprocessing"]["hvg_genes"]
    assert len(genes) == 30
    assert f"30 HVG genes: {genes[0]}, {genes[1]}, {genes[2]}, … (use --json for all)" in text


def test_summarise_lists_keeps_short_lists() -> None:
    from scmf_shards.cli import summarise_lists

    assert summarise_lists({"a": [1, 2], "b": {"c": list(range(11))}}) == {
        "a": [1, 2], "b": {"c": "11 c: 0, 1, 2, … (use --json for all)"}}
