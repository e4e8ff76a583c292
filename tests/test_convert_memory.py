"""Memory of a conversion is bounded: by ``--chunk-size`` and ``--shard-size`` on the
two-stage path, never by the dataset size; by ``--memory-limit`` on the one-pass path
(docs/scaling.md §5).

1. Two-stage (``--memory-limit`` below what the data needs), ``--workers 2`` (two task
   threads), at N and 4N cells with the same ``--shard-size`` and ``--chunk-size`` (hence the
   same work per task): the peak resident memory (``VmHWM``) of the converting process
   barely moves, although 4N cells are several times the memory the tasks use.
2. One pass (``--memory-limit`` above what the data needs), ``--workers 2``, at the same two
   sizes: the process holds the whole shuffled dataset (its peak grows with it) and never
   more than the limit above what it held after its imports.
3. An input several times the peak resident memory of the whole converting process
   (two-stage, ``--workers 1``) converts, and the output verifies.

Every conversion runs as ``scmf-convert`` in a fresh process that measures itself. Inputs
are synthetic CSR ``.h5ad`` files with the same number of non-zeros in every cell (so every
read chunk and every shard holds the same number of non-zeros at both sizes), written with
h5py in bounded blocks. Run with ``-s`` to see the measured numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from conftest import hpc_genes
from make_bench_data import _attrs, _strings  # noqa: E402  (the same AnnData encoding helpers)

MB = 2**20
NNZ_PER_CELL = 1_000  # over ~19k genes: ~8 KB of CSR (float32 values, int32 indices) a cell
# 1. two dataset sizes on 2 workers, the same chunk (2M non-zeros) and shard (5M non-zeros)
CHUNK_SIZE, SHARD_SIZE = 2_048, 5_000
SMALL_CELLS, BIG_CELLS = 20_000, 80_000  # ~150 and ~610 MB of CSR
# 2. one large input in-process: chunks of 4.1M and shards of 10M non-zeros (fewer tasks)
LARGE_CHUNK_SIZE, LARGE_SHARD_SIZE = 4_096, 10_000
LARGE_CELLS = 192_000  # ~1.5 GB of CSR


def write_fixed_nnz_h5ad(path: Path, n_cells: int, nnz_per_cell: int = NNZ_PER_CELL, seed: int = 0,
                         dtype: str = "float32") -> Path:
    """An .h5ad over the human protein-coding genes whose every cell has ``nnz_per_cell``
    non-zeros (one gene drawn in each of ``nnz_per_cell`` equal gene ranges, counts 1..29),
    CSR with int64 indptr, contiguous datasets as anndata writes them, obs ``cell_type``.
    Written in blocks of cells: the writer's memory does not grow with ``n_cells``."""
    genes = hpc_genes()
    n_genes, k = len(genes), nnz_per_cell
    stride = n_genes // k
    rng = np.random.default_rng(seed)
    first = np.arange(k, dtype=np.int32) * np.int32(stride)
    block = 8_192
    with h5py.File(path, "w") as f:
        _attrs(f, "anndata", "0.1.0")
        x = f.create_group("X")
        _attrs(x, "csr_matrix", "0.1.0")
        x.attrs["shape"] = (n_cells, n_genes)
        data = x.create_dataset("data", (n_cells * k,), dtype=dtype)
        indices = x.create_dataset("indices", (n_cells * k,), dtype=np.int32)
        for s in range(0, n_cells, block):
            e = min(n_cells, s + block)
            cols = rng.integers(0, stride, (e - s, k), dtype=np.int16).astype(np.int32)
            cols += first
            indices[s * k : e * k] = cols.ravel()
            data[s * k : e * k] = (cols.ravel() * np.int32(7919) % 29 + 1).astype(dtype)
        x.create_dataset("indptr", data=np.arange(n_cells + 1, dtype=np.int64) * k)
        obs = f.create_group("obs")
        _attrs(obs, "dataframe", "0.2.0")
        obs.attrs["_index"] = "_index"
        obs.attrs["column-order"] = np.array(["cell_type"], dtype=object)
        _strings(obs, "_index", [f"{path.stem}-{i}" for i in range(n_cells)])
        ct = obs.create_group("cell_type")
        _attrs(ct, "categorical", "0.2.0")
        ct.attrs["ordered"] = False
        _strings(ct, "categories", ["B cell", "NK cell", "T cell", "monocyte"])
        codes = ct.create_dataset("codes", data=rng.integers(0, 4, n_cells).astype(np.int8))
        _attrs(codes, "array", "0.2.0")
        var = f.create_group("var")
        _attrs(var, "dataframe", "0.2.0")
        var.attrs["_index"] = "_index"
        var.attrs["column-order"] = np.array([], dtype="float64")
        _strings(var, "_index", list(genes))
        for g in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            _attrs(f.create_group(g), "dict", "0.1.0")
    return path


def csr_bytes(n_cells: int) -> int:
    """Bytes of the CSR matrix of an input of ``n_cells`` cells (values, indices, indptr)."""
    return n_cells * NNZ_PER_CELL * 8 + (n_cells + 1) * 8


def held_bytes(n_cells: int) -> int:
    """Bytes a one-pass conversion holds of it: whole counts below 2**16 over ~19k genes, so
    values and ids as uint16 (scmf_shards.convert.scatter.held_dtypes), plus the indptr."""
    return n_cells * NNZ_PER_CELL * 4 + (n_cells + 1) * 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Paths of the inputs (written on first use by :func:`_input`; ~2.2 GB in all, deleted
    at the end of the module: pytest keeps the last few temporary directories)."""
    d = tmp_path_factory.mktemp("mem_inputs")
    yield {"small": d / "small.h5ad", "big": d / "big.h5ad", "large": d / "large.h5ad"}
    shutil.rmtree(d, ignore_errors=True)


def _input(inputs: dict[str, Path], which: str) -> Path:
    """The input ``which``, written on first use."""
    p = inputs[which]
    if not p.exists():
        write_fixed_nnz_h5ad(p, {"small": SMALL_CELLS, "big": BIG_CELLS, "large": LARGE_CELLS}[which])
    return p


_CONVERT_MEASURED = r"""
import atexit, json, sys

def vm_hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import anndata, scmf_shards.convert.driver, scmf_shards.sources.h5ad, scmf_shards.write  # what the conversion imports anyway
from scmf_shards.cli import main

base = vm_hwm_mb()
report = sys.argv[1]
atexit.register(lambda: open(report, "w").write(json.dumps({"base_mb": base, "peak_mb": vm_hwm_mb()})))
sys.argv = ["scmf-convert", *sys.argv[2:]]
main()
"""


def _measured_cli(args: list[str], report: Path) -> dict[str, float]:
    """Run ``scmf-convert ARGS`` in a fresh process; its peak RSS after imports and at exit
    (MB) and the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CONVERT_MEASURED, str(report), *args],
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    rss = json.loads(report.read_text())
    return {**rss, "added_mb": rss["peak_mb"] - rss["base_mb"], "seconds": seconds}


def _convert_sizes(inputs: dict[str, Path], tmp_path: Path, limit: str) -> dict[str, dict[str, float]]:
    """The small and big inputs converted with ``--workers 2 --memory-limit LIMIT``."""
    out = {}
    for which in ("small", "big"):
        ds = tmp_path / which
        out[which] = _measured_cli(
            ["h5ad", str(_input(inputs, which)), "--output", str(ds), "--chunk-size", str(CHUNK_SIZE),
             "--shard-size", str(SHARD_SIZE), "--obs-columns", "cell_type", "--workers", "2",
             "--memory-limit", limit, "--quiet"], tmp_path / f"{which}.json")
        n_cells = {"small": SMALL_CELLS, "big": BIG_CELLS}[which]
        # and what was written is intact (structure, values, checksums): a one-pass run's
        # page prefaulting once zeroed rows already held while the shards' checksums agreed
        from scmf_shards.verify import verify_dataset

        assert verify_dataset(ds) == []
        print(f"\n--workers 2 --memory-limit {limit}, {n_cells:,} cells (CSR {csr_bytes(n_cells) / MB:.0f} MB, "
              f"chunk {CHUNK_SIZE}, shard {SHARD_SIZE}): peak RSS {out[which]['peak_mb']:.0f} MB (after imports "
              f"{out[which]['base_mb']:.0f} MB, conversion +{out[which]['added_mb']:.0f} MB), "
              f"{out[which]['seconds']:.1f} s")
        shutil.rmtree(ds)
    return out


@pytest.mark.slow
def test_two_stage_peak_rss_does_not_follow_the_dataset_size(inputs: dict[str, Path], tmp_path: Path) -> None:
    r = _convert_sizes(inputs, tmp_path, "1MB")  # below any dataset: the two-stage path
    small, big = r["small"], r["big"]
    added_data_mb = (csr_bytes(BIG_CELLS) - csr_bytes(SMALL_CELLS)) / MB
    # The setup means something: the bigger dataset is well over what the tasks use (2x; the
    # anndata reader's per-task buffers put the tasks near 200-215 MB against 611 MB of data),
    # so memory that followed the dataset (even a fraction of it) would dominate.
    assert csr_bytes(BIG_CELLS) / MB > 2 * max(small["added_mb"], big["added_mb"])
    # 4x the cells: the peak stays within 1.3x of the smaller run ...
    assert big["peak_mb"] < 1.3 * small["peak_mb"]
    # ... and what the conversion added grew by well under a tenth of the added data
    growth_mb = big["added_mb"] - small["added_mb"]
    assert growth_mb < 0.1 * added_data_mb, (growth_mb, added_data_mb)


@pytest.mark.slow
def test_one_pass_holds_the_data_and_never_exceeds_its_limit(inputs: dict[str, Path], tmp_path: Path) -> None:
    limit_mb = 1_200  # the big input's CSR is ~610 MB: both sizes take the one-pass path
    r = _convert_sizes(inputs, tmp_path, f"{limit_mb}MiB")
    for which, n_cells in (("small", SMALL_CELLS), ("big", BIG_CELLS)):
        added = r[which]["added_mb"]
        assert added <= limit_mb, (which, added)  # never above the budget
        assert added >= 0.8 * held_bytes(n_cells) / MB, (which, added)  # the data was held: one pass
    # and the budget is what bounds it: the peak follows the data, unlike the two-stage path
    assert r["big"]["added_mb"] - r["small"]["added_mb"] > 0.5 * (held_bytes(BIG_CELLS) - held_bytes(SMALL_CELLS)) / MB


@pytest.mark.slow
def test_input_several_times_the_process_memory_converts_and_verifies(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    from scmf_loader.format import read_manifest
    from scmf_shards.verify import verify_dataset

    src = _input(inputs, "large")
    out = tmp_path / "ds"
    report = tmp_path / "rss.json"
    cmd = [sys.executable, "-c", _CONVERT_MEASURED, str(report), "h5ad", str(src), "--output", str(out),
           "--chunk-size", str(LARGE_CHUNK_SIZE), "--shard-size", str(LARGE_SHARD_SIZE), "--obs-columns", "cell_type",
           "--workers", "1", "--memory-limit", "100MB", "--quiet"]  # the two-stage path
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    rss = json.loads(report.read_text())
    input_mb = src.stat().st_size / MB
    print(f"\nin-process, {LARGE_CELLS:,} cells, {input_mb:.0f} MB input (CSR {csr_bytes(LARGE_CELLS) / MB:.0f} MB), "
          f"chunk {LARGE_CHUNK_SIZE}, shard {LARGE_SHARD_SIZE}: process peak RSS {rss['peak_mb']:.0f} MB "
          f"(after imports {rss['base_mb']:.0f} MB, conversion +{rss['peak_mb'] - rss['base_mb']:.0f} MB), "
          f"input = {input_mb / rss['peak_mb']:.1f}x the peak, {seconds:.1f} s")

    # the whole process, imports included, peaked at under a third of the input, and what
    # the conversion added to the imports at under a fifth
    assert rss["peak_mb"] < input_mb / 3
    assert rss["peak_mb"] - rss["base_mb"] < input_mb / 5
    assert verify_dataset(out) == []
    m = read_manifest(out)
    assert (m.n_cells, m.nnz) == (LARGE_CELLS, LARGE_CELLS * NNZ_PER_CELL)
    assert sum(s.n_cells for s in m.shards) == LARGE_CELLS
    assert len(m.shards) == -(-LARGE_CELLS // LARGE_SHARD_SIZE)
    shutil.rmtree(out)
