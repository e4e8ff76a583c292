#!/usr/bin/env python
"""Loader workers, transforms, first/cold epochs and on-the-fly preprocessing (issue 11; not a test).

On the 100k-cell benchmark set (``scripts/make_bench_data.py``, converted raw and with
``--normalize library_size --log1p --no-bake``), batch 256, in one run:

* ``workers``: cells/s of one epoch for every output (csr reading every value and index,
  mixed-block csr, padded/rank/binned at max_genes 2048, dense) with ``num_workers`` 0, 1, 2;
  repetitions interleaved across worker counts; best and median of ``--reps``;
* ``transform``: a per-batch transform burning ~3 ms of CPU, in torch ops (GIL released) and
  in pure Python (GIL held), with 0, 1, 2 workers;
* ``memory``: peak Pss_Anon and Pss_Shmem (the slots) of the process tree, 2 workers;
* ``first``: the first epoch in a fresh process (warm page cache) against the same process's
  later epochs, read-ahead on and off;
* ``cold``: the disk's cold sequential read of the shard files, then an epoch in a fresh
  process after dropping the page cache, read-ahead on and off (needs root);
* ``preprocessing``: csr and padded output of the unbaked dataset against the raw dataset's
  csr every-byte epoch.

    python scripts/bench_workers.py --raw /tmp/scmf-bench/ds-raw --norm /tmp/scmf-bench/ds-norm \\
        --out bench-out/workers.json --plot docs/img/bench_loader_workers.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_loader import MemoryProbe, touch  # noqa: E402

from scmf_loader import CSRBatch  # noqa: E402

BATCH = 256
OUTPUTS: dict[str, dict[str, Any]] = {
    "csr": {},
    "csr_mixed_blocks": {"block_size": 32},
    "padded": {"output": "padded", "max_genes": 2048},
    "rank": {"output": "rank", "max_genes": 2048},
    "binned": {"output": "binned", "max_genes": 2048},
    "dense": {"output": "dense"},
}


def consume(batch: Any) -> None:
    """What the timed loop does with a batch: CSR batches have every value and index read."""
    if isinstance(batch, CSRBatch) and len(batch.values):
        touch(batch.values.numpy(), batch.indices.numpy())


def epoch(loader: Any) -> tuple[float, float]:
    """Wall and CPU (this process) seconds of one epoch."""
    w, c = time.perf_counter(), time.process_time()
    for b in loader:
        consume(b)
    return time.perf_counter() - w, time.process_time() - c


def tree_cpu() -> float:
    """CPU seconds of this process (all its threads) and its live child processes."""
    import contextlib

    import psutil

    kids = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            kids += sum(child.cpu_times()[:2])
    return time.process_time() + kids


def _stats(n: int, times: list[float]) -> dict[str, Any]:
    return {"best": n / min(times), "median": n / statistics.median(times), "seconds": times}


#: "N": N workers of the default worker_type ("auto"); "pN" / "tN": N worker processes /
#: threads, measured only where the default is the other kind
WORKERS = ("0", "1", "2", "p1", "p2", "t1", "t2")
_KINDS = {"p": "process", "t": "thread"}


def _loaders(ds: Any, name: str, workers: tuple[str, ...], transform: Any) -> dict[str, Any]:
    from scmf_loader import CellDataLoader

    out: dict[str, Any] = {}
    for w in workers:
        kind = _KINDS.get(w[0], "auto")
        ld = CellDataLoader(ds, batch_size=BATCH, num_workers=int(w.lstrip("pt")), drop_last=False,
                            transform=transform, worker_type=kind, **OUTPUTS[name])
        if kind == "auto" or out.get(w[1:]) is None or out[w[1:]].worker_type != kind:
            out[w] = ld
    return out


def bench_workers(path: Path, reps: int, outputs: list[str], workers: tuple[str, ...] = WORKERS,
                  transform: Any = None) -> dict[str, Any]:
    """cells/s per output and worker setting; repetitions interleaved across the settings."""
    from scmf_loader import CellDataset

    ds = CellDataset(path)
    out: dict[str, Any] = {}
    for name in outputs:
        loaders = _loaders(ds, name, workers, transform)
        kinds = {w: ld.worker_type for w, ld in loaders.items()}
        for ld in loaders.values():
            epoch(ld)  # worker start-up and first touches out of the way
        times: dict[str, list[float]] = {w: [] for w in loaders}
        cpu: dict[str, list[float]] = {w: [] for w in loaders}
        for _ in range(reps * (3 if name.startswith("csr") else 1)):  # cheap epochs: more of them
            for w, ld in loaders.items():
                c = tree_cpu()
                times[w].append(epoch(ld)[0])
                cpu[w].append(tree_cpu() - c)
        out[name] = {w: {**_stats(len(ds), t), "worker_type": kinds[w], "cpu_seconds": cpu[w]}
                     for w, t in times.items()}
        del loaders
        print(name, {w: f"{v['best']:,.0f}" for w, v in out[name].items()}, flush=True)
    return out


def _calibrate(run: Any, ms: float, unit: int = 1, seconds: float = 0.3) -> int:
    """Iterations of ``run(k)`` (k iterations) costing ``ms`` of CPU each call: warmed up
    first (the first calls of a torch op cost ~10x the later ones), then timed over at
    least ``seconds`` of CPU, best of 3 (another process may share the core)."""
    run(10 * unit)
    k, per = unit, []
    while True:
        t = time.process_time()
        run(k)
        dt = time.process_time() - t
        if dt >= seconds / 3:
            per.append(dt / k)
            if len(per) == 3:
                return max(1, round(ms / 1e3 / min(per)))
        else:
            k *= 2


class BurnTorch:
    """~``ms`` of CPU per batch in torch ops (which release the GIL)."""

    def __init__(self, ms: float = 3.0) -> None:
        import torch

        self.x = torch.rand(1 << 16)
        self.n = _calibrate(self._burn, ms)

    def _burn(self, n: int) -> None:
        import torch

        for _ in range(n):
            torch.exp(self.x)

    def __call__(self, batch: Any) -> Any:
        self._burn(self.n)
        return batch


class BurnPython:
    """~``ms`` of CPU per batch in pure Python (holding the GIL)."""

    def __init__(self, ms: float = 3.0) -> None:
        self.n = _calibrate(self._spin, ms, unit=1000)

    @staticmethod
    def _spin(n: int) -> int:
        s = 0
        for i in range(n):
            s += i
        return s

    def __call__(self, batch: Any) -> Any:
        self._spin(self.n)
        return batch


def bench_memory(path: Path, outputs: list[str]) -> dict[str, Any]:
    from scmf_loader import CellDataLoader, CellDataset

    ds = CellDataset(path)
    out = {}
    for name in outputs:
        ld = CellDataLoader(ds, batch_size=BATCH, num_workers=2, drop_last=False, **OUTPUTS[name])
        with MemoryProbe(0.05) as probe:
            epoch(ld)
            epoch(ld)
        out[name] = {"pss_anon_mb": probe.peak_pss_anon, "pss_shmem_mb": probe.peak_pss_shmem,
                     "rss_anon_mb": probe.peak_rss_anon}
        del ld
    return out


def child_epochs(path: str, read_ahead: int, epochs: int) -> None:
    """In a fresh process: the first epoch and later ones (JSON on stdout)."""
    t0 = time.perf_counter()
    from scmf_loader import CellDataLoader, CellDataset

    ds = CellDataset(path)
    ld = CellDataLoader(ds, batch_size=BATCH, num_workers=0, drop_last=False, read_ahead=read_ahead)
    t1 = time.perf_counter()
    runs = [epoch(ld) for _ in range(epochs)]
    nbytes = sum(ds.store.csr(s).data.nbytes + ds.store.csr(s).indices.nbytes for s in range(ds.store.n_shards))
    print(json.dumps({"cells": len(ds), "bytes": nbytes, "import_open_s": t1 - t0,
                      "wall": [r[0] for r in runs], "cpu": [r[1] for r in runs]}))


def _child(path: Path, read_ahead: int, epochs: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, "--child", str(path), "--read-ahead", str(read_ahead),
                        "--epochs", str(epochs)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_first(path: Path, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"8": [], "0": []}
    for _ in range(reps):
        for ra in (8, 0):
            r = _child(path, ra, 3)
            out[str(ra)].append({"first": r["cells"] / r["wall"][0], "steady": r["cells"] / min(r["wall"][1:]),
                                 "first_cpu": r["cells"] / r["cpu"][0], "steady_cpu": r["cells"] / min(r["cpu"][1:])})
    for ra, runs in out.items():
        ratios = [x["first"] / x["steady"] for x in runs]
        print(f"first epoch read_ahead={ra}: ratio to steady (wall) {[round(x, 2) for x in ratios]}", flush=True)
    return out


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cold_sequential(path: Path) -> float:
    """GB/s of reading every shard array file once, in order, with 16 MiB reads, cold."""
    files = sorted(path.glob("shards/*/X/*/c/0"))
    drop_caches()
    buf = bytearray(16 << 20)
    n, t = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    return n / (time.perf_counter() - t) / 1e9


def bench_cold(path: Path, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"sequential_gbps": [], "8": [], "0": []}
    for _ in range(reps):
        out["sequential_gbps"].append(cold_sequential(path))
        for ra in (8, 0):
            drop_caches()
            r = _child(path, ra, 1)
            out[str(ra)].append(r["bytes"] / r["wall"][0] / 1e9)
    print("cold:", {k: [round(x, 2) for x in v] for k, v in out.items()}, flush=True)
    return out


def bench_preprocessing(raw: Path, norm: Path, reps: int) -> dict[str, Any]:
    from scmf_loader import CellDataLoader, CellDataset

    loaders = {
        "raw_csr_every_byte": CellDataLoader(CellDataset(raw), batch_size=BATCH, num_workers=0, drop_last=False),
        "norm_csr": CellDataLoader(CellDataset(norm), batch_size=BATCH, num_workers=0, drop_last=False),
        "norm_padded_2048": CellDataLoader(CellDataset(norm), batch_size=BATCH, num_workers=0, drop_last=False,
                                           output="padded", max_genes=2048),
        "raw_padded_2048": CellDataLoader(CellDataset(raw), batch_size=BATCH, num_workers=0, drop_last=False,
                                          output="padded", max_genes=2048),
    }
    n = len(loaders["norm_csr"].dataset)
    for ld in loaders.values():
        epoch(ld)
    wall: dict[str, list[float]] = {k: [] for k in loaders}
    cpu: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(reps):
        for k, ld in loaders.items():
            w, c = epoch(ld)
            wall[k].append(w)
            cpu[k].append(c)
    out = {k: {"wall": _stats(n, wall[k]), "cpu": _stats(n, cpu[k])} for k in loaders}
    print("preprocessing (cpu best):", {k: f"{v['cpu']['best']:,.0f}" for k, v in out.items()}, flush=True)
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    series = [(name, per) for name, per in res["workers"].items()]
    series += [(f"csr + 3 ms {name}", per["transform"]) for name, per in res.get("transform", {}).items()]
    for i, (name, per) in enumerate(series):
        color = f"C{i}"
        kinds = (("default", "o-", ("0", "1", "2")), ("processes", "^:", ("0", "p1", "p2")),
                 ("threads", "s--", ("0", "t1", "t2")))
        for kind, style, ws in kinds:
            ws = [w for w in ws if w in per]
            if len(ws) > 1:
                ax.plot([int(w.lstrip("pt")) for w in ws], [per[w]["best"] for w in ws], style, color=color,
                        label=f"{name} ({kind}: {per['1'].get('worker_type', 'process')})" if kind == "default"
                        else f"{name} ({kind})")
    ax.set_xlabel("num_workers")
    ax.set_xticks([0, 1, 2])
    ax.set_ylabel("cells/s (best of reps, wall time)")
    ax.set_yscale("log")
    ax.set_title("CellDataLoader, 100k cells x 20k genes, batch 256 (2-core shared machine)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _k(x: float) -> str:
    return f"{x:,.0f}"


def markdown(res: dict[str, Any]) -> str:
    """The docs/benchmarks.md section of these results."""
    m = res.get("machine", {})
    lines = [f"Run {m.get('date', '?')}, {m.get('cpus')} cores, load average at start "
             f"{tuple(round(x, 1) for x in m.get('load_average_at_start', ()))}, at end "
             f"{tuple(round(x, 1) for x in m.get('load_average_at_end', ()))}.", ""]
    if "workers" in res:
        ws = list(WORKERS)
        lines += ["cells/s, wall time, best (median) of the repetitions; `N` = N workers of the default "
                  "`worker_type=\"auto\"` (its choice in the `default` column), `pN` / `tN` = N worker "
                  "processes / threads, measured where the default is the other kind; ratios of best to `0`:", "",
                  "| output | default | " + " | ".join(ws) + " | " + " | ".join(f"{w} / 0" for w in ws[1:]) + " |",
                  "| --- | --- |" + " ---: |" * (2 * len(ws) - 1)]
        rows = [(name, per) for name, per in res["workers"].items()]
        rows += [(f"csr + 3 ms transform, {name}", per["transform"]) for name, per in res.get("transform", {}).items()]
        for name, per in rows:
            kind = per.get("1", {}).get("worker_type", "process")
            cells = [f"{_k(per[w]['best'])} ({_k(per[w]['median'])})" if w in per else "" for w in ws]
            r = [f"{per[w]['best'] / per['0']['best']:.2f}" if w in per else "" for w in ws[1:]]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells + r) + " |")
        lines.append("")
        lines += ["CPU seconds of the whole process tree (loader, worker threads and processes) per epoch, median, "
                  "relative to `0` (what the hand-over costs, whatever the load):", "",
                  "| output | " + " | ".join(f"{w} / 0" for w in ws[1:]) + " |", "| --- |" + " ---: |" * (len(ws) - 1)]
        for name, per in rows:
            if "cpu_seconds" not in per.get("0", {}):
                continue
            base = statistics.median(per["0"]["cpu_seconds"])
            r = [f"{statistics.median(per[w]['cpu_seconds']) / base:.2f}" if w in per else "" for w in ws[1:]]
            lines.append(f"| {name} | " + " | ".join(r) + " |")
        lines.append("")
    if "memory" in res:
        lines += ["| 2 workers, default `worker_type` (threads) | peak Pss_Anon MB (tree) | peak Pss_Shmem MB (slots) | RssAnon sum MB |",
                  "| --- | ---: | ---: | ---: |"]
        for name, v in res["memory"].items():
            lines.append(f"| {name} | {v['pss_anon_mb']:.0f} | {v['pss_shmem_mb']:.0f} | {v['rss_anon_mb']:.0f} |")
        lines.append("")
    if "first" in res:
        lines += ["| first epoch, fresh process, warm page cache | first cells/s | steady cells/s | ratio |",
                  "| --- | ---: | ---: | ---: |"]
        for ra, runs in res["first"].items():
            for x in runs:
                lines.append(f"| read_ahead={ra} | {_k(x['first'])} | {_k(x['steady'])} | "
                             f"{x['first'] / x['steady']:.2f} |")
        lines.append("")
    if "cold" in res:
        c = res["cold"]
        lines += ["| cold | GB/s per run |", "| --- | --- |",
                  "| sequential read of the shard files (16 MiB reads) | " + ", ".join(f"{x:.2f}" for x in c["sequential_gbps"]) + " |"]
        for ra in ("8", "0"):
            ratios = ", ".join(f"{x:.2f} ({x / s:.0%})" for x, s in zip(c[ra], c["sequential_gbps"], strict=False))
            lines.append(f"| loader epoch after dropping the page cache, read_ahead={ra} (share of sequential) | {ratios} |")
        lines.append("")
    if "preprocessing" in res:
        p = res["preprocessing"]
        base = p["raw_csr_every_byte"]
        lines += ["| unbaked `--normalize library_size --log1p`, one process | cells/s CPU time | wall | "
                  "share of the raw csr every-byte epoch (CPU) |", "| --- | ---: | ---: | ---: |"]
        for k, v in p.items():
            lines.append(f"| {k} | {_k(v['cpu']['best'])} | {_k(v['wall']['best'])} | "
                         f"{v['cpu']['best'] / base['cpu']['best']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path)
    p.add_argument("--norm", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cold-reps", type=int, default=1, help="each drops the page cache 3 times (machine-wide)")
    p.add_argument("--phases", default="workers,transform,memory,first,cold,preprocessing")
    p.add_argument("--outputs", default=",".join(OUTPUTS))
    p.add_argument("--child")
    p.add_argument("--read-ahead", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--markdown", action="store_true", help="print the docs section of --out and exit")
    a = p.parse_args(argv)
    if a.child:
        child_epochs(a.child, a.read_ahead, a.epochs)
        return 0
    if a.markdown:
        print(markdown(json.loads(a.out.read_text())))
        return 0
    phases = a.phases.split(",")
    res: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() else {}
    res["machine"] = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "date": time.ctime()}

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")

    if "workers" in phases:
        res["workers"] = bench_workers(a.raw, a.reps, a.outputs.split(","))
        save()
    if "transform" in phases:
        import torch

        torch.set_num_threads(1)  # as in DataLoader workers: ~3 ms of one core, no OpenMP spinning
        res["transform"] = {}
        for name, fn in (("torch ops", BurnTorch()), ("pure Python", BurnPython())):
            r = bench_workers(a.raw, a.reps, ["csr"], transform=fn)
            t = time.process_time()
            for _ in range(20):
                fn(None)
            res["transform"][name] = {"transform": r["csr"], "iterations": fn.n,
                                      "cpu_ms_per_call": (time.process_time() - t) / 20 * 1e3}
            save()
    if "memory" in phases:
        res["memory"] = bench_memory(a.raw, ["padded", "dense"])
        print("memory:", res["memory"], flush=True)
        save()
    if "first" in phases:
        res["first"] = bench_first(a.raw, a.reps)
        save()
    if "cold" in phases:
        res["cold"] = bench_cold(a.raw, a.cold_reps)
        save()
    if "preprocessing" in phases:
        res["preprocessing"] = bench_preprocessing(a.raw, a.norm, a.reps)
        save()
    res["machine"]["load_average_at_end"] = os.getloadavg()
    save()
    if a.plot and "workers" in res:
        plot(res, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
