"""Streaming benchmark: StreamingCellDataset from a loopback S3 server vs the local loader.

Builds two synthetic datasets (``scripts/bench_loader.generate_h5ad`` converted with
``scmf-convert``'s library function), serves them from moto's S3 server on 127.0.0.1
(``tests/s3_fixtures.py``), and measures, each step in a fresh process, after a short warm-up
(three batches of the other dataset, read in place: imports and first calls), the first
epoch read by a consumer that reads every value and index once (``bench_loader.touch``):

- local: ``CellDataLoader(CellDataset(dir), batch_size=256, num_workers=0)``, warm page cache;
- warm: ``StreamingCellDataset(s3://..., batch_size=256)`` with every shard already cached;
- cold: the same from an empty cache through a proxy adding ``--latency`` s to every request;
- raw: a plain recursive ``s3fs`` download of the same shards through the same proxy (the
  ceiling any cold reader has here);
- memory: peak RssAnon (``/proc/self/status``, sampled every 20 ms) of a cold streaming epoch
  at both dataset sizes (the S3 server and proxy run in the parent, not counted);
- server_probe: the loopback server's own throughput on one 32 MB object, read whole or as
  4 or 8 parallel ranged GETs, straight and through the proxy, with the CPU milliseconds per
  MB of the client and of the server (+ proxy) threads;
- shard_requests: where one shard's download goes (listing, its two large CSR files, its
  small files concurrently and one by one, the whole shard in one ``fs.get``).

Every epoch step also reports its CPU seconds (``time.process_time``), and the load average
is recorded at the start and the end: other processes on a shared machine move wall times.

    python scripts/bench_streaming.py --out bench-out/streaming.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests"), str(ROOT)]


def build(workdir: Path, n_cells: int, nnz: int, shard_size: int) -> Path:
    """The dataset directory of ``n_cells`` synthetic cells (reused when present)."""
    out = workdir / f"ds_{n_cells}_{nnz}"
    if (out / "manifest.json").is_file():
        return out
    from bench_loader import generate_h5ad

    from scmf_shards.convert import convert_h5ad

    h5ad = workdir / f"cells_{n_cells}_{nnz}.h5ad"
    if not h5ad.is_file():
        generate_h5ad(h5ad, n_cells, 20_000, nnz)
    convert_h5ad([h5ad], out, shard_size=shard_size, obs_columns=("cell_type", "batch"), vocab="union",
                 quiet=True)
    return out


# ---- the measured step (in a child process) -------------------------------------------------
class PeakRssAnon:
    """Samples this process's RssAnon every 20 ms in a daemon thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from bench_loader import rss_anon_mb

        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One epoch as ``spec`` says; cells, seconds and peak RssAnon."""
    from bench_loader import touch

    from scmf_loader import CellDataLoader, CellDataset
    from scmf_loader.streaming import StreamingCellDataset

    if spec["mode"] == "raw":  # the ceiling: one recursive parallel download, nothing else
        import s3fs
        from s3_fixtures import storage_options

        fs = s3fs.S3FileSystem(**storage_options(spec["endpoint"]))
        t = time.perf_counter()
        fs.get(spec["url"][len("s3://"):] + "/shards", spec["cache"] + "/raw", recursive=True)
        seconds = time.perf_counter() - t
        return {"cells": spec["n_cells"], "seconds": seconds, "cells_per_s": spec["n_cells"] / seconds,
                "peak_rss_anon_mb": 0.0}
    if spec["mode"] == "probe":
        return probe_child(spec)
    if spec["mode"] == "requests":
        return requests_child(spec)
    if spec["mode"] == "local":
        it: Any = CellDataLoader(CellDataset(spec["path"]), batch_size=256, num_workers=0, seed=1, drop_last=False)
    else:
        from s3_fixtures import storage_options

        it = StreamingCellDataset(spec["url"], batch_size=256, cache_dir=spec["cache"], rank=0, world_size=1,
                                  storage_options=storage_options(spec["endpoint"]),
                                  prefetch_shards=spec.get("prefetch", 2), seed=1)
    for i, batch in enumerate(StreamingCellDataset(spec["warmup"], batch_size=256, world_size=1, rank=0)):
        touch(batch.values.numpy(), batch.indices.numpy())  # one-time costs (imports, first calls)
        if i == 2:
            break
    mem = PeakRssAnon()
    cells = 0
    t, cpu = time.perf_counter(), time.process_time()
    for batch in it:
        touch(batch.values.numpy(), batch.indices.numpy())
        cells += len(batch)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds, "cpu_seconds": cpu,
            "peak_rss_anon_mb": mem.stop()}


def probe_child(spec: dict[str, Any]) -> dict[str, Any]:
    """GET one object ``spec["reps"]`` times, split into ``spec["ranges"]`` ranged GETs run
    in parallel (s3fs ``cat_ranges``): wall seconds and this client's CPU seconds."""
    import s3fs
    from s3_fixtures import storage_options

    fs = s3fs.S3FileSystem(**storage_options(spec["endpoint"]))
    path = spec["url"][len("s3://"):]
    size = len(fs.cat_file(path))  # (also opens the connection)
    k = spec["ranges"]
    bounds = [(size * j // k, size * (j + 1) // k) for j in range(k)]
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(spec["reps"]):
        got = fs.cat_ranges([path] * k, [a for a, _ in bounds], [b for _, b in bounds])
        if sum(len(g) for g in got) != size:
            raise RuntimeError(f"{spec}: got {[len(g) if isinstance(g, bytes) else repr(g)[:300] for g in got]} of {size}")
    return {"seconds": time.perf_counter() - t, "client_cpu_s": time.process_time() - cpu,
            "bytes": size * spec["reps"]}


def requests_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Where one shard's download time goes: seconds (best of 3) to list it, to GET its two
    large CSR files, its small files (zarr metadata, obs, var) concurrently and one by one,
    and the whole shard as the streaming cache fetches it (one ``fs.get``)."""
    import s3fs
    from s3_fixtures import storage_options

    fs = s3fs.S3FileSystem(**storage_options(spec["endpoint"]))
    root = spec["url"][len("s3://"):] + "/shards/000000.zarr"
    files = sorted(fs.find(root))
    big = [p for p in files if p.endswith(("X/data/c/0", "X/indices/c/0"))]
    small = [p for p in files if p not in big]
    tmp = Path(spec["cache"]) / "requests"
    out: dict[str, Any] = {"files": len(files), "large_MB": round(sum(fs.size(p) for p in big) / 1e6, 1)}

    def best(name: str, fn: Any, reps: int = 3) -> None:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = round(min(times), 3)

    best("list_s", lambda: fs.find(root))
    best("large_files_s", lambda: fs.cat(big))
    best("small_files_concurrent_s", lambda: fs.cat(small))
    best("small_files_one_by_one_s", lambda: [fs.cat_file(p) for p in small], 1)
    best("whole_shard_get_s", lambda: fs.get(files, [str(tmp / str(i)) for i in range(len(files))]))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def probe(server: Any, proxy: Any, bucket: str, mb: int, reps: int) -> dict[str, Any]:
    """The loopback server's own throughput: one ``mb`` MB object read whole or as 4 or 8
    parallel ranged GETs, straight and through the latency proxy; with the CPU seconds per
    MB of the client (child process) and of the server (+ proxy) threads (this process)."""
    url = f"s3://{bucket}/probe.bin"
    server.put(url, os.urandom(mb << 20))
    out = {}
    for name, endpoint in (("direct", server.endpoint), ("proxy", proxy.endpoint)):
        for k in (1, 4, 8):
            cpu = time.process_time()
            r = run_child({"mode": "probe", "endpoint": endpoint, "url": url, "ranges": k, "reps": reps})
            server_cpu = time.process_time() - cpu
            mbytes = r["bytes"] / 1e6
            out[f"{name}_{k}"] = {"MB_per_s": round(mbytes / r["seconds"], 1),
                                  "server_cpu_ms_per_MB": round(1e3 * server_cpu / mbytes, 2),
                                  "client_cpu_ms_per_MB": round(1e3 * r["client_cpu_s"] / mbytes, 2)}
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=False,
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(f"step {spec['mode']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(spec: dict[str, Any], reps: int, before: Any = None) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        if before is not None:
            before()
        runs.append(run_child(spec))
    best = sorted(runs, key=lambda r: r["cells_per_s"])[len(runs) // 2]
    return {**best, "runs_cells_per_s": [round(r["cells_per_s"]) for r in runs],
            "median_cells_per_s": statistics.median(r["cells_per_s"] for r in runs)}


# ---- the whole benchmark ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON result path (required)")
    p.add_argument("--workdir", default="/tmp/scmf-bench-streaming")
    p.add_argument("--cells", type=int, nargs=2, default=[20_000, 50_000], help="the two dataset sizes")
    p.add_argument("--nnz", type=int, default=500, help="non-zeros per cell")
    p.add_argument("--shard-size", type=int, default=2_500)
    p.add_argument("--latency", type=float, default=0.05, help="seconds added to every request (cold)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not args.out:
        p.error("--out is required")

    from s3_fixtures import FaultProxy, MotoS3

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dirs = [build(work, n, args.nnz, args.shard_size) for n in args.cells]
    server = MotoS3()
    server.start()
    bucket = server.make_bucket()
    urls = [server.upload(d, f"s3://{bucket}/{d.name}") for d in dirs]
    proxy = FaultProxy(server.port, delay_s=args.latency).start()
    cache = work / "cache"

    def fresh() -> None:
        shutil.rmtree(cache, ignore_errors=True)

    small = {"url": urls[0], "cache": str(cache), "endpoint": server.endpoint, "warmup": str(dirs[1])}
    res: dict[str, Any] = {"cells": args.cells, "nnz_per_cell": args.nnz, "shard_size": args.shard_size,
                           "latency_s": args.latency, "load_start": os.getloadavg()}
    res["local"] = median_of({**small, "mode": "local", "path": str(dirs[0])}, args.reps + 1)
    fresh()
    run_child({**small, "mode": "stream"})  # fills the cache
    res["warm"] = median_of({**small, "mode": "stream"}, args.reps)
    for depth in (2, 8):
        res[f"cold_prefetch_{depth}"] = median_of(
            {**small, "mode": "stream", "endpoint": proxy.endpoint, "prefetch": depth}, max(args.reps - 1, 1), fresh)
    res["raw_download"] = median_of({**small, "mode": "raw", "endpoint": proxy.endpoint, "n_cells": args.cells[0]},
                                    max(args.reps - 1, 1), fresh)
    res["raw_download_no_proxy"] = median_of({**small, "mode": "raw", "n_cells": args.cells[0]}, 1, fresh)
    for n, url in zip(args.cells, urls, strict=True):
        res[f"memory_{n}"] = median_of({**small, "url": url, "mode": "stream"}, 1, fresh)
    res["server_probe"] = probe(server, proxy, bucket, 32, 2)
    res["shard_requests"] = {name: run_child({**small, "mode": "requests", "endpoint": endpoint})
                             for name, endpoint in (("direct", server.endpoint), ("proxy", proxy.endpoint))}
    res["load_end"] = os.getloadavg()
    proxy.stop()
    server.stop()
    res["warm_vs_local"] = res["warm"]["median_cells_per_s"] / res["local"]["median_cells_per_s"]
    res["warm_vs_local_cpu"] = (res["warm"]["cells"] / res["warm"]["cpu_seconds"]) / (
        res["local"]["cells"] / res["local"]["cpu_seconds"])
    for depth in (2, 8):
        cold = res[f"cold_prefetch_{depth}"]["median_cells_per_s"]
        res[f"cold_{depth}_vs_warm"] = cold / res["warm"]["median_cells_per_s"]
        res[f"cold_{depth}_vs_raw_download"] = cold / res["raw_download"]["median_cells_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
