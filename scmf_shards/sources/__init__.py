"""Input sources of a conversion: readers that yield raw CSR row chunks and obs values.

:func:`open_sources` turns what the user named into sources, one per input:

- an AnnData ``.h5ad`` file or ``.zarr`` store (v2 or v3), local path or fsspec URL
  (:class:`~scmf_shards.sources.anndata_source.AnnDataSource`, also importable as
  ``H5adSource``);
- a directory of ``.h5ad`` / ``.zarr`` chunks, or a glob (``data/part-*.h5ad``): each chunk
  is its own source (its own parallel tasks), in sorted name order;
- an scmf dataset directory (``manifest.json``): its cells, re-converted
  (:class:`~scmf_shards.sources.dataset_source.DatasetSource`).

:func:`prepare_sources` runs the one-time step some sources need before rows are read (a
CSC matrix is copied as CSR). Census queries are sources too
(:mod:`scmf_shards.sources.census`). The protocol is :class:`~scmf_shards.sources.base.Source`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scmf_loader.errors import InvalidInputError, ScmfError
from scmf_shards.sources.anndata_source import AnnDataSource
from scmf_shards.sources.base import RowChunk, Source, is_url, local_path
from scmf_shards.sources.h5ad import H5adSource

__all__ = ["AnnDataSource", "H5adSource", "RowChunk", "Source", "expand_inputs", "open_source", "open_sources",
           "prepare_sources"]

_CHUNK_SUFFIXES = (".h5ad", ".zarr")
_GLOB_CHARS = "*?["


def _is_anndata_zarr_dir(path: str) -> bool:
    from scmf_shards.sources.anndata_source import is_zarr_store

    return is_zarr_store(path)


def _list_chunks(path: str) -> list[str]:
    """The ``.h5ad`` / ``.zarr`` entries of a directory (local or URL), sorted by name."""
    if is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        proto = path.split("://", 1)[0]
        names = [p.rstrip("/") for p in fs.ls(root, detail=False)]
        found = [f"{proto}://{p}" for p in names if p.endswith(_CHUNK_SUFFIXES)]
    else:
        root = local_path(path)
        found = [os.path.join(root, n) for n in os.listdir(root) if n.endswith(_CHUNK_SUFFIXES)]
    return sorted(found)


def _glob(pattern: str) -> list[str]:
    if is_url(pattern):
        import fsspec

        fs, root = fsspec.core.url_to_fs(pattern)
        proto = pattern.split("://", 1)[0]
        return sorted(f"{proto}://{p}" for p in fs.glob(root))
    import glob

    return sorted(glob.glob(local_path(pattern)))


def _is_dir(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return bool(fs.isdir(root))
    return os.path.isdir(local_path(path))


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The inputs ``paths`` name, one per source: a glob becomes its sorted matches, a
    directory of ``.h5ad``/``.zarr`` chunks its sorted chunks; a file, a zarr store or a
    dataset directory stays itself. Raises :class:`InvalidInputError` for a glob or
    directory that names nothing, :class:`ScmfError` for no input or one named twice."""
    from scmf_shards.sources.dataset_source import is_dataset_dir

    out: list[str] = []
    for raw in paths:
        p = os.fspath(raw)
        try:
            out.extend(_expand_one(p, is_dataset_dir))
        except ScmfError:
            raise
        except Exception as exc:  # fsspec/botocore: no credentials, no network ...
            if not is_url(p):
                raise
            raise _url_error(p, exc) from exc
    if not out:
        raise ScmfError("no input files given")
    if len(set(out)) != len(out):
        raise ScmfError(f"the same input is given twice: {out}")
    return out


def _expand_one(p: str, is_dataset_dir: Any) -> list[str]:
    if any(ch in p.split("://", 1)[-1] for ch in _GLOB_CHARS):
        matches = _glob(p)
        if not matches:
            raise InvalidInputError(f"{p}: the pattern matches no file")
        return matches
    if p.rstrip("/").endswith(_CHUNK_SUFFIXES):  # one input by its name: no listing (an https
        return [p]                                # "directory" test would read the file)
    if _is_dir(p) and not is_dataset_dir(p) and not _is_anndata_zarr_dir(p):
        chunks = _list_chunks(p)
        if not chunks:
            raise InvalidInputError(
                f"{p}: a directory with no .h5ad/.zarr chunks, no zarr store and no "
                "manifest.json (not a dataset)")
        return chunks
    return [p]


def _url_error(path: str, exc: BaseException) -> InvalidInputError:
    """One line naming the URL and the first line of the file system's error."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return InvalidInputError(f"{path}: cannot open ({reason})")


def open_source(path: str, matrix: str = "X", gene_column: str = "var_names") -> Any:
    """One source for one (expanded) input; a file system error while opening a URL becomes
    one :class:`InvalidInputError` line naming the URL."""
    from scmf_shards.sources.anndata_source import AnnDataSource
    from scmf_shards.sources.dataset_source import DatasetSource, is_dataset_dir

    try:
        if is_dataset_dir(path):
            return DatasetSource(path, matrix=matrix, gene_column=gene_column)
        return AnnDataSource(path, matrix=matrix, gene_column=gene_column)
    except ScmfError:
        raise
    except Exception as exc:
        if not is_url(path):
            raise
        raise _url_error(path, exc) from exc


def open_sources(paths: Sequence[str | os.PathLike[str]], matrix: str = "X",
                 gene_column: str = "var_names", *, allow_negative: bool = False) -> list[Any]:
    """Open every input ``paths`` names (:func:`expand_inputs`), one source each.

    Unless ``allow_negative`` (data stated as normalised, no log1p), an AnnData input whose
    ``X`` holds negative values in its first rows while the file has a raw matrix is refused
    with the options that convert the raw matrix (see :func:`check_matrix_choice`).
    """
    sources = [open_source(p, matrix, gene_column) for p in expand_inputs(paths)]
    if not allow_negative:
        for s in sources:
            check_matrix_choice(s)
    return sources


def check_matrix_choice(source: Any, sample_rows: int = 1000) -> None:
    """Refuse converting an ``X`` that is scaled (negative values in its first
    ``sample_rows`` rows) when the input keeps a raw matrix, naming the options that convert
    that one instead: ``--matrix raw`` (plus ``--assume-normalized --no-log1p`` when
    ``raw.X`` is not integer counts, e.g. log-normalised as scanpy leaves it)."""
    if getattr(source, "matrix", None) != "X" or not hasattr(source, "has_raw") or not source.has_raw():
        return
    x = source.read_rows(0, min(source.n_cells, sample_rows)).matrix.data
    if not x.size or x.min() >= 0:
        return
    from scmf_shards.sources.anndata_source import AnnDataSource

    raw = AnnDataSource(source.path, matrix="raw", gene_column=source.gene_column)
    r = raw.read_rows(0, min(raw.n_cells, sample_rows)).matrix.data
    counts = bool(r.size) and r.min() >= 0 and bool((r == r.round()).all())
    fix = "--matrix raw" if counts else "--matrix raw --assume-normalized --no-log1p"
    what = "raw counts" if counts else "normalised values (non-integer, e.g. log1p)"
    raise InvalidInputError(
        f"{source.path}: X holds negative values (min {float(x.min()):.4g}): scaled data, not "
        f"counts. The file keeps {what} in raw.X; convert them with {fix}"
    )


def prepare_sources(sources: Sequence[Any], work_dir: str | os.PathLike[str]) -> list[Any]:
    """Each source after its one-time preparation (``source.prepare(dir)`` where defined,
    e.g. a CSC matrix copied as CSR), each in its own subdirectory of ``work_dir``."""
    root = Path(work_dir)
    out = []
    for i, s in enumerate(sources):
        prepare = getattr(s, "prepare", None)
        out.append(prepare(root / f"s{i:05d}") if prepare is not None else s)
    return out
