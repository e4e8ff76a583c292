"""Shard writer: one AnnData-compatible Zarr group per shard, CSR arrays as raw single chunks.

``X`` is written by our callback inside :func:`anndata.experimental.write_dispatched` as a
``csr_matrix`` group whose ``data``, ``indices`` and ``indptr`` are zarr v3 arrays with one
chunk, no compressor and no filter, so ``X/<name>/c/0`` holds exactly the array's
little-endian bytes and the loader can ``np.memmap`` it. Everything else (obs, var, ...) is
written by anndata. A shard is written under a temporary name and renamed into place only
when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from scmf_loader.format import (
    ARRAY_NAMES,
    INDEX_DTYPE,
    INDPTR_DTYPE,
    ArrayEntry,
    ShardEntry,
    other_files_digest,
    shard_array_relpath,
)

__all__ = ["attempt_name", "write_shard"]


def attempt_name(path: Path) -> Path:
    """A temporary sibling of ``path`` unique to this attempt: a task of a killed driver that
    still runs on a remote worker never writes into the temporary files of its re-run."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def _raw_array(group: zarr.Group, root: Path, name: str, values: np.ndarray) -> None:
    """Create a one-chunk, uncompressed zarr v3 array and write its chunk file directly.

    The chunk file of such an array is exactly the array's little-endian bytes (the format's
    ``raw`` layout, see docs/format.md); writing it ourselves avoids zarr's codec pipeline,
    which was ~6x slower than a plain file write for large arrays."""
    values = np.ascontiguousarray(values)
    if values.dtype.byteorder == ">" or (values.dtype.byteorder == "=" and np.little_endian is False):
        values = values.astype(values.dtype.newbyteorder("<"))
    group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        chunks=values.shape if values.size else (1,),
        compressors=None,
        filters=None,
        fill_value=0,
    )
    if values.size:
        chunk = root / "X" / shard_array_relpath(name).split("/", 1)[1]
        chunk.parent.mkdir(parents=True, exist_ok=True)
        with open(chunk, "wb") as f:
            f.write(memoryview(values).cast("B"))


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def write_shard(
    final_path: str | os.PathLike[str],
    relpath: str,
    *,
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    n_genes: int,
    cell_ids: np.ndarray,
    obs_codes: Mapping[str, np.ndarray],
    obs_categories: Mapping[str, Sequence[str]],
    var_names: Sequence[str],
    numeric_obs: Mapping[str, np.ndarray] | None = None,
    after_step: Callable[[str], None] | None = None,
) -> ShardEntry:
    """Write one shard to ``final_path`` (via a temporary sibling unique to this attempt,
    ``<name>.tmp-<pid>-<random>``, and a rename) and return its manifest entry with byte
    counts and sha256 of its three CSR arrays. ``after_step(label)`` is called after each
    part is written (the converter's crash-test hook)."""
    import anndata as ad
    import scipy.sparse as sp
    from anndata.experimental import write_dispatched

    final = Path(final_path)
    tmp = attempt_name(final)
    step = after_step or (lambda label: None)
    indices = np.ascontiguousarray(indices, dtype=INDEX_DTYPE)
    indptr = np.ascontiguousarray(indptr, dtype=INDPTR_DTYPE)
    n_cells = len(indptr) - 1
    obs = pd.DataFrame(
        {
            name: pd.Categorical.from_codes(
                np.asarray(obs_codes[name]), categories=list(obs_categories[name])
            )
            for name in obs_codes
        },
        index=pd.Index(np.asarray(cell_ids, dtype=object).astype(str), name=None),
    )
    for name, values in (numeric_obs or {}).items():
        obs[name] = np.asarray(values)
    placeholder = sp.csr_matrix((n_cells, n_genes), dtype=data.dtype)
    var = pd.DataFrame(index=pd.Index(list(var_names)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not unique.*")
        adata = ad.AnnData(X=placeholder, obs=obs, var=var)

    def callback(func: Any, store: Any, elem_name: str, elem: Any, *, iospec: Any, dataset_kwargs: Any) -> None:
        if elem_name in ("/X", "X") and store.path in ("", "/"):
            g = store.create_group("X")
            g.attrs.update(
                {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_genes]}
            )
            _raw_array(g, tmp, "data", data)
            _raw_array(g, tmp, "indices", indices)
            _raw_array(g, tmp, "indptr", indptr)
            step("shard:X")
            return
        func(store, elem_name, elem, dataset_kwargs=dataset_kwargs)

    with zarr.config.set({"array.write_empty_chunks": True}):
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            write_dispatched(root, "/", adata, callback=callback)
    arrays = {}
    for name, values in zip(ARRAY_NAMES, (data, indices, indptr), strict=True):
        rel = shard_array_relpath(name)
        arrays[name] = ArrayEntry(
            path=rel, nbytes=int(values.nbytes), sha256=_sha256(values), dtype=str(values.dtype)
        )
        on_disk = (tmp / rel).stat().st_size if values.size else 0
        if on_disk != values.nbytes:
            raise OSError(f"{tmp / rel}: wrote {on_disk} bytes, expected {values.nbytes}")
    other = other_files_digest(tmp)  # obs, var and zarr metadata: one digest
    step("shard:complete")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return ShardEntry(path=relpath, n_cells=n_cells, nnz=int(indptr[-1]), arrays=arrays,
                      other_files=other)
