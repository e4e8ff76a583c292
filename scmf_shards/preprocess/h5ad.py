"""``preprocess_h5ad``: a processed copy of an ``.h5ad`` file (the seed's cached
preprocessing; ``scmf-convert preprocess``).

The input is streamed in row chunks twice at most (the fitting stages of
:mod:`scmf_shards.preprocess.stats`, then the transform), so memory is bounded by the chunk
size plus ``obs``/``var``/``uns``. The output holds the input's ``obs`` and ``uns``, ``var``
restricted to the kept genes (all, or the HVGs), ``X`` as CSR float32 (float64 for float64
input) with the processed values, ``obs["size_factor"]`` with scran, and
``uns["scmf_preprocessing"]``: the full configuration and the selected genes. ``layers``,
``obsm``, ``varm``, ``obsp``, ``varp`` and ``raw`` are not copied.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import DatasetExistsError, InvalidInputError
from scmf_loader.preprocess.pipeline import PreprocessingPipeline
from scmf_shards.align import GeneAlignment, align_rows
from scmf_shards.executor import TaskRunner
from scmf_shards.plan import plan_chunks
from scmf_shards.preprocess.stats import (
    check_preprocessing,
    fit_preprocessing,
    parse_preprocessing,
)

__all__ = ["UNS_KEY", "preprocess_h5ad"]

UNS_KEY = "scmf_preprocessing"


def _config_of(preprocessing: Mapping[str, Any] | PreprocessingPipeline | None) -> dict[str, Any]:
    if isinstance(preprocessing, PreprocessingPipeline):
        d = preprocessing.to_dict()
        d.pop("hvg_genes")
        return parse_preprocessing(d)
    return parse_preprocessing(dict(preprocessing or {}) or {"normalize": "library_size"})


def preprocess_h5ad(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    preprocessing: Mapping[str, Any] | PreprocessingPipeline | None = None,
    *,
    matrix: str = "X",
    chunk_size: int = 16_384,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    quiet: bool = False,
) -> PreprocessingPipeline:
    """Write ``output``: ``input`` preprocessed (see the module docstring).

    ``preprocessing``: a :class:`~scmf_loader.preprocess.PreprocessingPipeline` or a mapping
    of its keys (``normalize``, ``target_sum``, ``log1p``, ``hvg_selection``, ``hvg_flavor``,
    ``hvg_batch_key``, ``assume_normalized``); default: library-size normalisation + log1p.
    ``matrix``: ``X``, ``raw`` or ``layer:NAME`` holds the counts. Returns the fitted
    pipeline (its ``hvg_genes`` set when HVGs were selected). The output is written under a
    temporary name and renamed when complete.
    """
    from scmf_shards.sources.h5ad import H5adSource

    config = _config_of(preprocessing)
    inp, out = os.fspath(input), Path(output)
    if out.exists() and not overwrite:
        raise DatasetExistsError(f"{out}: exists; use --overwrite to replace it")
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}")
    src = H5adSource(inp, matrix=matrix)
    n_genes = src.n_genes
    ident = np.arange(n_genes)
    alignment = GeneAlignment(ident.astype(np.int64), ident.astype(np.int32), n_genes)
    check_preprocessing(config, [src], [alignment])
    dtype = "float64" if src.dtype == np.float64 else "float32"
    chunks = plan_chunks([src.n_cells], chunk_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".scmf-preprocess-", dir=out.parent))
    try:
        with TaskRunner(workers, None, quiet) as runner:
            fitted = fit_preprocessing(
                config, [src], chunks, [alignment], list(src.genes), seed=seed, dtype=dtype,
                matrix=matrix, work_dir=work / "fit", runner=runner,
            )
        assert fitted is not None
        keep = fitted.keep if fitted.keep is not None else np.ones(n_genes, dtype=bool)
        tmp = work / "out.h5ad"
        _write(tmp, src, chunks, fitted, keep, *_metadata(src), dtype, quiet)
        _replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return fitted.pipeline


def _metadata(src: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The input's ``obs``, ``var`` and ``uns``."""
    from anndata.io import read_elem

    from scmf_shards.sources.h5ad import _open_h5

    with _open_h5(src.path) as f:
        return read_elem(f["obs"]), read_elem(f[src._var_key]), read_elem(f["uns"]) if "uns" in f else {}


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished file ``tmp`` to ``out``, replacing what is there."""
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(tmp, out)


def _write(path: Path, src: Any, chunks: Any, fitted: Any, keep: np.ndarray, obs: Any, var: Any,
           uns: Mapping[str, Any], dtype: str, quiet: bool) -> None:
    import anndata as ad
    import h5py
    import scipy.sparse as sp
    from tqdm.auto import tqdm

    n_keep = int(keep.sum())
    new_col = np.cumsum(keep) - 1
    record = fitted.manifest_dict()
    record.pop("baked", None)
    record["input"] = src.path
    record["matrix"] = src.matrix
    uns = dict(uns)
    uns[UNS_KEY] = record
    sf_parts: list[np.ndarray] = []
    obs = obs.copy()
    placeholder = sp.csr_matrix((src.n_cells, n_keep), dtype=dtype)
    ad.AnnData(X=placeholder, obs=obs, var=var.iloc[np.flatnonzero(keep)], uns=uns).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        del f["X"]
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": np.array([src.n_cells, n_keep])})
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 16,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
        indptr = g.create_dataset("indptr", shape=(src.n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        nnz = 0
        for c in tqdm(chunks, desc="write processed h5ad", unit="chunk", disable=quiet, leave=False):
            rows = src.read_rows(c.start, c.stop)
            raw = rows.matrix
            lib = np.asarray(raw.sum(axis=1, dtype=np.float64)).ravel()
            ident = np.arange(src.n_genes)
            aligned = align_rows(raw, GeneAlignment(ident.astype(np.int64), ident.astype(np.int32), src.n_genes))
            aligned = sp.csr_matrix((aligned.data, aligned.indices, aligned.indptr), shape=(raw.shape[0], src.n_genes))
            t = replace(fitted.transform_for(c.index), values=fitted.pipeline.transforms_values)
            where = f"{src.path}: rows [{c.start}, {c.stop}) of '{src.matrix}'"
            m, extra = t.apply(raw, aligned, lib, where)
            if "size_factor" in extra:
                sf_parts.append(extra["size_factor"])
            k = m.nnz
            data.resize((nnz + k,))
            indices.resize((nnz + k,))
            data[nnz:] = m.data.astype(dtype, copy=False)
            indices[nnz:] = new_col[m.indices].astype(np.int32)
            indptr[c.start + 1 : c.stop + 1] = m.indptr[1:] + nnz
            nnz += k
    if sf_parts:
        from anndata.io import write_elem

        obs["size_factor"] = np.concatenate(sf_parts)
        with h5py.File(path, "r+") as f:
            del f["obs"]
            write_elem(f, "obs", obs)
