"""Conversion on dask: local clusters of 1, 2 or 4 processes and a real ``dask scheduler`` +
``dask worker`` on loopback (the ``dask_scheduler`` fixture) give byte-identical datasets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scmf_shards.convert import convert_h5ad

KW = {"shard_size": 300, "chunk_size": 200, "seed": 7, "obs_columns": ("cell_type",), "quiet": True}
CLI_KW = ["--shard-size", "300", "--chunk-size", "200", "--seed", "7", "--obs-columns", "cell_type", "--quiet"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _executed(address: str) -> int:
    """Tasks run so far by the workers of the scheduler at ``address``."""
    from distributed import Client

    with Client(address, timeout="30s") as client:
        return sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())


@pytest.mark.slow
def test_1_2_4_local_workers_give_the_same_bytes(three_sources: list[Path], tmp_path: Path) -> None:
    ref = convert_h5ad(three_sources, tmp_path / "w1", workers=1, **KW)
    again = convert_h5ad(three_sources, tmp_path / "w1-again", workers=1, **KW)
    w2 = convert_h5ad(three_sources, tmp_path / "w2", workers=2, **KW)
    w4 = convert_h5ad(three_sources, tmp_path / "w4", workers=4, **KW)
    assert len(ref.shards) == 5
    assert ref.dataset_id == again.dataset_id == w2.dataset_id == w4.dataset_id
    expected = tree_bytes(tmp_path / "w1")
    assert any(k.endswith("X/data/c/0") for k in expected)
    for name in ("w1-again", "w2", "w4"):
        assert tree_bytes(tmp_path / name) == expected, name


@pytest.mark.slow
def test_scheduler_python_and_cli_match_a_local_run(
    three_sources: list[Path], tmp_path: Path, dask_scheduler: str
) -> None:
    ref = convert_h5ad(three_sources, tmp_path / "local", workers=1, **KW)
    before = _executed(dask_scheduler)
    remote = convert_h5ad(three_sources, tmp_path / "remote", scheduler=dask_scheduler, **KW)
    ran = _executed(dask_scheduler) - before
    assert ran >= 3 + 7 + 5  # fingerprints, scatter (7 chunks) and gather (5 shards) ran there
    assert remote.dataset_id == ref.dataset_id
    expected = tree_bytes(tmp_path / "local")
    assert tree_bytes(tmp_path / "remote") == expected

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "scmf_shards.cli", "h5ad", *map(str, three_sources),
           "--output", str(out), *CLI_KW, "--scheduler", dask_scheduler]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(out) == expected
    assert _executed(dask_scheduler) - before >= 2 * ran

