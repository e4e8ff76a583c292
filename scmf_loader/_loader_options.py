"""Options of :class:`~scmf_loader.dataloader.CellDataLoader`: validation, the fusable
recorded pipeline, and what ``worker_type="auto"`` picks."""

from __future__ import annotations

import copy
import os
from typing import Any

from scmf_loader.batch import TRUNCATIONS
from scmf_loader.dataset import CellDataset
from scmf_loader.errors import ConfigurationError

OUTPUTS = ("csr", "padded", "dense", "rank", "binned")
WORKER_TYPES = ("auto", "process", "thread")

__all__ = ["OUTPUTS", "THREAD_OUTPUTS", "WORKER_TYPES", "auto_threads", "check_worker_options", "checked_options", "fusable",
           "resolve_worker_type"]


def fusable(dataset: Any) -> tuple[Any, Any]:
    """``(the dataset without its pipeline, the pipeline)`` when the dataset's per-batch
    preprocessing is a :class:`~scmf_loader.preprocess.PreprocessingPipeline` the output
    kernels fuse (normalise, log1p: each value read and written once); else ``(None, None)``."""
    pipe = getattr(dataset, "preprocessing", None)
    if type(dataset) is not CellDataset or pipe is None or not hasattr(pipe, "divisors_for"):
        return None, None
    if not getattr(pipe, "transforms_values", False):
        return None, None
    raw = copy.copy(dataset)  # shares the store and caches; only the pipeline differs
    raw.preprocessing = None
    return raw, pipe


def checked_options(dataset: Any, output: str, n_bins: int, truncation: str,
                     max_genes: int | None, num_workers: int) -> int | None:
    """Validate the loader's output options; the effective ``max_genes``."""
    if output not in OUTPUTS:
        raise ConfigurationError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "binned" and (isinstance(n_bins, bool) or n_bins < 2):
        raise ConfigurationError(f"n_bins must be >= 2, got {n_bins!r}")
    if output == "rank":
        dataset.gene_nonzero_median  # noqa: B018 -- raises now, naming the fix, for a dataset without it
    if truncation not in TRUNCATIONS:
        raise ConfigurationError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    max_genes = dataset.max_genes if max_genes is None else max_genes
    if max_genes is not None and (isinstance(max_genes, bool) or max_genes < 1):
        raise ConfigurationError(f"max_genes must be >= 1 or None, got {max_genes!r}")
    if num_workers < 0:
        raise ConfigurationError(f"num_workers must be >= 0, got {num_workers}")
    return max_genes


def check_worker_options(transform: Any, read_ahead: int, worker_type: str) -> None:
    if transform is not None and not callable(transform):
        raise ConfigurationError(f"transform must be callable, got {type(transform).__name__}")
    if isinstance(read_ahead, bool) or read_ahead < 0:
        raise ConfigurationError(f"read_ahead must be a number of batches >= 0, got {read_ahead!r}")
    if worker_type not in WORKER_TYPES:
        raise ConfigurationError(f"worker_type must be one of {WORKER_TYPES}, got {worker_type!r}")


#: outputs ``"auto"`` builds in worker threads: CSR gathers (a ``memcpy`` releasing the GIL)
#: and the compiled kernels (numba, ``nogil``): every output (measured: docs/benchmarks.md)
THREAD_OUTPUTS = ("csr", "padded", "dense", "rank", "binned")


def resolve_worker_type(worker_type: str, dataset: Any, output: str, transform: Any, pinned: bool = False) -> str:
    """``"auto"`` resolved: threads (no hand-over at all) for :data:`THREAD_OUTPUTS` of a
    dataset directory with no transform (a transform may hold the GIL), at most a fused
    pipeline applied, and no pinning (worker processes write into page-locked slots);
    processes otherwise. Measured: docs/benchmarks.md, issue 11 items 2-4."""
    if worker_type != "auto":
        return worker_type
    pipe = getattr(dataset, "preprocessing", None)
    fused = pipe is None or fusable(dataset)[1] is not None
    directory = type(dataset) is CellDataset and getattr(dataset, "store", None) is not None
    ok = output in THREAD_OUTPUTS and transform is None and fused and directory and not pinned
    return "thread" if ok else "process"


def auto_threads(num_workers: int, output: str) -> int:
    """Threads ``"auto"`` runs: for CSR gathers (memory-bound), at most one per core but
    the caller's (more only compete with each other and the caller); else ``num_workers``."""
    if output != "csr":
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(num_workers, max(1, cores - 1))
