"""Disk space and unwritable outputs: an estimate before writing, one clear line on failure.

A conversion writes its shards into ``--output`` and, unless its data fits ``--memory-limit``
(one pass), buckets of about the same size into its scratch directory (inside ``--output``
unless ``--scratch-dir``).
:func:`estimate_bytes` samples the inputs' first rows for the number of stored values per
cell; :func:`warn_if_short` warns before anything is written when the estimate does not fit
the free space. When a write fails, :func:`output_error` turns the ``OSError`` (``ENOSPC``,
``EDQUOT``, a short write without ``errno`` on a full file system, ``EROFS``, ``EACCES``, a
path that cannot be created) into one :class:`OutputNotWritableError` line such as
``<output>: no space left on device (about 12 MB needed, 1 MB free)``. Nothing half-written
looks complete: the manifest is written last, so a failed run leaves none, and re-running
the same command once space is freed resumes (finished shards are verified and kept).

A conversion into a URL stages in a local directory that holds only the shards in flight
(:mod:`scmf_shards.upload_stream`): :func:`staged_output` registers that directory with how
many shards it holds at once, and the checks above then ask for that share of the estimate
(:func:`staged_bytes`; :func:`estimate_bytes` returns an :class:`Estimate`, which knows its
number of cells) rather than the whole dataset's size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import OutputNotWritableError, ScmfError

__all__ = [
    "Estimate",
    "LowSpaceWarning",
    "OutputGuard",
    "OutputNotWritableError",
    "estimate_bytes",
    "free_bytes",
    "needed_bytes",
    "output_error",
    "staged_bytes",
    "staged_output",
    "warn_if_short",
]

SAMPLE_ROWS = 256  # rows read from each of the first SAMPLE_SOURCES inputs
SAMPLE_SOURCES = 8
_PER_CELL_BYTES = 8 + 64  # indptr entry + obs (codes, library size, cell id) per cell, roughly
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_CREATED = (errno.ENOTDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOENT, errno.ELOOP)
#: staging directories of conversions into URLs: absolute path -> (shards held at once, cells per shard)
_STAGED: dict[Path, tuple[int, int]] = {}


class LowSpaceWarning(UserWarning):
    """The estimated size of a conversion does not fit the free space of its output."""


def _mb(n: float) -> str:
    return f"{max(n, 0) / 1e6:,.0f}" if n >= 10e6 else f"{max(n, 0) / 1e6:.1f}"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what ``statvfs`` can be asked about)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes free for this user on the file system that holds (or would hold) ``path``."""
    return int(shutil.disk_usage(_existing(Path(path))).free)


def _sample(source: Any) -> tuple[int, float, bool] | None:
    """``(n_cells, estimated nnz, the sampled values are whole counts below 2**16)`` of one
    input from its first rows (None when unknown)."""
    n = int(getattr(source, "n_cells", 0) or 0)
    if n == 0 or getattr(source, "layout", "csr") == "csc":
        return None  # a CSC matrix's rows cost a pass over it: estimate from the others
    try:
        m = source.read_rows(0, min(n, SAMPLE_ROWS), ()).matrix
        values = np.asarray(m.data if hasattr(m, "nnz") else m)
        nnz = int(m.nnz) if hasattr(m, "nnz") else int(np.count_nonzero(values))
        small = bool(values.size == 0 or (np.all(values == np.trunc(values)) and values.min() >= 0
                                          and values.max() <= np.iinfo(np.uint16).max))
    except Exception:  # noqa: BLE001 -- an estimate only: the conversion reports real errors
        return None
    return n, nnz / max(m.shape[0], 1) * n, small


class Estimate(int):
    """An estimate of a conversion's shard bytes (an ``int``) that also knows the number of
    cells it covers (``n_cells``), so that a share of it can be taken per shard."""

    n_cells: int
    #: about how many bytes a one-pass conversion holds between its stages (the compact
    #: ``uint16`` forms of ``scatter.held_dtypes`` where the sample allows them)
    held: int

    def __new__(cls, value: int, n_cells: int = 0, held: int | None = None) -> Estimate:
        obj = super().__new__(cls, value)
        obj.n_cells = n_cells
        obj.held = int(value) if held is None else int(held)
        return obj


def estimate_bytes(sources: Sequence[Any], dtype: str, n_genes: int = 0) -> Estimate:
    """About how many bytes the shards of ``sources`` take: stored values (value + index)
    per cell, sampled from the first rows of the first inputs, plus per-cell overhead; and
    (``Estimate.held``) what a one-pass run holds of them, with the vocabulary's ``n_genes``
    ids (0: unknown)."""
    from scmf_shards.convert.scatter import held_dtypes

    sampled = [s for s in (_sample(src) for src in sources[:SAMPLE_SOURCES]) if s is not None]
    n_cells = sum(int(getattr(s, "n_cells", 0) or 0) for s in sources)
    per_cell = (sum(nnz for _, nnz, _ in sampled) / max(sum(n for n, _, _ in sampled), 1)) if sampled else 0.0
    entry = np.dtype(dtype).itemsize + 4
    values, indices = held_dtypes(n_genes, dtype, bool(sampled) and all(small for _, _, small in sampled))
    held = int(n_cells * (per_cell * (values.itemsize + indices.itemsize) + _PER_CELL_BYTES))
    return Estimate(int(n_cells * (per_cell * entry + _PER_CELL_BYTES)), n_cells, held)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike[str], shards_held: int | None, shard_cells: int | None) -> Iterator[None]:
    """While inside, ``out`` is the staging directory of a conversion into a URL that holds
    at most ``shards_held`` shards of ``shard_cells`` cells at once (None: every shard)."""
    key = Path(out).absolute()
    if shards_held is not None and shard_cells:
        _STAGED[key] = (shards_held, shard_cells)
    try:
        yield
    finally:
        _STAGED.pop(key, None)


def staged_bytes(out: str | os.PathLike[str], shards: int) -> int:
    """Bytes of shards that ``out`` holds at once: ``shards`` (the whole estimate), or for a
    staging directory registered by :func:`staged_output` the share of its shards in flight
    (needs an :class:`Estimate`, which knows its cells)."""
    spec = _STAGED.get(Path(out).absolute())
    n_cells = getattr(shards, "n_cells", 0)
    if spec is None or not n_cells:
        return int(shards)
    held, cells = spec
    return int(int(shards) * min(1.0, held * cells / n_cells))


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev
    except OSError:
        return True


def _buckets_on_disk(out: Path) -> bool:
    """Whether this conversion writes scratch buckets (a run through buckets has at least
    one bucket directory under the root its plan names; a one-pass run has none)."""
    from scmf_shards.convert.workspace import Workspace

    try:
        root = (Workspace.at(out).read_plan() or {}).get("bucket_root")
        return bool(root) and any(Path(root).glob("c*"))
    except (OSError, ValueError):
        return False


def needed_bytes(out: Path, scratch: Path | None, shards: int, buckets: bool = False,
                 held: int | None = None) -> dict[Path, int]:
    """Bytes needed per location: the shards in ``out`` (``held`` of them at once when
    given: a staging directory) and, with ``buckets``, the scratch buckets (about as large
    as all shards) in ``scratch`` (``out`` itself when None or on the same file system). A
    run that holds its data in memory (``--memory-limit``) writes no buckets."""
    held = shards if held is None else held
    if not buckets:
        return {out: held}
    if scratch is None or _same_device(out, scratch):
        return {out: held + shards}
    return {out: held, scratch: shards}


def warn_if_short(out: Path, scratch: Path | None, shards: int, held: int | None = None) -> None:
    """Warn (:class:`LowSpaceWarning`) when the shards' estimated size (``held``: of the
    shards held at once, for a staging directory) does not fit the free space of ``out``,
    or shards and buckets together do not fit (bucket runs need both)."""
    held = shards if held is None else held
    free = free_bytes(out)
    both = needed_bytes(out, scratch, shards, buckets=True, held=held)
    what = " for the shards staged at once before upload" if held != shards else ""
    if held > free:
        message = f"about {_mb(held)} MB needed{what} but only {_mb(free)} MB free"
    elif both[out] > free:
        message = (f"about {_mb(held)} MB needed{what}, {_mb(both[out])} MB if the data does not fit "
                   f"--memory-limit and goes through scratch buckets, but only {_mb(free)} MB free")
    else:
        for where, need in both.items():  # a --scratch-dir on another file system
            if where != out and need > free_bytes(where):
                warnings.warn(f"{where}: about {_mb(need)} MB of scratch buckets may be needed but only "
                              f"{_mb(free_bytes(where))} MB free", LowSpaceWarning, stacklevel=3)
        return
    warnings.warn(
        f"{out}: {message}; the conversion will likely stop with 'no space left on device' "
        "(free space, or use --scratch-dir for the temporary buckets)", LowSpaceWarning, stacklevel=3)


def _full(path: Path, need: int) -> bool:
    """Whether the file system of ``path`` is (nearly) full: a short write without errno."""
    try:
        return free_bytes(path) < max(1 << 20, need // 100)
    except OSError:
        return False


def output_error(exc: OSError, out: Path, scratch: Path | None, shards: int | None,
                 creating: bool = False) -> ScmfError | None:
    """The one-line error for an ``OSError`` raised while creating (``creating``) or writing
    a conversion into ``out`` (``None`` when it is not a problem of the output's file system)."""
    if isinstance(exc, ScmfError):
        return None
    needs = needed_bytes(out, scratch, shards or 0, buckets=_buckets_on_disk(out),
                         held=staged_bytes(out, shards or 0))
    where = [p for p in needs if exc.filename and str(exc.filename).startswith(str(p))] or list(needs)
    code = exc.errno
    if code in _NO_SPACE or (code is None and any(_full(p, needs[p]) for p in where)):
        p = next((p for p in where if code is not None or _full(p, needs[p])), where[0])
        about = f"about {_mb(needs[p])} MB needed, " if shards else ""
        quota = " (disk quota exceeded)" if code == errno.EDQUOT else ""
        return OutputNotWritableError(
            f"{p}: no space left on device{quota} ({about}{_mb(free_bytes(p))} MB free); free space "
            "and re-run the same command to resume"
        )
    target = exc.filename or where[0]
    if code == errno.EROFS:
        return OutputNotWritableError(f"{out}: read-only file system (cannot write {target}); choose another --output")
    if code in (errno.EACCES, errno.EPERM):
        return OutputNotWritableError(f"{out}: permission denied (cannot write {target}); choose another --output")
    if creating and code in _NOT_CREATED:
        return OutputNotWritableError(f"{out}: cannot be created ({exc.strerror}: {target}); choose another --output")
    return None


class OutputGuard:
    """Context manager around a conversion's writes into ``out``: an ``OSError`` of the
    output's (or scratch's) file system leaves it as :class:`OutputNotWritableError`;
    :meth:`warn` runs the free-space check. ``shards``: the estimate of the shards' bytes."""

    def __init__(self, out: Path, scratch: str | os.PathLike[str] | None, shards: int | None) -> None:
        self.out = Path(out)
        self.scratch = Path(scratch) if scratch is not None else None
        self.shards = shards

    def __enter__(self) -> OutputGuard:
        return self

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, OSError):
            error = output_error(exc, self.out, self.scratch, self.shards, creating=not self.out.is_dir())
            if error is not None:
                raise error from None
        return False

    def warn(self) -> None:
        """Warn when the estimate does not fit the free space (before anything is written)."""
        if self.shards:
            warn_if_short(self.out, self.scratch, self.shards, staged_bytes(self.out, self.shards))
