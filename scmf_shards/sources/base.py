"""The source protocol: what the converter needs from every input, and the pieces shared by
the sources (:class:`RowChunk`, URL helpers, file fingerprints).

A source is one input of a conversion (an AnnData ``.h5ad`` file or ``.zarr`` store, an scmf
dataset directory, a Census query). The driver opens every source once, in the main process,
then sends it (pickled) with each task to wherever the task runs; a source therefore holds
no open file, only what reopens it. Rows are numbered ``0 .. n_cells - 1``; columns are the
source's genes (:attr:`Source.genes`), in their stored order.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from scmf_loader.labels import stringify

__all__ = [
    "RowChunk",
    "Source",
    "is_url",
    "local_path",
    "prefetch_fingerprints",
    "source_fingerprint",
    "strings",
]


@dataclass
class RowChunk:
    """Raw rows ``[start, stop)`` of a source: a CSR matrix over the source's genes (values in
    the source dtype) and the requested obs columns as object arrays of strings (None = NA)."""

    start: int
    stop: int
    matrix: sp.csr_matrix
    cell_ids: np.ndarray
    obs: dict[str, np.ndarray]
    library_size: np.ndarray | None = None  # totals over all genes of the source, when
    #                                          ``matrix`` holds only some of them (float64)


@runtime_checkable
class Source(Protocol):
    """What every conversion input implements (duck-typed; small and picklable).

    Attributes: ``path`` (what the user named: a path or URL, recorded in the manifest),
    ``kind`` (``"h5ad"``, ``"anndata_zarr"``, ``"scmf_dataset"``, ``"cellxgene_census"``),
    ``layout`` (how the matrix is stored, e.g. ``"csr"``), ``n_cells``, ``n_genes``, ``dtype``
    (of the stored values) and ``genes`` (``n_genes`` gene ids, as strings).
    Sources may also implement ``prepare(work_dir) -> Source``: a one-time step before any
    rows are read (e.g. a CSC matrix stored again as CSR); see
    :func:`scmf_shards.sources.prepare_sources`.
    """

    path: str
    kind: str
    layout: str
    n_cells: int
    n_genes: int
    dtype: np.dtype

    @property
    def genes(self) -> list[str]:
        """Gene id of every column, in column order."""
        ...

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """Raise :class:`~scmf_loader.errors.InvalidInputError` naming the input if any of
        ``columns`` is not an obs column of this source."""
        ...

    def obs_values(self, column: str) -> np.ndarray:
        """Every value of one obs column, as strings (None = NA)."""
        ...

    def read_rows(self, start: int, stop: int, obs_columns: Sequence[str] = (),
                  reuse: bool = False) -> RowChunk:
        """Rows ``[start, stop)``: a CSR matrix over :attr:`genes`, cell ids and obs values.
        ``reuse`` allows the matrix to live in this thread's scratch buffers (valid until the
        next reusing read on the thread). Memory is bounded by the rows read."""
        ...

    def fingerprint(self) -> dict[str, object]:
        """What identifies this input's content (hashed into the ``dataset_id``): JSON
        values only, never a time or a machine-specific path."""
        ...

    def manifest_fields(self, fingerprint: dict[str, object]) -> dict[str, object]:
        """Provenance recorded for this source in the manifest (``size``/``sha256`` when the
        source is a file or store)."""
        ...


def is_url(path: str) -> bool:
    """True for an fsspec URL (``proto://...``), False for a plain local path or ``file://``."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """``path`` without a ``file://`` prefix."""
    return path[len("file://") :] if path.startswith("file://") else path


def _hash_stream(opener: Any, h: Any) -> int:
    """Feed a file into ``h`` in 8 MiB pieces; its size. A reader thread fills the next pieces
    while this thread hashes the current one (both release the GIL), so a cold file costs
    about its read time, not read time plus hash time."""
    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[bytearray | None, int | BaseException]] = queue.Queue()
    for _ in range(3):
        free.put(bytearray(8 << 20))
    stop = threading.Event()

    def read(f: Any) -> None:
        try:
            while not stop.is_set():
                buf = free.get()
                n = f.readinto(buf)
                full.put((buf, n))
                if not n:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread
            full.put((None, exc))

    size = 0
    with opener as f:
        reader = threading.Thread(target=read, args=(f,), name="scmf-fingerprint", daemon=True)
        reader.start()
        try:
            while True:
                buf, n = full.get()
                if buf is None:
                    raise n  # type: ignore[misc]
                if not n:
                    break
                size += n  # type: ignore[operator]
                h.update(memoryview(buf)[:n])
                free.put(buf)
        finally:
            stop.set()
            free.put(bytearray(0))  # wakes a reader waiting for a buffer
            reader.join()
    return size


#: checksums started ahead by :func:`prefetch_fingerprints`, by (path, device, inode, size, mtime)
_PREFETCHED: dict[tuple[Any, ...], Future[tuple[int, str]]] = {}
_PREFETCH_LOCK = threading.Lock()


def _file_key(path: str) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def prefetch_fingerprints(paths: Sequence[str]) -> None:
    """Start checksumming the local files among ``paths`` in a background thread, one after
    the other, so that the full read a checksum is overlaps with opening the inputs (importing
    anndata alone takes ~1.5 s); :func:`source_fingerprint` takes the result when the file
    is unchanged (same inode, size and mtime), and computes it itself otherwise. URLs and
    directories are left to it."""
    todo = []
    for p in paths:
        local = local_path(str(p))
        key = None if is_url(str(p)) else _file_key(local)
        if key is None:
            continue
        with _PREFETCH_LOCK:
            if key in _PREFETCHED:
                continue
            fut: Future[tuple[int, str]] = Future()
            _PREFETCHED[key] = fut
        todo.append((local, fut))

    def run() -> None:
        for local, fut in todo:
            try:
                fut.set_result(_sha256(local))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever asks
                fut.set_exception(exc)

    if todo:
        threading.Thread(target=run, name="scmf-prefetch-checksum", daemon=True).start()


def _sha256(path: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file (local or fsspec URL), streamed."""
    h = hashlib.sha256()
    if is_url(path):
        import fsspec

        opener: Any = fsspec.open(path, "rb")
    else:
        opener = open(local_path(path), "rb")  # noqa: SIM115
    return _hash_stream(opener, h), h.hexdigest()


def source_fingerprint(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a source file (local or fsspec URL), streamed (or
    started ahead by :func:`prefetch_fingerprints`)."""
    if not is_url(path):
        key = _file_key(local_path(path))
        with _PREFETCH_LOCK:
            fut = _PREFETCHED.pop(key, None) if key is not None else None
        if fut is not None:
            size, digest = fut.result()
            if _file_key(local_path(path)) == key:  # unchanged while it was read
                return size, digest
    return _sha256(path)


def tree_fingerprint(path: str) -> tuple[int, str]:
    """(total bytes, sha256) of a directory tree (a ``.zarr`` store; local or URL): the hash
    of every file's relative path, size and sha256, in sorted path order."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path if is_url(path) else local_path(path))
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if not fs.isdir(p))
    outer = hashlib.sha256()
    total = 0
    for p in files:
        inner = hashlib.sha256()
        n = _hash_stream(fs.open(p, "rb"), inner)
        rel = p[len(root) + 1 :]
        outer.update(f"{rel}\0{n}\0{inner.hexdigest()}\n".encode())
        total += n
    return total, outer.hexdigest()


def strings(values: Any) -> np.ndarray:
    """Values as an object array of strings (None for a missing value)."""
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    if set(map(type, items)) <= {str, type(None)}:  # the common case (decoded categories and
        out = np.empty(len(items), dtype=object)   # string indexes): no per-value Python loop
        out[:] = items
        return out
    return stringify(items)
