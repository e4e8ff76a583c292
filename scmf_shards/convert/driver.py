"""The driver of a conversion: sources → plan → scatter → gather → vocabulary and manifest.

:func:`convert_sources` checks everything that needs no data (obs columns, vocabulary,
alignments, preprocessing), computes the dataset id, takes the output directory's lock and
decides what to do with what is there (:mod:`.output`); then a run goes through its stages,
each a function of one :class:`_Run` context: :func:`_plan` writes the scratch layout
(:mod:`.workspace`), the preprocessing stats passes fit, :mod:`.scatter` and :mod:`.gather`
tasks run where the :class:`~scmf_shards.executor.TaskRunner` says, and :func:`_publish`
writes ``vocab.json`` and finally ``manifest.json``. When the shuffled data fits
``--memory-limit`` (:func:`one_pass`) the scatter tasks hold their chunks in memory and the
gather tasks read them there: one write of the data instead of two, the same bytes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import DatasetExistsError, InvalidInputError, ScmfError
from scmf_loader.format import (
    SHARDS_DIR,
    VOCAB_NAME,
    Manifest,
    ObsColumn,
    ShardEntry,
    SourceEntry,
    compute_dataset_id,
    sha256_file,
    write_manifest,
)
from scmf_loader.vocab import GeneVocab, resolve_vocab
from scmf_shards import faults
from scmf_shards.align import GeneAlignment, StoredAlignment, build_alignment, store_alignment
from scmf_shards.arena import Arena
from scmf_shards.convert.derived import derive_obs_columns, perturbation_manifest
from scmf_shards.convert.diskspace import OutputGuard, estimate_bytes
from scmf_shards.convert.gather import CELL_STATS, GatherTask, reusable_shard, run_gather
from scmf_shards.convert.output import locked, prepare_output, remove_partial_shards
from scmf_shards.convert.scatter import ScatterTask, run_scatter, scatter_to_memory
from scmf_shards.convert.startup import gc_frozen, one_pass, speculative_arena, warm_up
from scmf_shards.convert.workspace import Workspace, bucket_path
from scmf_shards.executor import TaskRunner
from scmf_shards.medians import NonzeroHistogram, merge_histograms, save_medians
from scmf_shards.options import ConvertOptions
from scmf_shards.plan import ReadChunk, assignment_table, plan_chunks, shard_sizes
from scmf_shards.preprocess.config import allows_negative, check_preprocessing
from scmf_shards.preprocess.stats import fit_preprocessing
from scmf_shards.scratch import release_all as scratch_release_all
from scmf_shards.sources import open_sources, prepare_sources
from scmf_shards.sources.base import is_url, local_path, prefetch_fingerprints

__all__ = ["RAW_PREPROCESSING", "convert_h5ad", "convert_sources", "created_by", "resolve_vocab"]

#: the manifest's ``preprocessing`` of a dataset that stores raw values (docs/format.md)
RAW_PREPROCESSING = {"normalize": None, "log1p": False, "hvg": None}


def created_by() -> str:
    """The manifest's ``created_by``: this distribution and its version."""
    try:
        return f"scmodelforge-data {version('scmodelforge-data')}"
    except PackageNotFoundError:  # running from a source tree
        return "scmodelforge-data (source tree)"


def _source_names(paths: Sequence[str]) -> list[str]:
    """Each source's file name, made unique with ``#2``, ``#3`` ... (the ``source`` category)."""
    base = [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
    counts: dict[str, int] = {}
    out = []
    for b in base:
        counts[b] = counts.get(b, 0) + 1
        out.append(b if counts[b] == 1 else f"{b}#{counts[b]}")
    return out


def convert_h5ad(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Manifest:
    """Convert AnnData inputs into a dataset directory ``output``: ``.h5ad`` files, ``.zarr``
    stores, directories of them or globs, and scmf dataset directories (paths or fsspec
    URLs; see :func:`scmf_shards.sources.open_sources`). ``output`` may be an fsspec URL
    (``s3://bucket/prefix``, ``gs://``, ``memory://``): see :mod:`scmf_shards.upload`;
    ``storage_options`` go to fsspec for it.

    Options come from ``options`` or keyword arguments (see :class:`ConvertOptions`).
    Returns the manifest written last. Raises a :class:`~scmf_loader.errors.ScmfError`
    subclass naming the file and the problem for any bad input; no manifest is written then.
    """
    if options is None:
        options = ConvertOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or keyword arguments, not both")
    paths = [os.fspath(p) for p in inputs]
    prefetch_fingerprints(paths)  # the checksums' reads start while the inputs are opened
    try:
        sources = open_sources(paths, options.matrix, options.gene_column,
                               allow_negative=allows_negative(options.preprocessing))
    except ScmfError:
        raise
    except Exception as exc:  # fsspec/botocore (no credentials, no network) on a URL input
        urls = [p for p in paths if is_url(p)]
        if not urls:
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInputError(f"{', '.join(urls)}: cannot open ({reason})") from exc
    return convert_sources(sources, output, options, storage_options=storage_options)


@dataclass
class _Run:
    """What every stage of one conversion needs."""

    out: Path
    ws: Workspace
    names: list[str]
    sources: list[Any]
    alignments: list[GeneAlignment]
    vocab: GeneVocab
    categories: dict[str, list[str]]
    fingerprints: list[dict[str, Any]]
    dataset_id: str
    options: ConvertOptions
    runner: TaskRunner
    estimate: int = 0  # about how many bytes the shards take (diskspace.estimate_bytes)
    #: called as ``on_shard(shard_index, entry_dict)`` once each shard is written and recorded,
    #: in the thread that gathered it (in-process runners; with ``--scheduler``, after the
    #: gather stage, in shard order); :class:`scmf_shards.upload.BucketTarget` uploads there
    on_shard: Callable[[int, dict[str, Any]], None] | None = None
    #: ``stored_shard(shard_index)``: the entry dict of a shard already stored intact where the
    #: dataset goes (an upload target's bucket, a resumed run), whose gather is skipped; or None
    stored_shard: Callable[[int], dict[str, Any] | None] | None = None
    #: memory for a one-pass run's held rows, faulted in while the sources are checksummed
    arena: Arena | None = None


@dataclass
class _Plan:
    """The read chunks, shard sizes, assignment table and bucket root of a run."""

    chunks: list[ReadChunk]
    sizes: np.ndarray
    table: np.ndarray
    buckets: Path


def _local_files(sources: Sequence[Any]) -> bool:
    """Whether every source is a local file or store (read concurrently without sharing)."""
    return all(getattr(s, "kind", "") != "census" and not is_url(str(getattr(s, "path", ""))) for s in sources)


def _fingerprint(source: Any) -> dict[str, Any]:
    return dict(source.fingerprint())


def _categories(sources: Sequence[Any], names: list[str], columns: Sequence[str]) -> dict[str, list[str]]:
    """Categories of the ``source`` column and of every kept obs column (sorted values)."""
    categories: dict[str, list[str]] = {"source": names}
    for col in columns:
        values: set[str] = set()
        for s in sources:
            values.update(v for v in s.obs_values(col) if v is not None)
        categories[col] = sorted(values)
    return categories


def convert_sources(
    sources: Sequence[Any], output: str | os.PathLike[str], options: ConvertOptions,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Convert already-opened sources (objects like :class:`H5adSource`: ``path``, ``kind``,
    ``n_cells``, ``n_genes``, ``genes``, ``check_obs_columns``, ``obs_values``,
    ``read_rows``, ``fingerprint``, ``manifest_fields``; picklable) into ``output``: a
    directory (or ``file://`` URL), or any other fsspec URL, converted in a local staging
    directory and uploaded (:class:`scmf_shards.upload.BucketTarget`)."""
    from scmf_shards.upload import output_target

    target = output_target(output, options, storage_options)  # refuses URLs it cannot honour
    out = Path(local_path(os.fspath(output)))
    if target is None and out.exists() and not out.is_dir():
        raise DatasetExistsError(f"{out}: exists and is not a directory")
    vocab = resolve_vocab(options.vocab, [s.genes for s in sources])
    # organism and perturbation columns: sources wrapped, their names added to obs_columns
    sources, options = derive_obs_columns(sources, vocab, options)
    for s in sources:
        s.check_obs_columns(options.obs_columns)
    alignments = [build_alignment(s.genes, vocab, s.path,
                                  organism=getattr(s, "organism", None) if vocab.is_multi_species else None)
                  for s in sources]
    check_preprocessing(options.preprocessing, sources, alignments)
    names = _source_names([s.path for s in sources])
    with TaskRunner(options.workers, options.scheduler, options.quiet) as runner, gc_frozen(), \
            ThreadPoolExecutor(2, thread_name_prefix="scmf-background") as background:
        # the sources' checksums (a full read of each) run while this thread reads obs, and
        # the writer's libraries and the compiled kernels load meanwhile
        pending = background.submit(runner.map, _fingerprint, list(sources), "checksum sources")
        if not _local_files(sources):  # fsspec's memory:// hands every reader one shared file
            pending.result()          # object, Census reads share contexts: one at a time there
        background.submit(warm_up)
        estimate = estimate_bytes(sources, options.dtype, len(vocab))
        arena = speculative_arena(out, target is None, sources, estimate, options, runner)
        categories = _categories(sources, names, options.obs_columns)
        fingerprints = pending.result()
        definition = {
            "sources": [{"name": n, **fp} for n, fp in zip(names, fingerprints, strict=True)],
            "vocab_sha256": vocab.sha256(),
            "options": options.definition(),
        }
        dataset_id = compute_dataset_id(definition)
        run = _Run(out, Workspace.at(out), names, list(sources), alignments, vocab, categories,
                   fingerprints, dataset_id, options, runner, estimate, arena=arena)
        try:
            if target is not None:  # into a staging directory, then uploaded
                return target.run(dataset_id, lambda d, on_shard=None, stored_shard=None: _write(
                    replace(run, out=d, ws=Workspace.at(d), on_shard=on_shard, stored_shard=stored_shard)))
            return _write(run)
        finally:
            if arena is not None:
                arena.stop()  # its pages need touching no more, whether used or not


def _write(run: _Run) -> Manifest:
    """The conversion into ``run.out`` under its lock (or the dataset already there)."""
    # a full disk, a read-only or uncreatable output: one OutputNotWritableError line
    with OutputGuard(run.out, run.options.scratch_dir, run.estimate) as guard:
        run.out.mkdir(parents=True, exist_ok=True)
        with locked(run.out):
            existing = prepare_output(run.out, run.dataset_id, run.options.overwrite)
            if existing is not None:
                return existing
            guard.warn()  # before anything is written
            return _execute(run)


def _execute(run: _Run) -> Manifest:
    """The stages of one conversion, in order."""
    resumed = _resumed(run)
    plan = _plan(run)
    run.sources = prepare_sources(run.sources, plan.buckets / "sources")  # CSC copied as CSR
    stored = [store_alignment(a, run.ws.alignment(i)) for i, a in enumerate(run.alignments)]
    prep = fit_preprocessing(  # stats pass(es) over all chunks: HVGs, scran size factors
        run.options.preprocessing, run.sources, plan.chunks, stored, run.vocab.tokens,
        seed=run.options.seed, dtype=run.options.dtype, matrix=run.options.matrix,
        work_dir=run.ws.preprocess, runner=run.runner,
    )
    memory = None
    if _all_shards_done(run, plan):  # a re-run after the last gather: nothing to read
        memory = {}
    elif not resumed and one_pass(run.estimate, plan.sizes, run.options, run.runner):  # fits in memory
        memory = _scatter_to_memory(run, plan, stored, prep)
    else:  # through buckets; a re-run of a killed conversion too, so every attempt keeps its work
        _scatter(run, plan, stored, prep)
    _save_medians(run, plan, memory)
    shards = _gather(run, plan, prep, memory)
    memory = None  # every shard is written: the held buckets go
    manifest = _publish(run, shards, prep)
    if run.options.scratch_dir is not None:
        shutil.rmtree(plan.buckets, ignore_errors=True)
    shutil.rmtree(run.ws.root)
    return manifest


def _plan(run: _Run) -> _Plan:
    """Plan the chunks and shards, and write the scratch layout: the plan first (it marks
    the scratch directory as this conversion's), then the table, directories, vocabulary."""
    opts, ws = run.options, run.ws
    chunks = plan_chunks([s.n_cells for s in run.sources], opts.chunk_size)
    sizes = shard_sizes(sum(s.n_cells for s in run.sources), opts.shard_size)
    table = assignment_table([c.n_cells for c in chunks], sizes, opts.seed, opts.shuffle)
    ws.root.mkdir(exist_ok=True)
    buckets = ws.bucket_root(opts.scratch_dir, run.dataset_id)
    ws.write_plan({"dataset_id": run.dataset_id, "n_shards": len(sizes),
                   "chunk_sources": [c.source for c in chunks], "bucket_root": str(buckets)})
    faults.fault_point("driver:plan")
    tmp_table = ws.table.with_name(f"{ws.table.name}.tmp-{os.getpid()}.npy")
    np.save(tmp_table, np.ascontiguousarray(table.T))  # one row per shard: what its gather reads
    os.replace(tmp_table, ws.table)
    buckets.mkdir(parents=True, exist_ok=True)
    ws.records.mkdir(exist_ok=True)
    (run.out / SHARDS_DIR).mkdir(exist_ok=True)
    run.vocab.save(ws.vocab)
    faults.fault_point("driver:vocab")
    return _Plan(chunks, sizes, table, buckets)


def _resumed(run: _Run) -> bool:
    """Whether an earlier attempt at this dataset left its plan (it was killed): the re-run
    goes through buckets, so that a run killed again keeps what it read (a one-pass attempt
    keeps nothing before its first shard)."""
    plan = run.ws.read_plan()
    return plan is not None and plan.get("dataset_id") == run.dataset_id


def _all_shards_done(run: _Run, plan: _Plan) -> bool:
    """Every shard is on disk, recorded and verified (a re-run after the last gather)."""
    return all(_done_shard(run, s) is not None for s in range(len(plan.sizes)))


def _done_shard(run: _Run, shard: int) -> dict[str, Any] | None:
    """The entry of a shard that needs no gather: stored at the target, or verified on disk."""
    stored = run.stored_shard(shard) if run.stored_shard is not None else None
    return stored if stored is not None else reusable_shard(run.out, shard)


def _scatter_tasks(run: _Run, plan: _Plan, stored: list[StoredAlignment], prep: Any) -> list[ScatterTask]:
    """One scatter task per read chunk."""
    opts = run.options
    categories = {k: run.categories[k] for k in opts.obs_columns}
    return [
        ScatterTask(
            chunk=c, source=run.sources[c.source], matrix=opts.matrix, alignment=stored[c.source],
            obs_columns=opts.obs_columns, categories=categories, counts=plan.table[c.index],
            seed=opts.seed, shuffle=opts.shuffle, dtype=opts.dtype,
            bucket_dir=str(bucket_path(plan.buckets, c.index)),
            transform=prep.transform_for(c.index) if prep is not None else None,
            allow_negative=allows_negative(opts.preprocessing), n_genes=len(run.vocab),
            histogram_path=str(run.ws.histogram(c.index)),
        )
        for c in plan.chunks
    ]


def _scatter(run: _Run, plan: _Plan, stored: list[StoredAlignment], prep: Any) -> None:
    """Two-stage conversions: every read chunk into its bucket directory."""
    run.runner.map(run_scatter, _scatter_tasks(run, plan, stored, prep), desc="read and align")


def _scatter_to_memory(run: _Run, plan: _Plan, stored: list[StoredAlignment], prep: Any) -> dict[int, Any]:
    """One-pass conversions: every read chunk aligned and held in memory (in the run's arena
    while it lasts), by chunk index."""
    tasks = [replace(t, arena=run.arena) for t in _scatter_tasks(run, plan, stored, prep)]
    held = run.runner.map(scatter_to_memory, tasks, desc="read and align")
    return {c.index: h for c, h in zip(plan.chunks, held, strict=True)}


def _save_medians(run: _Run, plan: _Plan, memory: dict[int, Any] | None) -> None:
    """The per-gene non-zero medians (:mod:`scmf_shards.medians`): every chunk's histogram
    (its scatter task saved it) merged in chunk order, saved in the workspace, where each
    gather task reads them into its shard's var. A function of the data alone: kept from an
    earlier run; not needed when a one-pass re-run read no chunk (every shard is written)."""
    if run.ws.medians.is_file() or (memory is not None and len(memory) < len(plan.chunks)):
        return
    histograms = (NonzeroHistogram.load(run.ws.histogram(c.index)) for c in plan.chunks)
    save_medians(run.ws.medians, merge_histograms(histograms, len(run.vocab)).medians())
    faults.fault_point("driver:medians")


def _gather(run: _Run, plan: _Plan, prep: Any, memory: dict[int, Any] | None = None) -> list[ShardEntry]:
    """Run one gather task per shard (from bucket files, or from the buckets in ``memory``);
    their manifest entries, in shard order."""
    opts = run.options
    stored = {}
    if run.stored_shard is not None:
        stored = {s: d for s in range(len(plan.sizes)) if (d := run.stored_shard(s)) is not None}
    tasks = [
        GatherTask(
            shard=s, out_dir=str(run.out), bucket_root=str(plan.buckets),
            vocab_sha256=run.vocab.sha256(), n_genes=len(run.vocab), obs_columns=opts.obs_columns,
            categories=run.categories, seed=opts.seed, shuffle=opts.shuffle, dtype=opts.dtype,
            cell_stats=prep.cell_stats if prep is not None else CELL_STATS, memory=memory,
        )
        for s in range(len(plan.sizes))
        if s not in stored
    ]
    if run.on_shard is not None and run.runner.in_process:
        def gather(task: GatherTask, done: Callable[[int, dict[str, Any]], None] = run.on_shard) -> dict[str, Any]:
            entry = run_gather(task)
            done(task.shard, entry)
            return entry

        gathered = run.runner.map(gather, tasks, desc="write shards")
    else:
        gathered = run.runner.map(run_gather, tasks, desc="write shards")
        if run.on_shard is not None:
            for t, d in zip(tasks, gathered, strict=True):
                run.on_shard(t.shard, d)
    scratch_release_all()  # in-process runs: the driver's thread ran the tasks
    by_shard = {**stored, **{t.shard: d for t, d in zip(tasks, gathered, strict=True)}}
    return [ShardEntry.from_dict(by_shard[i], i) for i in range(len(plan.sizes))]


def _publish(run: _Run, shards: list[ShardEntry], prep: Any) -> Manifest:
    """Copy the vocabulary into place, then write the manifest (last)."""
    vocab_path, vocab_tmp = run.out / VOCAB_NAME, run.out / (VOCAB_NAME + ".tmp")
    shutil.copyfile(run.ws.vocab, vocab_tmp)
    faults.fault_point("driver:vocab-tmp")
    os.replace(vocab_tmp, vocab_path)
    faults.fault_point("driver:vocab-out")
    manifest = _manifest(run, shards, prep, sha256_file(vocab_path))
    remove_partial_shards(run.out)  # temporaries of killed attempts (never of this run's tasks)
    write_manifest(run.out, manifest, before_rename=lambda: faults.fault_point("driver:manifest-tmp"))
    faults.fault_point("driver:manifest")
    return manifest


def _source_entries(run: _Run) -> list[SourceEntry]:
    entries = []
    for n, src, a, fp in zip(run.names, run.sources, run.alignments, run.fingerprints, strict=True):
        extra = {"name": n, **src.manifest_fields(fp)}
        entries.append(SourceEntry(
            path=src.path, kind=src.kind, n_cells=src.n_cells, n_genes=src.n_genes,
            genes_matched=a.n_matched, genes_dropped=a.n_dropped,
            size=extra.pop("size", None), sha256=extra.pop("sha256", None), extra=extra,
        ))
    return entries


def _manifest(run: _Run, shards: list[ShardEntry], prep: Any, vocab_file_sha256: str) -> Manifest:
    opts, vocab = run.options, run.vocab
    return Manifest(
        dataset_id=run.dataset_id,
        created_by=created_by(),
        n_cells=sum(s.n_cells for s in run.sources),
        n_genes=len(vocab),
        nnz=sum(s.nnz for s in shards),
        dtype=opts.dtype,
        vocab={"path": VOCAB_NAME, "sha256": vocab.sha256(), "file_sha256": vocab_file_sha256,
               "name": vocab.name, "n_tokens": len(vocab)},
        preprocessing=prep.manifest_dict() if prep is not None else dict(RAW_PREPROCESSING),
        sources=_source_entries(run),
        obs_columns=[ObsColumn(name=k, categories=tuple(v)) for k, v in run.categories.items()],
        cell_stats=prep.cell_stats if prep is not None else CELL_STATS,
        shuffle={"enabled": opts.shuffle, "seed": opts.seed, "chunk_size": opts.chunk_size,
                 "shard_size": opts.shard_size},
        shards=shards,
        perturbation=perturbation_manifest(run.names, run.sources),
    )
