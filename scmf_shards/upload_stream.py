"""Uploading shards while the conversion writes them (the streaming half of
:class:`scmf_shards.upload.BucketTarget`).

A conversion into a URL writes its shards into a local staging directory; the driver calls
:meth:`ShardStreamer.on_shard` right after each shard is written (``convert_local(...,
on_shard=...)``), which hands the shard to one background uploader thread through a queue
of :data:`UPLOAD_AHEAD` places. When the queue is full the converter waits, so staging holds
only the shards in flight (being gathered, queued, being uploaded), never the whole dataset.

For each shard the uploader:

1. puts ``vocab.json`` first, before the first shard (from the conversion's workspace);
2. checks the staged shard against its entry (:func:`~scmf_loader.format.integrity.
   check_shard`, every checksum), uploads it, lists and reads back every stored object
   (sizes and sha256): :meth:`BucketTarget.upload_shard`;
3. writes a *record* beside the upload marker, ``.scmf-upload.d/NNNNNN.json``: the shard's
   manifest entry and the size and sha256 of each of its files (removed with the marker
   once the manifest is stored);
4. deletes the staged copy.

**Resume.** :meth:`ShardStreamer.stored_shard` (the driver's ``stored_shard`` hook) returns
the entry of a shard whose record exists and whose stored objects pass the same test as the
upload's skip rule (the recorded names and sizes in the listing, every byte read back to the
recorded sha256); the driver then skips that shard's gather. A shard stored but not yet
recorded is gathered again and, found intact in the store, not put again.

**Errors.** The first upload error stops the uploader; the next ``on_shard`` (or
:meth:`ShardStreamer.finish`) raises it, which stops the conversion with that one error
naming the URL. The manifest is put only by :meth:`BucketTarget.publish`, after every shard
is confirmed, so a failed run leaves no manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scmf_loader.format import ShardEntry
from scmf_loader.format.shard import shard_relpath
from scmf_shards import faults

if TYPE_CHECKING:
    from scmf_shards.upload import BucketTarget

__all__ = ["RECORDS_DIR", "UPLOAD_AHEAD", "ShardStreamer", "in_flight"]

#: finished shards that may wait for the uploader (the converter waits beyond that)
UPLOAD_AHEAD = 2
#: folder beside the upload marker holding one record per confirmed shard
RECORDS_DIR = ".scmf-upload.d"
_POLL_S = 0.2
_STOP = None


def in_flight(workers: int, ahead: int = UPLOAD_AHEAD) -> int:
    """The most shards a streamed conversion with ``workers`` gather threads holds in its
    staging directory at once: one being written per thread, ``ahead`` queued, one being
    uploaded."""
    return workers + ahead + 1


class ShardStreamer:
    """Uploads the shards of a conversion into ``target`` as they are written into
    ``staging`` (see the module docstring). Use as a context manager around the
    conversion; call :meth:`finish` once it returned."""

    def __init__(self, target: BucketTarget, staging: Path, dataset_id: str, ahead: int = UPLOAD_AHEAD) -> None:
        self.target = target
        self.staging = Path(staging)
        self.dataset_id = dataset_id
        self._queue: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue(maxsize=max(ahead, 1))
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._checked: dict[int, dict[str, Any] | None] = {}
        self._records: set[str] | None = None
        #: shard index -> manifest entry (dict) of every shard confirmed in the store
        self.confirmed: dict[int, dict[str, Any]] = {}
        #: the bytes of ``vocab.json`` as put (and read back) by this run, or None
        self.vocab: bytes | None = None

    def __enter__(self) -> ShardStreamer:
        self._thread = threading.Thread(target=self._work, name="scmf-upload", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        if self._thread is None:
            return
        if exc is not None:  # the conversion failed: queued shards are not uploaded
            self._cancel.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
        self._thread.join()
        self._thread = None

    # ---- the driver's hooks --------------------------------------------------------------
    def on_shard(self, shard: int, entry: dict[str, Any]) -> None:
        """Queue shard ``shard`` (just written into staging) for upload; waits while
        :data:`UPLOAD_AHEAD` shards are queued; raises the uploader's error."""
        self._put((shard, entry))

    def finish(self) -> None:
        """Wait until every queued shard is uploaded; raise the uploader's error if any."""
        self._put(_STOP)
        assert self._thread is not None
        self._thread.join()
        self._thread = None
        self._raise()

    def stored_shard(self, shard: int) -> dict[str, Any] | None:
        """The manifest entry of shard ``shard`` when a record of this dataset says it was
        uploaded and its stored objects pass the upload's own check, else None (memoized:
        each stored shard is read back once per run)."""
        with self._lock:
            if shard not in self._checked:
                self._checked[shard] = self._check_stored(shard)
            found = self._checked[shard]
        if found is not None:
            self.confirmed[shard] = found
        return found

    # ---- the uploader thread -------------------------------------------------------------
    def _put(self, item: tuple[int, dict[str, Any]] | None) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._cancel.is_set():
                continue
            try:
                self._upload(*item)
            except BaseException as exc:  # noqa: BLE001 -- handed to the converter's thread
                self._error = exc
                self._cancel.set()

    def _upload(self, shard: int, entry_dict: dict[str, Any]) -> None:
        if self.vocab is None:
            self.put_vocab(self._workspace_vocab())
        entry = ShardEntry.from_dict(entry_dict, shard)
        files = self.target.upload_shard(self.staging, shard, entry)
        self._write_record(shard, entry_dict, files)
        faults.fault_point("upload:record")
        self.confirmed[shard] = entry_dict
        self._drop_staged(entry)

    def _workspace_vocab(self) -> Path:
        from scmf_shards.convert.workspace import Workspace

        return Workspace.at(self.staging).vocab

    def put_vocab(self, path: Path) -> None:
        """Put ``vocab.json`` from ``path`` (read back), unless these bytes are already put."""
        from scmf_loader.format import VOCAB_NAME

        data = path.read_bytes()
        if data != self.vocab:
            self.target.put_bytes(data, VOCAB_NAME, path)
            self.vocab = data
            faults.fault_point("upload:vocab")

    def _drop_staged(self, entry: ShardEntry) -> None:
        """Delete the staged copy: renamed first (a killed run never leaves a half-deleted
        shard under its own name), to a temporary name the converter's cleanup knows."""
        local = self.staging / entry.path
        doomed = local.with_name(f"{local.name}.tmp-uploaded-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(local, doomed)
            faults.fault_point("upload:staged-renamed")
        shutil.rmtree(doomed, ignore_errors=True)

    # ---- records ---------------------------------------------------------------------------
    def _record_path(self, shard: int) -> str:
        return f"{self.target.root}/{RECORDS_DIR}/{shard:06d}.json"

    def _write_record(self, shard: int, entry: dict[str, Any], files: dict[str, tuple[int, str]]) -> None:
        doc = {"dataset_id": self.dataset_id, "entry": entry,
               "files": {rel: [size, digest] for rel, (size, digest) in sorted(files.items())}}
        data = json.dumps(doc, sort_keys=True).encode()
        path = self._record_path(shard)
        self.target.call(f"recording {entry['path']}", lambda: self.target.fs.pipe_file(path, data))

    def _record_names(self) -> set[str]:
        if self._records is None:
            folder = f"{self.target.root}/{RECORDS_DIR}"
            self.target.fs.invalidate_cache(folder)
            try:
                listing = self.target.call("listing the upload records", lambda: self.target.fs.ls(folder, detail=False))
            except FileNotFoundError:
                listing = []
            self._records = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in listing}
        return self._records

    def _check_stored(self, shard: int) -> dict[str, Any] | None:
        if f"{shard:06d}.json" not in self._record_names():
            return None
        try:
            doc = self.target.read_json(f"{RECORDS_DIR}/{shard:06d}.json")
            entry = doc["entry"] if isinstance(doc, dict) and doc.get("dataset_id") == self.dataset_id else None
            files = {str(r): (int(v[0]), str(v[1])) for r, v in doc["files"].items()} if entry else {}
        except (FileNotFoundError, KeyError, TypeError, ValueError, IndexError):
            return None
        if entry is None or entry.get("path") != shard_relpath(shard) or not files:
            return None
        remote = f"{self.target.root}/{entry['path']}"
        if not self.target.matches(remote, self.target.stored(remote), files):
            return None
        self.target.skipped.append(entry["path"])
        return dict(entry)
