"""The output directory of a conversion: its lock, what to do with what is already there
(refuse, resume, replace) and the leftovers of killed runs. Whether a finished shard can be
reused is the format's one integrity check (:func:`scmf_loader.format.integrity.shard_ok`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from scmf_loader.errors import DatasetExistsError, DatasetLockedError, ManifestError, ScmfError
from scmf_loader.format import (
    MANIFEST_NAME,
    SHARDS_DIR,
    VOCAB_NAME,
    Manifest,
    read_manifest,
)
from scmf_shards.convert.workspace import BUCKET_PREFIX, TMP_DIR, Workspace

__all__ = ["LOCK_NAME", "locked", "prepare_output", "remove_partial_shards"]

LOCK_NAME = ".scmf-lock"


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.scmf-lock`` (created with ``out``) while inside."""
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


def prepare_output(out: Path, dataset_id: str, overwrite: bool) -> Manifest | None:
    """Decide what to do with an existing output directory (called under its lock).

    Returns the existing manifest when the very same dataset is already complete there;
    None when the conversion should run (into an empty directory, or resuming an
    interrupted run of the same dataset). Raises :class:`DatasetExistsError` for anything
    else unless ``overwrite`` (which only ever deletes scmf datasets and their scratch)."""
    entries = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if not entries:
        return None
    if MANIFEST_NAME in entries:
        return _existing_dataset(out, entries, dataset_id, overwrite)
    if TMP_DIR not in entries:
        raise DatasetExistsError(
            f"{out}: exists and is not empty, and is not an scmf dataset; choose an empty or "
            "new --output (--overwrite only replaces scmf datasets)"
        )
    if _resumable(out, dataset_id, overwrite):
        _remove_leftovers(out, entries)
        return None
    _clear(out, entries)
    return None


def _existing_dataset(out: Path, entries: set[str], dataset_id: str, overwrite: bool) -> Manifest | None:
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
    _clear(out, entries)
    return None


def _resumable(out: Path, dataset_id: str, overwrite: bool) -> bool:
    """Whether the scratch directory (no manifest yet) is an interrupted run of this very
    dataset. A scratch directory without a plan was killed before any work: discarded."""
    ws = Workspace.at(out)
    if not ws.plan.is_file():  # the plan is written first
        return False
    plan = ws.read_plan()
    same = plan is not None and plan.get("dataset_id") == dataset_id
    if same and not overwrite:
        return True
    if not overwrite:
        raise DatasetExistsError(
            f"{out}: holds an unfinished conversion of a different dataset; "
            "use --overwrite to discard it or choose another --output"
        )
    return False


def _clear(out: Path, entries: set[str]) -> None:
    """Delete everything in ``out`` but its lock, and buckets kept in a --scratch-dir."""
    _remove_external_buckets(out)
    for name in entries:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _remove_external_buckets(out: Path) -> None:
    """Delete the buckets a conversion into ``out`` kept in a ``--scratch-dir`` (named in its
    plan); buckets inside ``out`` go with its scratch directory."""
    plan = Workspace.at(out).read_plan() or {}
    root = plan.get("bucket_root")
    if root and Path(root).name.startswith(BUCKET_PREFIX) and not Path(root).is_relative_to(out):
        shutil.rmtree(root, ignore_errors=True)


def remove_partial_shards(out: Path) -> None:
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
