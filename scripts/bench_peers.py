"""Peer loaders on an ``.h5ad`` file: one peer per process, run by ``bench_all.py`` (not shipped).

Runs in whatever environment has the peer installed (``bench_all.py --peers-python``), so the
peers' dependencies never touch the project's environment. Prints one JSON object on the
last line of stdout: ``{"peer", "settings", "cells_per_s": [per run], "seconds", ...}``.

    python scripts/bench_peers.py anndata --h5ad data.h5ad --batch-size 256 --batches 200
    python scripts/bench_peers.py scdl-convert --h5ad data.h5ad --work bench-out/scdl
    python scripts/bench_peers.py scdl --h5ad data.h5ad --work bench-out/scdl

Every peer yields shuffled CSR-like batches of ``--batch-size`` cells from one process (no
DataLoader workers), the setting our loader's headline number uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def _timed_runs(make_iter: Callable[[int], Iterator[Any]], n_batches: int, runs: int,
                count: Callable[[Any], int]) -> dict[str, Any]:
    """``runs`` timed passes of ``n_batches`` batches each (one untimed warm-up batch)."""
    out = []
    for r in range(runs):
        it = make_iter(r)
        next(it)  # warm-up: opens files, builds indexes
        cells = 0
        t0 = time.perf_counter()
        for _ in range(n_batches):
            try:
                b = next(it)
            except StopIteration:
                break
            cells += count(b)
        out.append(cells / (time.perf_counter() - t0))
    return {"cells_per_s": out, "median_cells_per_s": float(np.median(out))}


def _fix_dtypes(x: Any) -> Any:
    """Make CSR index dtypes agree (the scipy trap of DESIGN.md §7: with int64 indptr and int32
    indices every row slice copies all indices). A favour to the peer, stated in the report."""
    if x.indptr.dtype != x.indices.dtype:
        x.indices = x.indices.astype(x.indptr.dtype)
    return x


def bench_anndata(a: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    import anndata as ad

    adata = ad.read_h5ad(a.h5ad, backed="r")
    n = adata.n_obs

    def make(r: int) -> Iterator[Any]:
        rng = np.random.default_rng(r)
        while True:
            idx = np.sort(rng.choice(n, a.batch_size, replace=False))
            yield adata.X[idx]

    res = _timed_runs(make, a.batches, a.runs, lambda b: b.shape[0])
    res["settings"] = (f"anndata {version('anndata')}: read_h5ad(backed='r'), X[sorted random "
                       f"{a.batch_size} rows] per batch (scipy CSR)")
    return res


def bench_scdataset(a: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    import anndata as ad
    from scdataset import BlockShuffling, scDataset

    adata = ad.read_h5ad(a.h5ad, backed="r")
    block, fetch = 16, 8  # the README's "Performance Optimization" settings

    def make(r: int) -> Iterator[Any]:
        ds = scDataset(
            adata,
            BlockShuffling(block_size=block),
            batch_size=a.batch_size,
            fetch_factor=fetch,
            fetch_callback=lambda coll, idx: _fix_dtypes(coll.X[idx]),
            seed=r,
        )
        return iter(ds)

    res = _timed_runs(make, a.batches, a.runs, lambda b: b.shape[0])
    res["settings"] = (f"scDataset {version('scdataset')} over backed AnnData: BlockShuffling(block_size="
                       f"{block}), batch_size={a.batch_size}, fetch_factor={fetch} (README performance "
                       "settings), fetch = backed X[sorted rows] as CSR with index dtypes made to agree, "
                       "batches = CSR row subsets; one process (README: DataLoader num_workers=4, "
                       "prefetch_factor=fetch_factor+1 — 2 cores here)")
    return res


def bench_scdl_convert(a: argparse.Namespace) -> dict[str, Any]:
    import shutil
    from importlib.metadata import version
    from pathlib import Path

    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

    out = Path(a.work) / "scdl"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    ds = SingleCellMemMapDataset(str(out), h5ad_path=a.h5ad, use_X_not_raw=True)
    ds.save()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "n_cells": int(ds.number_of_rows()),
            "cells_per_s": [ds.number_of_rows() / dt],
            "settings": f"bionemo-scdl {version('bionemo-scdl')}: SingleCellMemMapDataset(path, "
                        "h5ad_path=..., use_X_not_raw=True) then save(); defaults otherwise"}


def bench_scdl(a: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version
    from pathlib import Path

    import torch
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch

    ds = SingleCellMemMapDataset(str(Path(a.work) / "scdl"))

    def make(r: int) -> Iterator[Any]:
        g = torch.Generator().manual_seed(r)
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, generator=g,
                                         collate_fn=collate_sparse_matrix_batch, num_workers=0)
        return iter(dl)

    res = _timed_runs(make, a.batches, a.runs, lambda b: b.shape[0])
    res["settings"] = (f"bionemo-scdl {version('bionemo-scdl')}: SingleCellMemMapDataset over its own "
                       f"conversion, torch DataLoader(batch_size={a.batch_size}, shuffle=True, "
                       "collate_fn=collate_sparse_matrix_batch, num_workers=0) (README usage)")
    return res


PEERS = {"anndata": bench_anndata, "scdataset": bench_scdataset, "scdl-convert": bench_scdl_convert,
         "scdl": bench_scdl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peer", choices=sorted(PEERS))
    ap.add_argument("--h5ad", required=True)
    ap.add_argument("--work", default="bench-out/peers")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    res = PEERS[a.peer](a)
    res["peer"] = a.peer
    res["python"] = sys.version.split()[0]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
