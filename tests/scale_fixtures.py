"""Cheap, huge dataset directories for scale tests of the loader.

:func:`write_synthetic_dataset` writes a valid manifest over ``n_shards`` shards of
``cells_per_shard`` cells, one non-zero per cell, without running the converter: the raw CSR
chunk files of one shard are written once with numpy and hard-linked into every other shard
directory (or, faster to build, every other shard is a symbolic link to the first), so 10,000
shards of 10,000 cells (100M cells) cost about 160 KB of data plus the directory entries.
Shards carry only what :mod:`scmf_loader.store` reads (the three raw chunk files); no obs
columns and no cell stats are declared, so no shard needs zarr metadata.
Cell ``i`` of every shard holds value ``1 + i % 7`` at vocabulary id ``4 + i % n_genes``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scmf_loader.format import (
    ARRAY_NAMES,
    ArrayEntry,
    Manifest,
    ShardEntry,
    sha256_file,
    shard_array_relpath,
    shard_relpath,
    write_manifest,
)
from scmf_loader.vocab import GeneVocab

__all__ = ["expected_row", "write_synthetic_dataset"]


def expected_row(local: np.ndarray, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """(vocabulary id, value) of the single non-zero of each local cell index."""
    return 4 + local % n_genes, (1 + local % 7).astype(np.float32)


def write_synthetic_dataset(
    root: Path, n_shards: int, cells_per_shard: int, n_genes: int = 64, *, symlink_shards: bool = False
) -> Path:
    """Write a dataset directory of ``n_shards * cells_per_shard`` cells at ``root``.

    Shard directories are real, with hard-linked chunk files, unless ``symlink_shards``: then
    every shard after the first is a symbolic link to the first (one syscall per shard; the
    loader still opens and maps each shard's files through its own path)."""
    local = np.arange(cells_per_shard, dtype=np.int64)
    genes, values = expected_row(local, n_genes)
    arrays = {
        "indptr": np.arange(cells_per_shard + 1, dtype=np.int64),
        "indices": genes.astype(np.int32),
        "data": values,
    }
    first = root / shard_relpath(0)
    entries = {}
    for name in ARRAY_NAMES:
        f = first / shard_array_relpath(name)
        f.parent.mkdir(parents=True)
        arrays[name].tofile(f)
        entries[name] = ArrayEntry(path=shard_array_relpath(name), nbytes=int(arrays[name].nbytes),
                                   sha256=sha256_file(f), dtype=str(arrays[name].dtype))
    sources = {name: str(first / shard_array_relpath(name)) for name in ARRAY_NAMES}
    for s in range(1, n_shards):  # plain os calls on strings: few syscalls per shard
        d = str(root / shard_relpath(s))
        if symlink_shards:
            os.symlink(first.name, d)
            continue
        os.mkdir(d)
        os.mkdir(d + "/X")
        for name in ARRAY_NAMES:
            os.mkdir(f"{d}/X/{name}")
            os.mkdir(f"{d}/X/{name}/c")
            os.link(sources[name], f"{d}/{shard_array_relpath(name)}")
    vocab = GeneVocab.from_genes([f"GENE{i:05d}" for i in range(n_genes)])
    vocab.save(root / "vocab.json")
    shards = [ShardEntry(path=shard_relpath(s), n_cells=cells_per_shard, nnz=cells_per_shard, arrays=entries)
              for s in range(n_shards)]
    manifest = Manifest(
        dataset_id="sha256:" + "0" * 64,
        created_by="tests/scale_fixtures.py",
        n_cells=n_shards * cells_per_shard,
        n_genes=len(vocab),
        nnz=n_shards * cells_per_shard,
        dtype="float32",
        vocab={"path": "vocab.json", "sha256": vocab.sha256(), "file_sha256": sha256_file(root / "vocab.json"),
               "name": "synthetic", "n_tokens": len(vocab)},
        preprocessing={"normalize": None, "log1p": False, "hvg": None},
        sources=[],
        obs_columns=[],
        cell_stats=(),
        shuffle={"enabled": True, "seed": 0, "chunk_size": cells_per_shard, "shard_size": cells_per_shard},
        shards=shards,
    )
    write_manifest(root, manifest)
    return root
