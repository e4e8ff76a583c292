"""Peak memory of conversion workers at several dataset sizes (not shipped).

Shows that memory per task is bounded by the shard size and the read chunk, never by the
dataset size: the same conversion (same ``--shard-size``, ``--chunk-size``, workers) runs on
datasets of growing size, and the peak resident memory of every dask worker process is
reported. Data: ``scripts/make_bench_data.py`` (~2,000 non-zeros per cell over 20k genes,
CSR, float32 counts), written once per size under ``--workdir``.

Each conversion runs in a fresh driver process with its own local dask cluster of
``--workers`` single-threaded worker processes. Per worker: ``ru_maxrss`` after the worker
imported the converter (``base``) and after the conversion (``peak``), read inside the worker
from ``VmHWM`` in ``/proc/self/status``; ``peak - base`` is what the tasks added. The driver's own peak
(scheduler and nannies run in it) is reported too.

    python scripts/bench_convert_memory.py --sizes 20000 80000 --workdir /tmp/bench-mem
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent


def _maxrss_mb() -> float:
    """Peak resident memory of this process image (``VmHWM``), MB. Unlike ``ru_maxrss`` it
    does not carry over the peak of the parent a process was forked from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def _warm_up() -> float:
    """Import what a conversion task imports; return this process's peak RSS (MB)."""
    import anndata  # noqa: F401
    import h5py  # noqa: F401
    import zarr  # noqa: F401

    import scmf_shards.convert  # noqa: F401

    return _maxrss_mb()


def convert_once(source: str, output: str, workers: int, shard_size: int, chunk_size: int) -> dict[str, Any]:
    """One conversion on a fresh local cluster; worker and driver peaks in MB."""
    from distributed import Client, LocalCluster

    from scmf_shards.convert import convert_h5ad

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as client:
        base = client.run(_warm_up)
        driver_base = _maxrss_mb()
        t0 = time.perf_counter()
        m = convert_h5ad([source], output, scheduler=cluster.scheduler_address, shard_size=shard_size,
                         chunk_size=chunk_size, obs_columns=("cell_type",), quiet=True)
        seconds = time.perf_counter() - t0
        peak = client.run(_maxrss_mb)
    names = sorted(base)
    return {
        "n_cells": m.n_cells,
        "nnz": m.nnz,
        "n_shards": len(m.shards),
        "seconds": seconds,
        "cells_per_s": m.n_cells / seconds,
        "worker_base_mb": [round(base[w]) for w in names],
        "worker_peak_mb": [round(peak[w]) for w in names],
        "worker_task_mb": [round(peak[w] - base[w]) for w in names],
        "driver_base_mb": round(driver_base),
        "driver_peak_mb": round(_maxrss_mb()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000], help="cells per dataset")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--chunk-size", type=int, default=8_192)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/convert-memory"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_convert", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._convert:  # child: one conversion, JSON on stdout
        print(json.dumps(convert_once(*a._convert, a.workers, a.shard_size, a.chunk_size)))
        return

    sys.path.insert(0, str(SCRIPTS))
    from make_bench_data import make

    a.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in a.sizes:
        src = a.workdir / f"cells_{n}.h5ad"
        if not src.exists():
            make(n, src)
        out = a.workdir / f"ds_{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "--workers", str(a.workers), "--shard-size", str(a.shard_size),
               "--chunk-size", str(a.chunk_size), "--_convert", str(src), str(out)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r["input_gb"] = round(src.stat().st_size / 1e9, 3)
        results.append(r)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{n:>9,} cells ({r['input_gb']:.2f} GB, {r['n_shards']} shards): "
              f"worker peak RSS {r['worker_peak_mb']} MB (imports {r['worker_base_mb']} MB, "
              f"tasks +{r['worker_task_mb']} MB), driver peak {r['driver_peak_mb']} MB, "
              f"{r['seconds']:.1f} s ({r['cells_per_s']:,.0f} cells/s)", flush=True)
    doc = {"workers": a.workers, "shard_size": a.shard_size, "chunk_size": a.chunk_size, "results": results}
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
