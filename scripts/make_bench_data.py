"""Write a realistic synthetic raw-count ``.h5ad`` for benchmarks (not shipped).

20k genes (the shipped human protein-coding vocabulary padded with fake genes), log-normal
library sizes, counts drawn per cell from a skewed gene distribution (so ~2,000 expressed
genes per cell at the median), X stored as CSR with int64 ``indptr`` / int32 ``indices`` /
float32 ``data`` (the common, scipy-trap-prone layout), obs ``cell_type``, ``batch`` and
``donor`` as categoricals. Written with h5py in bounded chunks: fast and O(chunk) memory.

    python scripts/make_bench_data.py 100000 bench-out/data/cells_100k.h5ad
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np

from scmf_loader.vocab import GeneVocab

N_GENES = 20_000
CHUNK = 2_000
# reads per cell: log-normal; median chosen so the median cell expresses ~2,000 genes
LIB_MEDIAN, LIB_SIGMA = 2_900.0, 0.4


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias table for O(1) sampling from a discrete distribution."""
    n = len(p)
    q = p * n
    alias = np.zeros(n, dtype=np.int64)
    small = [i for i in range(n) if q[i] < 1.0]
    large = [i for i in range(n) if q[i] >= 1.0]
    while small and large:
        s, l_ = small.pop(), large.pop()
        alias[s] = l_
        q[l_] -= 1.0 - q[s]
        (small if q[l_] < 1.0 else large).append(l_)
    for i in small + large:
        q[i] = 1.0
    return q, alias


def _attrs(node: h5py.HLObject, enc: str, version: str) -> None:
    node.attrs["encoding-type"] = enc
    node.attrs["encoding-version"] = version


def _strings(group: h5py.Group, name: str, values: list[str]) -> None:
    d = group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
    _attrs(d, "string-array", "0.2.0")


def _categorical(group: h5py.Group, name: str, codes: np.ndarray, categories: list[str]) -> None:
    g = group.create_group(name)
    _attrs(g, "categorical", "0.2.0")
    g.attrs["ordered"] = False
    _strings(g, "categories", categories)
    c = g.create_dataset("codes", data=codes.astype(np.int8 if len(categories) < 128 else np.int16))
    _attrs(c, "array", "0.2.0")


def make(n_cells: int, out: str | Path, seed: int = 0, quiet: bool = False) -> dict[str, float]:
    """Write the dataset; return {'n_cells', 'nnz', 'seconds', 'bytes'}."""
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    genes = list(GeneVocab.human_protein_coding().genes)[:N_GENES]
    genes += [f"FAKE{i}" for i in range(N_GENES - len(genes))]
    weights = rng.lognormal(0.0, 1.6, N_GENES)
    weights /= weights.sum()
    q, alias = _alias_table(weights)
    q32, alias32 = q.astype(np.float32), alias.astype(np.int32)
    cell_type = rng.integers(0, 30, n_cells)
    batch = rng.integers(0, 8, n_cells)
    donor = rng.integers(0, 40, n_cells)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _attrs(f, "anndata", "0.1.0")
        x = f.create_group("X")
        _attrs(x, "csr_matrix", "0.1.0")
        x.attrs["shape"] = (n_cells, N_GENES)
        spill = {k: open(tmp.with_name(tmp.name + f".{k}"), "w+b") for k in ("data", "indices")}  # noqa: SIM115
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        nnz = 0
        for s in range(0, n_cells, CHUNK):
            e = min(n_cells, s + CHUNK)
            reads = np.maximum(rng.lognormal(np.log(LIB_MEDIAN), LIB_SIGMA, e - s), 300).astype(np.int64)
            row = np.repeat(np.arange(e - s, dtype=np.int32) * np.int32(N_GENES), reads)
            j = rng.integers(0, N_GENES, len(row), dtype=np.int32)
            col = np.where(rng.random(len(row), dtype=np.float32) < q32[j], j, alias32[j])
            keys = np.sort(row + col)  # sorted by row, then gene
            first = np.empty(len(keys), dtype=bool)
            first[:1] = True
            np.not_equal(keys[1:], keys[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            counts = np.diff(np.append(starts, len(keys)))
            keys = keys[starts]
            per_row = np.bincount(keys // N_GENES, minlength=e - s)
            indptr[s + 1 : e + 1] = nnz + np.cumsum(per_row)
            k = len(keys)
            counts.astype(np.float32).tofile(spill["data"])
            (keys % N_GENES).astype(np.int32).tofile(spill["indices"])
            nnz += k
        # contiguous datasets, as anndata writes them by default: copied from the spill files
        for k, dt in (("data", np.float32), ("indices", np.int32)):
            ds = x.create_dataset(k, (nnz,), dtype=dt)
            spill[k].flush()
            mm = np.memmap(spill[k].name, dtype=dt, mode="r", shape=(nnz,)) if nnz else np.zeros(0, dt)
            for a in range(0, nnz, 1 << 24):
                ds[a : a + (1 << 24)] = mm[a : a + (1 << 24)]
            del mm
            spill[k].close()
            Path(spill[k].name).unlink()
        x.create_dataset("indptr", data=indptr)
        obs = f.create_group("obs")
        _attrs(obs, "dataframe", "0.2.0")
        obs.attrs["_index"] = "_index"
        obs.attrs["column-order"] = np.array(["cell_type", "batch", "donor"], dtype=object)
        _strings(obs, "_index", [f"cell{i}" for i in range(n_cells)])
        _categorical(obs, "cell_type", cell_type, [f"type{i:02d}" for i in range(30)])
        _categorical(obs, "batch", batch, [f"batch{i}" for i in range(8)])
        _categorical(obs, "donor", donor, [f"donor{i:02d}" for i in range(40)])
        var = f.create_group("var")
        _attrs(var, "dataframe", "0.2.0")
        var.attrs["_index"] = "_index"
        var.attrs["column-order"] = np.array([], dtype="float64")
        _strings(var, "_index", genes)
        for g in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            _attrs(f.create_group(g), "dict", "0.1.0")
    tmp.replace(out)
    res = {"n_cells": n_cells, "nnz": nnz, "seconds": time.perf_counter() - t0, "bytes": out.stat().st_size}
    if not quiet:
        print(f"wrote {out}: {n_cells} cells, {nnz / n_cells:.0f} nnz/cell, "
              f"{res['bytes'] / 1e9:.2f} GB in {res['seconds']:.1f} s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n_cells", type=int)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make(a.n_cells, a.out, a.seed)


if __name__ == "__main__":
    main()
