"""Conversion time through the h5ad reader of an earlier commit vs. the current sources.

Converts the same inputs (CSR and CSC ``.h5ad`` made by ``make_bench_data.py``) with the
reader of ``--old-ref`` (loaded from git) and with :func:`scmf_shards.sources.open_sources`,
one worker, default options (shuffle and checksums on), best of ``--repeat`` runs (old and
new interleaved) after a warm-up read of the file (warm page cache). Prints one line per (reader, input).

    python scripts/make_bench_data.py 20000 bench-out/data/cells_20k.h5ad
    python scripts/bench_sources.py bench-out/data/cells_20k.h5ad --csc --out bench-out/sources
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def old_reader(ref: str) -> Any:
    """The ``H5adSource`` class of ``scmf_shards/sources/h5ad.py`` at git ``ref``."""
    text = subprocess.run(["git", "show", f"{ref}:scmf_shards/sources/h5ad.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_h5ad.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_h5ad", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_h5ad"] = mod  # picklable for worker processes
    spec.loader.exec_module(mod)
    mod.H5adSource.zarr = False  # what the converter now asks of an .h5ad source
    return mod.H5adSource


def make_csc(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose X is stored as CSC (int64 indptr, int32 indices)."""
    import scipy.sparse as sp

    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k in f:
            if k != "X":
                f.copy(f[k], g, k)
        g.attrs.update(dict(f.attrs))
        x = f["X"]
        shape = tuple(int(s) for s in x.attrs["shape"])
        m = sp.csr_matrix((x["data"][:], x["indices"][:], x["indptr"][:]), shape=shape).tocsc()
        gx = g.create_group("X")
        gx.attrs.update({"encoding-type": "csc_matrix", "encoding-version": "0.1.0", "shape": shape})
        gx.create_dataset("data", data=m.data)
        gx.create_dataset("indices", data=m.indices.astype(np.int32))
        gx.create_dataset("indptr", data=m.indptr.astype(np.int64))


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def time_convert(sources: list[Any], out: Path, **kw: Any) -> float:
    """Seconds of one conversion of ``sources`` into a fresh ``out``."""
    from scmf_shards.convert import convert_sources
    from scmf_shards.options import ConvertOptions

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    convert_sources(sources, out, ConvertOptions(quiet=True, **kw))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("h5ad", type=Path)
    ap.add_argument("--csc", action="store_true", help="also a CSC copy of the input")
    ap.add_argument("--old-ref", default="24b0c52")
    ap.add_argument("--chunk-size", type=int, default=16_384)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/sources"))
    a = ap.parse_args()
    from scmf_shards.sources import open_sources

    a.out.mkdir(parents=True, exist_ok=True)
    inputs = {"csr": a.h5ad}
    if a.csc:
        csc = a.out / (a.h5ad.stem + "_csc.h5ad")
        if not csc.exists():
            make_csc(a.h5ad, csc)
        inputs["csc"] = csc
    old = old_reader(a.old_ref)
    openers = {"old": lambda p: [old(str(p))], "new": lambda p: open_sources([str(p)])}
    for layout, path in inputs.items():
        _warm(path)
        with h5py.File(path, "r") as f:
            n = int(f["X"].attrs["shape"][0])
        times: dict[str, list[float]] = {k: [] for k in openers}
        for _ in range(a.repeat):  # interleaved: both readers see the same machine load
            for name, open_ in openers.items():
                times[name].append(time_convert(open_(path), a.out / "ds", chunk_size=a.chunk_size))
        for name, ts in times.items():
            best = min(ts)
            print(f"{layout} {name}: best {best:.2f} s of {[round(t, 2) for t in ts]}, "
                  f"{n / best:,.0f} cells/s (chunk_size {a.chunk_size})", flush=True)
    shutil.rmtree(a.out / "ds", ignore_errors=True)


if __name__ == "__main__":
    main()
