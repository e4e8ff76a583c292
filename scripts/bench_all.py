"""One command for the whole benchmark report (not shipped): data, conversion, loader, peers,
JSON results, plots in docs/img/ and docs/benchmarks.md.

    python scripts/bench_all.py --cells 100000 --out bench-out/
    python scripts/bench_all.py --input my.h5ad --out bench-out/     # your own file

Every measured step runs in its own process and its memory is sampled from /proc (RSS and
RssAnon summed over the process tree, every 20 ms). Throughputs are the median of
``--runs`` runs. Peers run under ``--peers-python`` (a separate virtualenv holding
scdataset and bionemo-scdl, whose dependencies never touch the project's environment); a
peer that cannot be installed or fails is reported with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

OBS = "cell_type,batch,donor"


# ---- measurement helpers -------------------------------------------------------------------
def _status_kb(pid: int) -> tuple[int, int]:
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return rss, anon


def _pss_anon_kb(pid: int) -> int:
    """Pss_Anon: private anonymous memory with pages shared copy-on-write between a forked
    DataLoader worker and its parent counted once over the tree (RssAnon counts them in
    every process)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return []


def run_measured(cmd: list[str], timeout: float = 1800, env: dict[str, str] | None = None,
                 pss: bool = False) -> dict[str, Any]:
    """Run ``cmd``; return rc, wall seconds, stdout, stderr tail, and the peak over time of the
    process tree's summed RSS and RssAnon (MB), and with ``pss`` of Pss_Anon (reading
    ``smaps_rollup`` walks every mapping: it costs the sampler ~25% of a core, so only the
    loader runs, whose workers share pages, ask for it)."""
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    peak = {"rss": 0, "anon": 0, "pss_anon": 0}
    want_pss = pss
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = anon = pss = 0
            for p in _tree(proc.pid):
                r, a = _status_kb(p)
                rss += r
                anon += a
                pss += _pss_anon_kb(p) if want_pss else 0
            peak["rss"] = max(peak["rss"], rss)
            peak["anon"] = max(peak["anon"], anon)
            peak["pss_anon"] = max(peak["pss_anon"], pss)
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[timed out after {timeout} s]"
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant (dask workers too)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"rc": proc.returncode, "wall_s": wall, "cpu_s": cpu, "stdout": out,
            "stderr_tail": err[-3000:], "peak_rss_mb": peak["rss"] / 1024, "peak_anon_mb": peak["anon"] / 1024,
            "peak_pss_anon_mb": peak["pss_anon"] / 1024}


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output: {text[-500:]!r}")


def drop_cache(path: Path) -> None:
    """Drop one file's pages from the page cache (sync first so none is dirty)."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_speed(path: Path, cold: bool) -> float:
    """Sequential read of the whole file in 8 MiB pieces, bytes/s."""
    if cold:
        drop_cache(path)
    buf = bytearray(8 << 20)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    return n / (time.perf_counter() - t0)


def primitives(scratch: Path) -> dict[str, float]:
    """Machine limits the conversion is made of: memcpy, sha256, page-cache write (GB/s)."""
    a = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    b = np.empty_like(a)
    b[:] = 0
    out: dict[str, list[float]] = {"memcpy": [], "sha256": [], "write_page_cache": []}
    f = scratch / "prim.bin"
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        out["memcpy"].append(a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        hashlib.sha256(memoryview(a)).digest()
        out["sha256"].append(a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        with open(f, "wb") as fh:
            fh.write(memoryview(a))
        out["write_page_cache"].append(a.nbytes / (time.perf_counter() - t) / 1e9)
        f.unlink()
    # what the disk sustains: 1 GiB written and fdatasync'ed after a sync (the page cache
    # only hides this until the kernel's dirty limit; a conversion writes more than that)
    os.sync()
    t = time.perf_counter()
    with open(f, "wb") as fh:
        for _ in range(4):
            fh.write(memoryview(a))
        fh.flush()
        os.fdatasync(fh.fileno())
    out["write_disk_sustained"] = [4 * a.nbytes / (time.perf_counter() - t) / 1e9]
    f.unlink()
    return {k: statistics.median(v) for k, v in out.items()}


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"nproc": os.cpu_count(), "ram_gb": round(mem_kb / 1024**2, 1), "cpu": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg(), "date": dt.datetime.now().isoformat(timespec="seconds")}


def versions(peers_python: str | None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("numpy", "scipy", "torch", "anndata", "h5py", "zarr", "dask", "scanpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[p] = version(p)
    if peers_python:
        code = ("import json;from importlib.metadata import version as v\nr={}\n"
                "for p in ('scdataset','bionemo-scdl','tiledbsoma-ml'):\n"
                "    try: r[p]=v(p)\n    except Exception: pass\nprint(json.dumps(r))")
        r = subprocess.run([peers_python, "-c", code], capture_output=True, text=True)
        if r.returncode == 0:
            out.update(last_json(r.stdout))
    with contextlib.suppress(OSError):
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=ROOT).stdout.strip()
    return out


# ---- steps ---------------------------------------------------------------------------------
def make_data(n: int, out: Path) -> Path:
    from make_bench_data import make

    path = out / "data" / f"cells_{n}.h5ad"
    if not path.exists():
        make(n, path)
    return path


def convert(src: Path, dst: Path, workers: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if dst.exists():
        shutil.rmtree(dst)
    cmd = [str(Path(sys.executable).with_name("scmf-convert")), "h5ad", str(src), "--output", str(dst),
           "--obs-columns", OBS, "--workers", str(workers), "--quiet", *extra]
    r = run_measured(cmd)
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r['stderr_tail']}")
    return r


#: conversion settings measured: label -> (worker processes, extra CLI arguments)
CONVERSION_VARIANTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "1": (1, ()),
    "2": (2, ()),
    "1, --scratch-dir /dev/shm": (1, ("--scratch-dir", "/dev/shm")),
}


def bench_conversion(files: dict[int, Path], out: Path, runs: int,
                     variants: dict[str, tuple[int, tuple[str, ...]]]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for n, src in files.items():
        size = src.stat().st_size
        cold = [read_speed(src, cold=True) for _ in range(runs)]
        warm = [read_speed(src, cold=False) for _ in range(runs)]
        entry: dict[str, Any] = {"bytes": size, "read_cold_Bps": statistics.median(cold),
                                 "read_warm_Bps": statistics.median(warm), "workers": {}}
        for label, (w, extra) in variants.items():
            tag = f"w{w}" if not extra else f"w{w}_" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:6]
            os.sync()  # each run starts with no dirty pages of the previous one
            rs = [convert(src, out / "conv" / f"c{n}_{tag}", w, extra) for _ in range(runs)]
            walls = [r["wall_s"] for r in rs]
            med = statistics.median(walls)
            cpu = statistics.median(r["cpu_s"] for r in rs)
            entry["workers"][label] = {
                "wall_s": walls, "cells_per_s": n / med, "cells_per_s_per_core": n / med / w,
                "cpu_s": cpu, "cells_per_cpu_s": n / cpu,
                "input_Bps": size / med, "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "peak_anon_mb": max(r["peak_anon_mb"] for r in rs),
                "ratio_to_cold_read": size / med / entry["read_cold_Bps"],
                "ratio_to_warm_read": size / med / entry["read_warm_Bps"],
            }
            print(f"  convert {n} cells, {label} worker(s): {n / med:,.0f} cells/s, "
                  f"{size / med / 1e9:.3f} GB/s, peak RssAnon {entry['workers'][label]['peak_anon_mb']:.0f} MB",
                  flush=True)
        res[str(n)] = entry
    return res


def profile_conversion(src: Path, out: Path) -> dict[str, Any]:
    """cProfile of one single-process conversion, summarised by stage (seconds, cumulative)."""
    r = run_measured([sys.executable, __file__, "_profile", "--h5ad", str(src), "--out", str(out / "conv" / "profiled")])
    if r["rc"] != 0:
        return {"error": r["stderr_tail"]}
    return last_json(r["stdout"])


STAGES = {
    "checksum input (sha256)": ("h5ad.py", "source_fingerprint"),
    "scatter total": ("convert.py", "run_scatter"),
    "  read rows (h5py)": ("h5ad.py", "read_rows"),
    "  align to vocabulary (numba kernel)": ("align.py", "align_rows_with_totals"),
    "  write bucket (np.save)": ("_npyio_impl.py", "save"),
    "gather total": ("convert.py", "run_gather"),
    "  map bucket stretches": ("gather.py", "_bucket_array"),
    "  copy rows into blocks (numba kernel)": ("kernels.py", "fill_rows"),
    "  write shard": ("write.py", "write_shard"),
    "    raw CSR chunk files": ("write.py", "_raw_array"),
    "    sha256 of shard arrays": ("write.py", "_sha256"),
}


def _profile_main(a: argparse.Namespace) -> None:
    import cProfile
    import pstats

    from scmf_shards.convert import convert_h5ad

    if Path(a.out).exists():
        shutil.rmtree(a.out)
    pr = cProfile.Profile(time.process_time)  # CPU seconds: other processes on a busy machine barely move them
    t0 = time.perf_counter()
    c0 = time.process_time()
    pr.enable()
    m = convert_h5ad([a.h5ad], a.out, workers=1, quiet=True, obs_columns=tuple(OBS.split(",")))
    pr.disable()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    st = pstats.Stats(pr).stats  # type: ignore[attr-defined]
    stages = {}
    for label, (fname, func) in STAGES.items():
        stages[label] = sum(v[3] for k, v in st.items() if k[0].endswith(fname) and k[2] == func)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "timer": "cpu", "n_cells": m.n_cells, "stages_s": stages}))


def _ours_main(a: argparse.Namespace) -> None:
    """Our loader in this process: cells/s per run, consuming every value and index."""
    import torch

    from scmf_loader import CellDataLoader, CellDataset

    try:
        from bench_loader import touch  # the loader engineer's "read every value and index once"
    except ImportError:
        def touch(values: np.ndarray, indices: np.ndarray) -> float:
            return float(np.add.reduce(values, dtype=np.float32)) + float(np.bitwise_xor.reduce(indices))

    torch.set_num_threads(1)
    ds = CellDataset(a.dataset)
    res = []
    for r in range(a.runs):
        loader = CellDataLoader(ds, batch_size=a.batch_size, num_workers=a.workers, seed=r,
                                output=a.output, max_genes=a.max_genes)
        it = iter(loader)
        next(it)
        cells = 0
        t0 = time.perf_counter()
        for i, b in enumerate(it):
            if a.output == "csr":
                touch(b.values.numpy(), b.indices.numpy())
                cells += len(b)
            else:
                b["expression"].sum()
                cells += b["expression"].shape[0]
            if i + 1 >= a.batches:
                break
        res.append(cells / (time.perf_counter() - t0))
    print(json.dumps({"cells_per_s": res, "median_cells_per_s": statistics.median(res)}))


def ours(dataset: Path, runs: int, batch_size: int = 256, workers: int = 0, output: str = "csr",
         batches: int = 0, max_genes: int | None = None) -> dict[str, Any]:
    """Our loader in a fresh process; ``batches=0``: one epoch's worth."""
    n_batches = batches or max(1, json.loads((dataset / "manifest.json").read_text())["n_cells"] // batch_size - 2)
    cmd = [sys.executable, __file__, "_ours", "--dataset", str(dataset), "--runs", str(runs),
           "--batch-size", str(batch_size), "--workers", str(workers), "--output", output,
           "--batches", str(n_batches)]
    if max_genes:
        cmd += ["--max-genes", str(max_genes)]
    r = run_measured(cmd, pss=workers > 0)
    if r["rc"] != 0:
        return {"error": r["stderr_tail"].strip().splitlines()[-1]}
    return {**last_json(r["stdout"]), "peak_rss_mb": r["peak_rss_mb"], "peak_anon_mb": r["peak_anon_mb"],
            "peak_pss_anon_mb": r["peak_pss_anon_mb"]}


def loader_script(cells: int, runs: int, out: Path) -> dict[str, Any]:
    """The loader engineer's scripts/bench_loader.py (loader-only bars: raw numpy limit,
    np.copyto, mixed blocks, padded, workers, 100M-cell open), run as it is, same run."""
    script = SCRIPTS / "bench_loader.py"
    if not script.exists():
        return {"error": "scripts/bench_loader.py not present in this checkout"}
    jpath = out / "bench_loader.json"
    jpath.unlink(missing_ok=True)
    r = run_measured([sys.executable, str(script), "--out", str(jpath), "--workdir", str(out / "loader"),
                      "--cells", str(cells), "--reps", str(runs)], timeout=3600)
    if r["rc"] != 0 or not jpath.exists():
        return {"error": (r["stderr_tail"].strip().splitlines() or ["(no output)"])[-1], "rc": r["rc"]}
    return {**json.loads(jpath.read_text()), "process_tree_peak_rss_mb": r["peak_rss_mb"],
            "process_tree_peak_anon_mb": r["peak_anon_mb"]}


def peer(py: str, name: str, h5ad: Path, work: Path, runs: int, batches: int) -> dict[str, Any]:
    cmd = [py, str(SCRIPTS / "bench_peers.py"), name, "--h5ad", str(h5ad), "--work", str(work),
           "--runs", str(runs), "--batches", str(batches)]
    r = run_measured(cmd)
    if r["rc"] != 0:
        lines = [ln for ln in r["stderr_tail"].strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit {r['rc']}", "peak_rss_mb": r["peak_rss_mb"]}
    return {**last_json(r["stdout"]), "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
            "peak_anon_mb": r["peak_anon_mb"]}


def install_error(py: str, package: str) -> str:
    r = subprocess.run([py, "-m", "pip", "install", "--dry-run", "--no-deps", package],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")]
    if any("Requires-Python" in ln for ln in lines):  # e.g. annbatch on Python 3.11
        req = sorted({ln.split("Requires-Python")[-1].split(";")[0].strip() for ln in lines if "Requires-Python" in ln})
        return f"pip: no release installs on Python {platform.python_version()} (every release Requires-Python {req[-1]}): " + lines[-1]
    return " / ".join(ln[:300] for ln in lines) or r.stderr[-300:]


# ---- main ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000, help="largest generated dataset")
    ap.add_argument("--input", help="use this .h5ad instead of generated data (one size)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    ap.add_argument("--skip", default="", help="comma list of: conversion,profile,loader,peers,scdl")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--merge", action="store_true",
                    help="start from OUT/results.json and redo only the phases not skipped")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    peers_py = a.peers_python if Path(a.peers_python).exists() else None
    R: dict[str, Any] = {"machine": machine(), "versions": versions(peers_py), "runs": a.runs}
    if a.merge and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        R = {**old, "merged_phases_rerun": sorted({"conversion", "profile", "loader", "peers"} - skip),
             "machine_rerun": R["machine"]}
    print("machine:", R["machine"], flush=True)

    if a.input:
        import h5py

        with h5py.File(a.input) as f:
            n = int(f["X"].attrs["shape"][0])
        files = {n: Path(a.input).resolve()}
    else:
        sizes = sorted({a.cells // 4, a.cells // 2, a.cells})
        files = {n: make_data(n, out) for n in sizes}
    big_n = max(files)
    big = files[big_n]
    R["data"] = {"files": {str(n): str(p) for n, p in files.items()}, "nnz_per_cell": _nnz(big) / big_n,
                 "bytes_per_cell": big.stat().st_size / big_n}

    if not (a.merge and "conversion" in skip and "primitives_GBps" in R):
        print("primitives ...", flush=True)
        R["primitives_GBps"] = primitives(out)
    def save() -> None:
        (out / "results.json").write_text(json.dumps(R, indent=1, default=str))

    if "conversion" not in skip:
        print("conversion ...", flush=True)
        R["conversion"] = bench_conversion(files, out, a.runs, CONVERSION_VARIANTS)
        save()
    if "profile" not in skip:
        print("profile ...", flush=True)
        R["profile"] = profile_conversion(big, out)
        save()
    # the converted datasets the loader benchmarks read
    dsets = {}
    for n, src in files.items():
        d = out / "conv" / f"c{n}_w1"
        if not (d / "manifest.json").exists():
            convert(src, d, 2)
        dsets[n] = d
    if "loader" not in skip:
        print("loader ...", flush=True)
        L: dict[str, Any] = {}
        L["headline"] = ours(dsets[big_n], a.runs)
        L["workers"] = {str(w): ours(dsets[big_n], a.runs, workers=w) for w in (0, 1, 2)}
        L["batch_size"] = {str(b): ours(dsets[big_n], a.runs, batch_size=b) for b in (64, 256, 1024, 4096)}
        L["padded"] = ours(dsets[big_n], a.runs, output="padded", max_genes=2048)
        L["memory_vs_size"] = {str(n): ours(d, 1) for n, d in dsets.items()}
        L["bench_loader"] = loader_script(big_n, a.runs, out)
        R["loader"] = L
        save()
    if "peers" not in skip:
        print("peers ...", flush=True)
        P: dict[str, Any] = {}
        if peers_py is None:
            P["error"] = f"{a.peers_python} not found: create the peers venv (see docs/benchmarks.md)"
        else:
            work = out / "peers"
            P["anndata backed"] = peer(peers_py, "anndata", big, work, a.runs, 100)
            P["scDataset"] = peer(peers_py, "scdataset", big, work, a.runs, 100)
            if "scdl" not in skip:
                P["SCDL convert"] = peer(peers_py, "scdl-convert", big, work, 1, 0)
                P["SCDL"] = peer(peers_py, "scdl", big, work, a.runs, 100) if "error" not in P["SCDL convert"] \
                    else {"error": "conversion failed"}
            P["annbatch"] = {"error": install_error(peers_py, "annbatch") or "installed but not benchmarked"}
            P["tiledbsoma-ml"] = {"error": "not run: optional, skipped for time (DESIGN.md §7 measured ~3k cells/s)"}
        R["peers"] = P
    R["machine"]["loadavg_end"] = os.getloadavg()
    save()
    import bench_report

    bench_report.write(R, Path(a.docs))
    print(f"wrote {out / 'results.json'} and {a.docs}/benchmarks.md", flush=True)


def _nnz(path: Path) -> int:
    import h5py

    with h5py.File(path) as f:
        return int(f["X"]["indptr"][-1])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_ours", "_profile"):
        sub = sys.argv.pop(1)
        p = argparse.ArgumentParser()
        p.add_argument("--dataset")
        p.add_argument("--h5ad")
        p.add_argument("--out")
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--output", default="csr")
        p.add_argument("--batches", type=int, default=100)
        p.add_argument("--max-genes", type=int, default=None)
        args = p.parse_args()
        (_ours_main if sub == "_ours" else _profile_main)(args)
    else:
        main()
