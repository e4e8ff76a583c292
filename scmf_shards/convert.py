"""Orchestration of a conversion: sources → aligned, shuffled shards → manifest.

Two stages of independent tasks (run in-process, on a local dask cluster, or on a remote
scheduler; see :class:`~scmf_shards.executor.TaskRunner`):

1. *scatter*: one task per read chunk reads rows of one source, validates them, aligns them
   to the vocabulary, and writes them grouped by destination shard into a bucket directory
   under ``DIR/.scmf-tmp/buckets`` (renamed into place when complete);
2. *gather*: one task per shard collects its rows from every bucket, applies the in-shard
   permutation, and writes the shard (temporary name, then rename).

Memory per task is bounded by the chunk size and the shard size, never the dataset size.
The driver writes ``vocab.json`` and finally ``manifest.json``. A killed conversion re-run
with the same inputs and options reuses complete buckets and shards that verify.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import (
    DatasetExistsError,
    DatasetLockedError,
    ManifestError,
    ScmfError,
)
from scmf_loader.format import (
    MANIFEST_NAME,
    SHARDS_DIR,
    VOCAB_NAME,
    Manifest,
    ObsColumn,
    ShardEntry,
    SourceEntry,
    compute_dataset_id,
    other_files_digest,
    read_manifest,
    sha256_file,
    shard_relpath,
    write_manifest,
)
from scmf_loader.vocab import GeneVocab, normalize_gene_id
from scmf_shards import faults
from scmf_shards.align import (
    GeneAlignment,
    StoredAlignment,
    align_rows_with_totals,
    build_alignment,
    store_alignment,
)
from scmf_shards.executor import TaskRunner
from scmf_shards.faults import FAULT_ENV  # noqa: F401  (re-exported for tests and docs)
from scmf_shards.kernels import copy_rows
from scmf_shards.options import ConvertOptions
from scmf_shards.plan import (
    ReadChunk,
    assignment_table,
    chunk_destinations,
    plan_chunks,
    shard_permutation,
    shard_sizes,
)
from scmf_shards.preprocess.stats import allows_negative, check_preprocessing, fit_preprocessing
from scmf_shards.scratch import release as scratch_release
from scmf_shards.scratch import release_all as scratch_release_all
from scmf_shards.scratch import scratch
from scmf_shards.sources.h5ad import H5adSource
from scmf_shards.values import check_values
from scmf_shards.write import attempt_name, write_shard

__all__ = ["convert_h5ad", "convert_sources", "resolve_vocab"]

TMP_DIR = ".scmf-tmp"
LOCK_NAME = ".scmf-lock"
CELL_STATS = ("library_size",)
def _created_by() -> str:
    try:
        return f"scmodelforge-data {version('scmodelforge-data')}"
    except PackageNotFoundError:  # running from a source tree
        return "scmodelforge-data (source tree)"


def resolve_vocab(spec: str | GeneVocab, sources: Sequence[H5adSource]) -> GeneVocab:
    """``"human_protein_coding"``, ``"union"`` (of the sources' genes) or a vocabulary file."""
    if isinstance(spec, GeneVocab):
        return spec
    if spec == "human_protein_coding":
        return GeneVocab.human_protein_coding()
    if spec == "union":
        return GeneVocab.union([[normalize_gene_id(g) for g in s.genes] for s in sources])
    return GeneVocab.from_file(spec)


def _source_names(paths: Sequence[str]) -> list[str]:
    base = [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
    counts: dict[str, int] = {}
    out = []
    for b in base:
        counts[b] = counts.get(b, 0) + 1
        out.append(b if counts[b] == 1 else f"{b}#{counts[b]}")
    return out


# ---- tasks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScatterTask:
    """Everything one scatter task needs (small and picklable)."""

    chunk: ReadChunk
    source: Any  # a picklable reader with .path, .n_genes and .read_rows (e.g. H5adSource)
    matrix: str
    alignment: StoredAlignment  # a reference: the arrays are loaded where the task runs
    obs_columns: tuple[str, ...]
    categories: Mapping[str, Sequence[str]]
    counts: np.ndarray
    seed: int
    shuffle: bool
    dtype: str
    bucket_dir: str
    transform: Any = None  # preprocessing of the chunk (scmf_shards.preprocess.stats.ChunkTransform)
    allow_negative: bool = False  # data stated as normalised, no log1p (see scmf_shards.values)


@dataclass(frozen=True)
class GatherTask:
    """Everything one gather task needs (small and picklable)."""

    shard: int
    out_dir: str
    tmp_dir: str
    bucket_root: str  # where the buckets live (TMP_DIR/buckets, or in --scratch-dir)
    vocab_sha256: str
    n_genes: int
    obs_columns: tuple[str, ...]
    categories: Mapping[str, Sequence[str]]
    seed: int
    shuffle: bool
    dtype: str
    cell_stats: tuple[str, ...] = CELL_STATS


def _bucket_path(bucket_root: str, chunk: int) -> Path:
    return Path(bucket_root) / f"c{chunk:06d}"


def bucket_root_for(out: Path, scratch_dir: str | None, dataset_id: str) -> Path:
    """The bucket directory of a conversion: ``DIR/.scmf-tmp/buckets``, or with a scratch
    directory ``SCRATCH/scmf-buckets-<dataset id prefix>`` (the same on a re-run, so a
    killed conversion resumes with the buckets it finished)."""
    if scratch_dir is None:
        return out / TMP_DIR / "buckets"
    return Path(scratch_dir) / f"scmf-buckets-{dataset_id.split(':')[-1][:24]}"


def _codes(values: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    import pandas as pd  # a vectorised hash lookup; None (NA) is no category and maps to -1

    codes = pd.Index(list(categories), dtype=object).get_indexer(np.asarray(values, dtype=object))
    if (codes < 0).any():  # keep the old contract: a value outside the categories is a KeyError
        missing = [v for v, c in zip(values.tolist(), codes.tolist(), strict=True) if c < 0 and v is not None]
        if missing:
            raise KeyError(missing[0])
    return codes.astype(np.int32)


def run_scatter(task: ScatterTask) -> int:
    """Scatter task: read, validate and align one chunk; write it grouped by shard."""
    out = Path(task.bucket_dir)
    if out.is_dir():
        return int(np.load(out / "offsets.npy").shape[0])  # complete from an earlier run
    src = task.source
    rows = src.read_rows(task.chunk.start, task.chunk.stop, task.obs_columns, reuse=True)
    raw = rows.matrix
    where = f"{src.path}: rows [{task.chunk.start}, {task.chunk.stop}) of '{task.matrix}'"
    check_values(raw.data, task.dtype, where, allow_negative=task.allow_negative)
    alignment = task.alignment.load()
    dest = chunk_destinations(task.counts, task.seed, task.chunk.index, task.shuffle)
    order = np.argsort(dest, kind="stable")  # rows grouped by destination shard
    aligned, library_size = align_rows_with_totals(
        raw, alignment, dtype=task.dtype if task.transform is None else None, row_order=order,
        reuse=True)  # scratch buffers: written out below, before this task returns
    if rows.library_size is not None:  # the source knows totals over genes it did not return
        library_size = np.asarray(rows.library_size, dtype=np.float64)[order]
    extra_stats: dict[str, np.ndarray] = {}
    if task.transform is not None:  # HVG restriction, baked normalisation, size factors
        aligned, extra_stats = task.transform.apply(raw, aligned, library_size, where, order=order)
    offsets = np.concatenate([[0], np.cumsum(task.counts)]).astype(np.int64)
    if task.obs_columns:
        codes = np.stack([_codes(rows.obs[c], task.categories[c])[order] for c in task.obs_columns], axis=1)
    else:
        codes = np.zeros((len(order), 0), dtype=np.int32)
    tmp = attempt_name(out)
    tmp.mkdir(parents=True)
    np.save(tmp / "data.npy", aligned.data.astype(task.dtype, copy=False))
    faults.fault_point("scatter:partial")
    np.save(tmp / "indices.npy", aligned.indices.astype(np.int32, copy=False))
    np.save(tmp / "indptr.npy", aligned.indptr.astype(np.int64, copy=False))
    np.save(tmp / "cells.npy", np.asarray(rows.cell_ids[order], dtype=str))
    np.save(tmp / "library_size.npy", library_size)  # already in bucket order, as are
    for stat_name, stat in extra_stats.items():       # the aligned rows and extra stats
        np.save(tmp / f"{stat_name}.npy", stat)
    np.save(tmp / "codes.npy", codes)
    np.save(tmp / "offsets.npy", offsets)
    faults.fault_point("scatter:written")
    try:
        os.replace(tmp, out)
    except OSError:  # another attempt of this task finished first: same bytes, keep its bucket
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    faults.fault_point("scatter:renamed")
    return len(offsets)


def run_gather(task: GatherTask) -> dict[str, Any]:
    """Gather task: collect one shard's rows from every bucket, permute, write the shard."""
    scratch_release("h5ad.", "align.")  # the scatter stage is over: its buffers are not needed
    out_dir = Path(task.out_dir)
    relpath = shard_relpath(task.shard)
    record = Path(task.tmp_dir) / "shards" / f"{task.shard:06d}.json"
    final = out_dir / relpath
    if record.is_file() and final.is_dir():
        entry = ShardEntry.from_dict(json.loads(record.read_text()), task.shard)
        if _shard_verifies(out_dir, entry):
            return entry.to_dict()
    pieces = []  # (bucket dir, unused, row starts, row stops in its files, cells, lib, codes, source)
    extra_parts: dict[str, list[np.ndarray]] = {k: [] for k in task.cell_stats if k != "library_size"}
    chunks, chunk_sources = _shard_chunks(task.tmp_dir, task.shard)
    for c, source_index in zip(chunks.tolist(), chunk_sources.tolist(), strict=True):
        b = _bucket_path(task.bucket_root, c)
        offsets = np.load(b / "offsets.npy")
        lo, hi = int(offsets[task.shard]), int(offsets[task.shard + 1])
        if hi == lo:
            continue
        # Only the small per-cell arrays are read here; the values and indices are copied
        # straight from each bucket's map into their final place below, one bucket at a
        # time (memory: the shard once; no file stays open, however many chunks).
        indptr = _rows(b / "indptr.npy", lo, hi + 1)
        pieces.append(
            (
                b,
                None,
                indptr[:-1],
                indptr[1:],
                _rows(b / "cells.npy", lo, hi),
                _rows(b / "library_size.npy", lo, hi),
                _rows(b / "codes.npy", lo, hi),
                source_index,
            )
        )
        for stat_name, parts in extra_parts.items():
            parts.append(_rows(b / f"{stat_name}.npy", lo, hi))
    starts = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, np.int64)
    stops = np.concatenate([p[3] for p in pieces]) if pieces else np.zeros(0, np.int64)
    n = len(starts)
    perm = shard_permutation(n, task.seed, task.shard, task.shuffle)
    lengths = (stops - starts)[perm]
    indptr_out = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr_out[1:])
    nnz = int(indptr_out[-1])
    data_out = scratch("gather.data", nnz, task.dtype)  # reused across this thread's shards
    indices_out = scratch("gather.indices", nnz, np.int32)
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.arange(n, dtype=np.int64)
    dest = indptr_out[inverse]  # where each gathered row starts in the shard
    row = 0
    for p in pieces:  # this shard's rows are one contiguous stretch of each bucket: read it
        lo, hi = int(p[2][0]), int(p[3][-1])  # with one pread each (no map, no page faults)
        data_seg = _npy_segment(p[0] / "data.npy", lo, hi, "gather.seg_data")
        indices_seg = _npy_segment(p[0] / "indices.npy", lo, hi, "gather.seg_indices")
        copy_rows(data_seg, indices_seg, p[2] - lo, p[3] - lo, dest[row : row + len(p[2])],
                  data_out, indices_out)
        row += len(p[2])
    cells = np.concatenate([np.asarray(p[4]) for p in pieces])[perm] if pieces else np.zeros(0, str)
    library_size = np.concatenate([np.asarray(p[5]) for p in pieces])[perm] if pieces else np.zeros(0)
    codes = (
        np.concatenate([np.asarray(p[6]) for p in pieces])[perm]
        if pieces
        else np.zeros((0, len(task.obs_columns)), np.int32)
    )
    source_codes = np.concatenate([np.full(len(p[2]), p[7], dtype=np.int32) for p in pieces])[perm] if pieces else np.zeros(0, np.int32)
    obs_codes = {"source": source_codes}
    obs_codes.update({c: codes[:, j] for j, c in enumerate(task.obs_columns)})
    entry = write_shard(
        final,
        relpath,
        data=data_out,
        indices=indices_out,
        indptr=indptr_out,
        n_genes=task.n_genes,
        cell_ids=cells,
        obs_codes=obs_codes,
        obs_categories={"source": task.categories["source"], **{c: task.categories[c] for c in task.obs_columns}},
        var_names=_vocab_tokens(task.tmp_dir, task.vocab_sha256),
        after_step=faults.fault_point,
        numeric_obs={"library_size": library_size, **{
            k: np.concatenate(v)[perm] if v else np.zeros(0) for k, v in extra_parts.items()}},
    )
    faults.fault_point("gather:shard")
    d = entry.to_dict()
    tmp_record = attempt_name(record)
    tmp_record.write_text(json.dumps(d))
    faults.fault_point("gather:record-tmp")
    os.replace(tmp_record, record)
    faults.fault_point("gather:record")
    return d


def _shard_chunks(tmp_dir: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunks that send cells to ``shard`` and their sources, from the plan files (so a
    gather task carries no per-chunk lists: O(1) to submit whatever the dataset size)."""
    row = np.array(np.load(Path(tmp_dir) / "table_by_shard.npy", mmap_mode="r")[shard])
    chunks = np.flatnonzero(row)
    plan = json.loads((Path(tmp_dir) / "plan.json").read_text())  # ~1 ms for 6,000 chunks
    return chunks, np.asarray(plan["chunk_sources"], dtype=np.int64)[chunks]


def _npy_segment(path: Path, start: int, stop: int, role: str) -> np.ndarray:
    """Items ``[start, stop)`` of a 1-d ``.npy`` file, read into this thread's scratch buffer
    ``role`` (valid until the next read with that role)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        if len(shape) != 1 or not 0 <= start <= stop <= shape[0]:
            raise ScmfError(f"{path}: expected a 1-d array holding items [{start}, {stop}), found shape {shape}")
        out = scratch(role, stop - start, dtype)
        f.seek(f.tell() + start * dtype.itemsize)
        n = f.readinto(memoryview(out).cast("B"))
    if n != out.nbytes:
        raise ScmfError(f"{path}: truncated (read {n} of {out.nbytes} bytes)")
    return out


def _rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a ``.npy`` file, copied into memory; the file is closed."""
    return np.array(np.load(path, mmap_mode="r")[start:stop])


@lru_cache(maxsize=4)
def _vocab_tokens(tmp_dir: str, vocab_sha256: str) -> tuple[str, ...]:
    vocab = GeneVocab.from_file(Path(tmp_dir) / VOCAB_NAME)
    if vocab.sha256() != vocab_sha256:
        raise ScmfError(f"{tmp_dir}/{VOCAB_NAME}: vocabulary changed during the conversion")
    return tuple(vocab.tokens)


def _shard_verifies(out_dir: Path, entry: ShardEntry) -> bool:
    for a in entry.arrays.values():
        f = out_dir / entry.path / a.path
        if a.nbytes == 0:
            continue
        if not f.is_file() or f.stat().st_size != a.nbytes or sha256_file(f) != a.sha256:
            return False
    return entry.other_files is None or other_files_digest(out_dir / entry.path) == entry.other_files


# ---- the driver ----------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetLockedError(
                f"{out}: another conversion is writing to this directory (lock {LOCK_NAME} held); "
                "wait for it to finish or choose another --output"
            ) from None
        except OSError as exc:  # e.g. Lustre mounted without -o flock: ENOSYS
            raise ScmfError(
                f"{out}: cannot lock {LOCK_NAME} ({exc.strerror}); this file system does not "
                "support flock (Lustre: mount with -o flock); choose another --output"
            ) from None
        yield
    finally:
        os.close(fd)


def _prepare_output(out: Path, dataset_id: str, overwrite: bool) -> Manifest | None:
    """Decide what to do with an existing output directory. Returns the existing manifest
    when the very same dataset is already complete there."""
    entries = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if not entries:
        return None
    ours = MANIFEST_NAME in entries or TMP_DIR in entries
    if MANIFEST_NAME in entries:
        try:
            existing = read_manifest(out)
        except ManifestError:
            existing = None
        if existing is not None and existing.dataset_id == dataset_id and not overwrite:
            _remove_leftovers(out, entries)  # a run killed after writing its manifest
            return existing
        if not overwrite:
            found = existing.dataset_id if existing else "an unreadable manifest"
            raise DatasetExistsError(
                f"{out}: already holds a different dataset ({found}); expected {dataset_id}. "
                "Use --overwrite to replace it or choose another --output"
            )
    elif TMP_DIR in entries:
        plan = out / TMP_DIR / "plan.json"
        planned = plan.is_file()  # written first: without it the run was killed before any work
        same = planned and json.loads(plan.read_text()).get("dataset_id") == dataset_id
        if same and not overwrite:
            _remove_leftovers(out, entries)
            return None  # resume an interrupted conversion
        if planned and not overwrite:
            raise DatasetExistsError(
                f"{out}: holds an unfinished conversion of a different dataset; "
                "use --overwrite to discard it or choose another --output"
            )
    elif not overwrite or not ours:
        raise DatasetExistsError(
            f"{out}: exists and is not empty, and is not an scmf dataset; choose an empty or "
            "new --output (--overwrite only replaces scmf datasets)"
        )
    _remove_external_buckets(out)
    for name in entries:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return None


def _remove_external_buckets(out: Path) -> None:
    """Delete the buckets a conversion into ``out`` kept in a ``--scratch-dir`` (named in its
    plan); buckets inside ``out`` go with its scratch directory."""
    plan = out / TMP_DIR / "plan.json"
    try:
        root = json.loads(plan.read_text()).get("bucket_root")
    except (OSError, ValueError):
        return
    if root and Path(root).name.startswith("scmf-buckets-") and not Path(root).is_relative_to(out):
        shutil.rmtree(root, ignore_errors=True)


def _remove_partial_shards(out: Path) -> None:
    """Delete shard temporaries (``shards/*.zarr.tmp-*``) left by killed attempts."""
    shards = out / SHARDS_DIR
    for p in shards.glob("*.zarr.tmp*") if shards.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True)


def _remove_leftovers(out: Path, entries: set[str]) -> None:
    """Delete what a killed run may leave beside its results: half-written manifest and
    vocabulary temporaries, and the scratch directory once the manifest exists."""
    for name in entries:
        if name.startswith(f".{MANIFEST_NAME}.tmp") or name == VOCAB_NAME + ".tmp":
            (out / name).unlink(missing_ok=True)
    if MANIFEST_NAME in entries and TMP_DIR in entries:
        _remove_external_buckets(out)
        shutil.rmtree(out / TMP_DIR)


def convert_h5ad(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    **kwargs: Any,
) -> Manifest:
    """Convert ``.h5ad`` inputs (paths or fsspec URLs) into a dataset directory ``output``.

    Options come from ``options`` or keyword arguments (see :class:`ConvertOptions`).
    Returns the manifest written last. Raises a :class:`~scmf_loader.errors.ScmfError`
    subclass naming the file and the problem for any bad input; no manifest is written then.
    """
    if options is None:
        options = ConvertOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or keyword arguments, not both")
    paths = [os.fspath(p) for p in inputs]
    if not paths:
        raise ScmfError("no input files given")
    if len(set(paths)) != len(paths):
        raise ScmfError(f"the same input is given twice: {paths}")
    sources = [H5adSource(p, matrix=options.matrix, gene_column=options.gene_column) for p in paths]
    return convert_sources(sources, output, options)


def _fingerprint(source: Any) -> dict[str, Any]:
    return dict(source.fingerprint())


def convert_sources(
    sources: Sequence[Any], output: str | os.PathLike[str], options: ConvertOptions
) -> Manifest:
    """Convert already-opened sources (objects like :class:`H5adSource`: ``path``, ``kind``,
    ``n_cells``, ``n_genes``, ``genes``, ``check_obs_columns``, ``obs_values``,
    ``read_rows``, ``fingerprint``, ``manifest_fields``; picklable) into ``output``."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise DatasetExistsError(f"{out}: exists and is not a directory")
    paths = [s.path for s in sources]
    for s in sources:
        s.check_obs_columns(options.obs_columns)
    vocab = resolve_vocab(options.vocab, sources)
    alignments = [build_alignment(s.genes, vocab, s.path) for s in sources]
    check_preprocessing(options.preprocessing, sources, alignments)
    names = _source_names(paths)
    categories: dict[str, list[str]] = {"source": names}
    for col in options.obs_columns:
        values: set[str] = set()
        for s in sources:
            values.update(v for v in s.obs_values(col) if v is not None)
        categories[col] = sorted(values)

    with TaskRunner(options.workers, options.scheduler, options.quiet) as runner:
        fingerprints = runner.map(_fingerprint, list(sources), desc="checksum sources")
        definition = {
            "sources": [{"name": n, **fp} for n, fp in zip(names, fingerprints, strict=True)],
            "vocab_sha256": vocab.sha256(),
            "options": options.definition(),
        }
        dataset_id = compute_dataset_id(definition)
        out.mkdir(parents=True, exist_ok=True)
        with _locked(out):
            existing = _prepare_output(out, dataset_id, options.overwrite)
            if existing is not None:
                return existing
            manifest = _run(out, names, list(sources), alignments, vocab, categories,
                            fingerprints, dataset_id, options, runner)
    return manifest


def _run(
    out: Path,
    names: list[str],
    sources: list[Any],
    alignments: list[GeneAlignment],
    vocab: GeneVocab,
    categories: dict[str, list[str]],
    fingerprints: list[dict[str, Any]],
    dataset_id: str,
    options: ConvertOptions,
    runner: TaskRunner,
) -> Manifest:
    tmp = out / TMP_DIR
    chunks = plan_chunks([s.n_cells for s in sources], options.chunk_size)
    n_cells = sum(s.n_cells for s in sources)
    sizes = shard_sizes(n_cells, options.shard_size)
    table = assignment_table([c.n_cells for c in chunks], sizes, options.seed, options.shuffle)
    tmp.mkdir(exist_ok=True)
    buckets = bucket_root_for(out, options.scratch_dir, dataset_id)
    plan_doc = {"dataset_id": dataset_id, "n_shards": len(sizes),
                "chunk_sources": [c.source for c in chunks], "bucket_root": str(buckets)}
    (tmp / "plan.json.tmp").write_text(json.dumps(plan_doc))
    os.replace(tmp / "plan.json.tmp", tmp / "plan.json")  # first: marks the scratch as ours
    faults.fault_point("driver:plan")
    tmp_table = tmp / f"table_by_shard.npy.tmp-{os.getpid()}.npy"
    np.save(tmp_table, np.ascontiguousarray(table.T))  # one row per shard: what its gather reads
    os.replace(tmp_table, tmp / "table_by_shard.npy")
    buckets.mkdir(parents=True, exist_ok=True)
    (tmp / "shards").mkdir(exist_ok=True)
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    vocab.save(tmp / VOCAB_NAME)
    faults.fault_point("driver:vocab")
    stored = [store_alignment(a, tmp / "alignments" / f"s{i:05d}.npz") for i, a in enumerate(alignments)]
    prep = fit_preprocessing(  # stats pass(es) over all chunks: HVGs, scran size factors
        options.preprocessing, sources, chunks, stored, vocab.tokens, seed=options.seed,
        dtype=options.dtype, matrix=options.matrix, work_dir=tmp / "preprocess", runner=runner,
    )

    scatter = [
        ScatterTask(
            chunk=c,
            source=sources[c.source],
            matrix=options.matrix,
            alignment=stored[c.source],
            obs_columns=options.obs_columns,
            categories={k: categories[k] for k in options.obs_columns},
            counts=table[c.index],
            seed=options.seed,
            shuffle=options.shuffle,
            dtype=options.dtype,
            bucket_dir=str(_bucket_path(str(buckets), c.index)),
            transform=prep.transform_for(c.index) if prep is not None else None,
            allow_negative=allows_negative(options.preprocessing),
        )
        for c in chunks
    ]
    runner.map(run_scatter, scatter, desc="read and align")
    gather = [
        GatherTask(
            shard=s,
            out_dir=str(out),
            tmp_dir=str(tmp),
            bucket_root=str(buckets),
            vocab_sha256=vocab.sha256(),
            n_genes=len(vocab),
            obs_columns=options.obs_columns,
            categories=categories,
            seed=options.seed,
            shuffle=options.shuffle,
            dtype=options.dtype,
            cell_stats=prep.cell_stats if prep is not None else CELL_STATS,
        )
        for s in range(len(sizes))
    ]
    shard_dicts = runner.map(run_gather, gather, desc="write shards")
    scratch_release_all()  # in-process runs: the driver's thread ran the tasks
    shards = [ShardEntry.from_dict(d, i) for i, d in enumerate(shard_dicts)]

    vocab_path = out / VOCAB_NAME
    shutil.copyfile(tmp / VOCAB_NAME, out / (VOCAB_NAME + ".tmp"))
    faults.fault_point("driver:vocab-tmp")
    os.replace(out / (VOCAB_NAME + ".tmp"), vocab_path)
    faults.fault_point("driver:vocab-out")
    source_entries = []
    for n, src, a, fp in zip(names, sources, alignments, fingerprints, strict=True):
        extra = {"name": n, **src.manifest_fields(fp)}
        source_entries.append(
            SourceEntry(
                path=src.path, kind=src.kind, n_cells=src.n_cells, n_genes=src.n_genes,
                genes_matched=a.n_matched, genes_dropped=a.n_dropped,
                size=extra.pop("size", None), sha256=extra.pop("sha256", None), extra=extra,
            )
        )
    manifest = Manifest(
        dataset_id=dataset_id,
        created_by=_created_by(),
        n_cells=n_cells,
        n_genes=len(vocab),
        nnz=sum(s.nnz for s in shards),
        dtype=options.dtype,
        vocab={"path": VOCAB_NAME, "sha256": vocab.sha256(), "file_sha256": sha256_file(vocab_path),
               "name": vocab.name, "n_tokens": len(vocab)},
        preprocessing=prep.manifest_dict() if prep is not None else (
            dict(options.preprocessing) or {"normalize": None, "log1p": False, "hvg": None}),
        sources=source_entries,
        obs_columns=[ObsColumn(name=k, categories=tuple(v)) for k, v in categories.items()],
        cell_stats=prep.cell_stats if prep is not None else CELL_STATS,
        shuffle={"enabled": options.shuffle, "seed": options.seed, "chunk_size": options.chunk_size,
                 "shard_size": options.shard_size},
        shards=shards,
    )
    _remove_partial_shards(out)  # temporaries of killed attempts (never of this run's tasks)
    write_manifest(out, manifest, before_rename=lambda: faults.fault_point("driver:manifest-tmp"))
    faults.fault_point("driver:manifest")
    if options.scratch_dir is not None:
        shutil.rmtree(buckets, ignore_errors=True)
    shutil.rmtree(tmp)
    return manifest
