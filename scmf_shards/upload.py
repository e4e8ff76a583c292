"""Converting straight to an object store: ``--output s3://bucket/prefix`` (any fsspec URL).

A conversion into a URL runs as an ordinary conversion into a local *staging* directory
whose shards are uploaded as they are written (:class:`BucketTarget`, streamed by
:class:`scmf_shards.upload_stream.ShardStreamer`):

- **Where it stages.** ``<--scratch-dir or the system temp>/scmf-staging-<uid>/<hash of
  (URL, dataset_id)>``: the same on a re-run, so a killed conversion resumes its local work
  with the converter's own resume rules; deleted once the upload is complete. It holds only
  the shards in flight (each staged copy is deleted once stored and read back), plus the
  scratch buckets of a conversion whose data does not fit ``--memory-limit``.
- **Order.** ``vocab.json`` first, then each shard as soon as it is written, ``manifest.json``
  last, once every shard is confirmed: a reader never sees a manifest before every shard it
  lists is in the store.
- **Checked.** Each shard is checked against its manifest entry before it leaves (the one
  integrity checker, :func:`scmf_loader.format.integrity.check_shard`), and after upload
  every object is listed and read back: the stored files are exactly the shard's files,
  byte for byte (sha256). A shard already in the store that passes the same test is not
  uploaded again, and one recorded as uploaded (``.scmf-upload.d/``) is not even gathered
  again: that is how a killed conversion resumes against the store.
- **What is there already.** The URL's dataset with the same ``dataset_id`` is the result
  (nothing to do). Another dataset, or an unfinished upload of another dataset (marked by
  :data:`UPLOAD_MARKER`, removed after the manifest), is refused unless ``overwrite``;
  anything that is not an scmf dataset is never replaced.
- **Credentials** come from ``storage_options`` (Python API) or the store's usual
  environment and config files; neither reaches a manifest, the marker or a message
  (messages name the URL with any ``user:password@`` part removed).

fsspec and the protocol's package are imported only when a URL is written or read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scmf_loader.errors import (
    ChecksumMismatchError,
    ConfigurationError,
    DatasetExistsError,
    OutputNotWritableError,
    ScmfError,
)
from scmf_loader.format import MANIFEST_NAME, VOCAB_NAME, Manifest, ShardEntry
from scmf_loader.format.integrity import check_shard
from scmf_shards import faults

__all__ = [
    "STAGING_PREFIX",
    "UPLOAD_MARKER",
    "BucketTarget",
    "is_output_url",
    "output_target",
    "redact",
    "refuse_url",
    "staging_dir",
    "url_info",
    "verify_url",
]

#: object beside the dataset while an upload is unfinished: ``{"dataset_id": ...}``
UPLOAD_MARKER = ".scmf-upload.json"
STAGING_PREFIX = "scmf-staging-"
#: protocols whose first path component is a bucket that must exist
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
_READ_ONLY = {"http", "https", "ftp", "github", "zip", "tar", "hf"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_BLOCK = 8 << 20


def is_output_url(value: Any) -> bool:
    """Whether ``value`` is a URL that is not a local ``file://`` path."""
    return isinstance(value, str) and _URL.match(value) is not None and not value.startswith("file://")


def redact(url: str) -> str:
    """``url`` with any ``user[:password]@`` part replaced by ``***@`` (for messages)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@", r"\1***@", url)


def refuse_url(option: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigurationError` naming ``option`` and the URL when ``value`` is a
    URL that the option cannot honour (never turned into a local path)."""
    if is_output_url(value):
        raise ConfigurationError(f"{option} {redact(str(value))}: {why}; give a local path")


def staging_dir(url: str, dataset_id: str, scratch_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local directory a conversion into ``url`` is staged in: under ``scratch_dir`` or
    the system temp, in a per-user directory (mode 0700), named by a hash of the URL and the
    dataset id, so a re-run finds it."""
    parent = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
    base = parent / f"{STAGING_PREFIX}{os.getuid()}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = base.lstat().st_uid
    except OSError as exc:
        raise OutputNotWritableError(f"{base}: cannot create the staging directory of {redact(url)} "
                                     f"({exc.strerror or exc}); give --scratch-dir a writable local directory") from None
    if owner != os.getuid() or base.is_symlink():
        raise OutputNotWritableError(f"{base}: the staging directory belongs to another user; give --scratch-dir")
    key = hashlib.sha256(f"{url.rstrip('/')}\0{dataset_id}".encode()).hexdigest()[:20]
    return base / key


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _local_files(directory: Path) -> dict[str, tuple[int, str]]:
    """Every regular file under ``directory``: relative posix path -> (size, sha256)."""
    out = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            f = Path(dirpath) / name
            out[f.relative_to(directory).as_posix()] = (f.stat().st_size, _sha256_file(f))
    return out


def _wrap(url: str, what: str, exc: BaseException) -> ScmfError:
    """A store error as one line naming the URL (never the credentials)."""
    if isinstance(exc, ScmfError):
        return exc
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if isinstance(exc, PermissionError) or "Credential" in type(exc).__name__ or "AccessDenied" in reason:
        return OutputNotWritableError(f"{url}: {what}: access refused ({reason}); check the credentials "
                                      "of the environment or storage_options")
    return OutputNotWritableError(f"{url}: {what} failed ({type(exc).__name__}: {reason})")


class BucketTarget:
    """The object-store side of a conversion into ``url`` (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, overwrite: bool = False,
                 scratch_dir: str | None = None, quiet: bool = True, in_flight: int | None = None,
                 shard_cells: int | None = None) -> None:
        from scmf_loader.streaming.remote import filesystem

        self.url = url.rstrip("/")
        self.shown = redact(self.url)
        scheme = self.url.split("://", 1)[0].lower()
        if scheme in _READ_ONLY:
            raise ConfigurationError(f"--output {self.shown}: {scheme}:// is read-only; "
                                     "write to s3://, gs://, az://, memory:// or a local path")
        self.overwrite = overwrite
        self.scratch_dir = scratch_dir
        self.quiet = quiet
        #: the most shards staged at once (None: all of them, as with ``--scheduler``), and
        #: the cells per shard: the staging directory's share of the disk-space estimate
        self.in_flight = in_flight
        self.shard_cells = shard_cells
        self.fs, self.root = filesystem(self.url, storage_options)
        self.uploaded: list[str] = []  # relative paths of the shards this run put
        self.skipped: list[str] = []  # ... and of those already in the store

    # ---- store access, retried ------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        from scmf_loader.streaming.remote import with_retries

        try:
            return with_retries(fn, self.shown, what)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise _wrap(self.shown, what, exc) from None

    def _names(self) -> set[str]:
        """Names directly under the URL (empty when nothing is stored there)."""
        try:
            entries = self.call("listing the output", lambda: self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return set()
        return {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""}

    def check_reachable(self) -> None:
        """Refuse, before any work, a bucket that does not exist or refused access."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        bucket = self.root.split("/", 1)[0]
        if protocol in _BUCKET_PROTOCOLS:
            if not bucket or "/" not in self.root.strip("/"):
                raise ConfigurationError(f"--output {self.shown}: give a prefix inside the bucket "
                                         "(s3://bucket/name), not the bucket itself")
            try:
                found = self.call("looking up the bucket", lambda: self.fs.exists(bucket))
            except FileNotFoundError:
                found = False
            if not found:
                raise OutputNotWritableError(
                    f"{self.shown}: bucket {bucket!r} does not exist (or these credentials cannot see "
                    "it); create it first or fix --output")
        self._names()  # a listing: refused access is said now, not after the conversion

    # ---- what is there already -------------------------------------------------------------
    def read_json(self, name: str) -> Any:
        raw = self.call(f"reading {name}", lambda: self.fs.cat_file(f"{self.root}/{name}"))
        try:
            return json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None

    def prepare(self, dataset_id: str) -> Manifest | None:
        """Decide what to do with what the URL holds (as :func:`scmf_shards.convert.output.
        prepare_output` does for a directory): the stored manifest when it is this very
        dataset; None when the upload should run (the marker then written)."""
        from scmf_loader.format import manifest_from_dict

        self.fs.invalidate_cache(self.root)
        names = self._names()
        if MANIFEST_NAME in names:
            doc = self.read_json(MANIFEST_NAME)
            try:
                existing = manifest_from_dict(doc) if isinstance(doc, dict) else None
            except ScmfError:
                existing = None
            if existing is not None and existing.dataset_id == dataset_id and not self.overwrite:
                if UPLOAD_MARKER in names:  # killed between the manifest and the marker's removal
                    from scmf_shards.upload_stream import RECORDS_DIR

                    self._remove_tree(RECORDS_DIR)
                    self._remove(UPLOAD_MARKER)
                return existing
            if not self.overwrite:
                found = existing.dataset_id if existing else "an unreadable manifest"
                raise DatasetExistsError(f"{self.shown}: already holds a different dataset ({found}); expected "
                                         f"{dataset_id}. Use --overwrite to replace it or choose another --output")
            self._clear()
        elif UPLOAD_MARKER in names:
            marker = self.read_json(UPLOAD_MARKER)
            same = isinstance(marker, dict) and marker.get("dataset_id") == dataset_id
            if not same and not self.overwrite:
                raise DatasetExistsError(f"{self.shown}: holds an unfinished upload of a different dataset; "
                                         "use --overwrite to discard it or choose another --output")
            if not same:
                self._clear()
        elif names:
            raise DatasetExistsError(f"{self.shown}: exists and is not empty, and is not an scmf dataset; choose "
                                     "an empty or new --output (--overwrite only replaces scmf datasets)")
        marker_bytes = json.dumps({"dataset_id": dataset_id}).encode()
        self.call("writing the upload marker",
                   lambda: self.fs.pipe_file(f"{self.root}/{UPLOAD_MARKER}", marker_bytes))
        return None

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.call(f"removing {name}", lambda: self.fs.rm_file(f"{self.root}/{name}"))

    def _clear(self) -> None:
        """Delete the scmf dataset at the URL: its manifest first (no reader sees a dataset
        whose shards are going), then everything under the prefix."""
        self._remove(MANIFEST_NAME)
        with contextlib.suppress(FileNotFoundError):
            self.call("deleting the old dataset", lambda: self.fs.rm(self.root, recursive=True))
        self.fs.invalidate_cache(self.root)

    # ---- the conversion ---------------------------------------------------------------------
    def run(self, dataset_id: str, convert_local: Callable[..., Manifest]) -> Manifest:
        """Convert into the staging directory with ``convert_local(path, on_shard=...,
        stored_shard=...)`` (a local conversion, resumable there) while a
        :class:`~scmf_shards.upload_stream.ShardStreamer` uploads each shard as it is
        written; then :meth:`publish` and delete the staging directory."""
        from scmf_shards.convert.diskspace import staged_output
        from scmf_shards.convert.output import locked
        from scmf_shards.upload_stream import ShardStreamer

        existing = self.prepare(dataset_id)
        staging = staging_dir(self.url, dataset_id, self.scratch_dir)
        if existing is not None:  # done (a run killed after its manifest left its staging)
            shutil.rmtree(staging, ignore_errors=True)
            return existing
        with staged_output(staging, self.in_flight, self.shard_cells), \
                ShardStreamer(self, staging, dataset_id) as streamer:
            manifest = convert_local(staging, on_shard=streamer.on_shard, stored_shard=streamer.stored_shard)
            streamer.finish()
        with locked(staging):
            self.publish(staging, manifest, streamer)
        shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def publish(self, staging: Path, manifest: Manifest, streamer: Any) -> None:
        """Finish the upload of the dataset converted in ``staging``: the vocabulary (unless
        the streamer put these bytes), every shard the streamer did not confirm (from
        staging, or found intact in the store), then the manifest last; then the upload
        records and the marker go."""
        from scmf_shards.upload_stream import RECORDS_DIR

        streamer.put_vocab(staging / VOCAB_NAME)
        for i, entry in enumerate(manifest.shards):
            if i in streamer.confirmed:
                continue
            if (staging / entry.path).is_dir():
                self.upload_shard(staging, i, entry)
            elif streamer.stored_shard(i) is None:
                raise OutputNotWritableError(
                    f"{self.shown}/{entry.path}: neither stored intact nor staged in {staging}; "
                    f"delete {staging} and re-run the same command")
        self.put_bytes((staging / MANIFEST_NAME).read_bytes(), MANIFEST_NAME, staging / MANIFEST_NAME)  # last
        faults.fault_point("upload:manifest")
        self._remove_tree(RECORDS_DIR)
        self._remove(UPLOAD_MARKER)

    def _remove_tree(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.call(f"removing {name}", lambda: self.fs.rm(f"{self.root}/{name}", recursive=True))

    def put_bytes(self, data: bytes, rel: str, local: Path) -> None:
        """Put one small object ``rel`` (the bytes of ``local``) and read it back."""
        target = f"{self.root}/{rel}"
        self.call(f"uploading {rel}", lambda: self.fs.pipe_file(target, data))
        if bytes(self.call(f"reading back {rel}", lambda: self.fs.cat_file(target))) != data:
            raise ChecksumMismatchError(f"{self.shown}/{rel}: the stored copy differs from {local} after upload")

    def upload_shard(self, staging: Path, i: int, entry: ShardEntry) -> dict[str, tuple[int, str]]:
        """Check the staged shard ``i`` against its entry, put it (unless already stored
        intact), list and read it back; its files (relative path -> size, sha256)."""
        try:
            check_shard(staging, entry, "checksum", index=i)
        except ScmfError as exc:
            raise type(exc)(f"{exc} (staging copy of {self.shown}; delete {staging} and re-run)") from None
        local = staging / entry.path
        files = _local_files(local)
        remote = f"{self.root}/{entry.path}"
        stored = self.stored(remote)
        if stored and self.matches(remote, stored, files):
            self.skipped.append(entry.path)
            return files
        if stored:  # a partial or different copy: replaced as a whole
            self.call(f"clearing {entry.path}", lambda: self.fs.rm(remote, recursive=True))
        rels = sorted(files)
        self.call(f"uploading {entry.path}", lambda: self.fs.put(
            [str(local / r) for r in rels], [f"{remote}/{r}" for r in rels]))
        self.fs.invalidate_cache(remote)
        if not self.matches(remote, self.stored(remote), files):
            raise ChecksumMismatchError(f"{self.shown}/{entry.path}: the stored shard differs from the local "
                                        "one after upload (listing, sizes or sha256); re-run to upload it again")
        self.uploaded.append(entry.path)
        faults.fault_point("upload:shard")
        return files

    def stored(self, remote: str) -> dict[str, int]:
        """The files stored under ``remote``: relative path -> size."""
        try:
            listing = self.call("listing a shard", lambda: self.fs.find(remote, detail=True))
        except FileNotFoundError:
            return {}
        return {p[len(remote):].lstrip("/"): int(info.get("size") or 0) for p, info in listing.items()
                if info.get("type", "file") != "directory" and p.startswith(remote)}

    def matches(self, remote: str, stored: dict[str, int], files: dict[str, tuple[int, str]]) -> bool:
        """Whether the stored files are exactly ``files``: same names and sizes (listing),
        then the same sha256 (every byte read back, streamed)."""
        if stored != {r: size for r, (size, _) in files.items()}:
            return False
        return all(self._remote_sha256(f"{remote}/{r}") == digest for r, (_, digest) in files.items())

    def _remote_sha256(self, path: str) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            with self.fs.open(path, "rb", block_size=_BLOCK) as f:
                while block := f.read(_BLOCK):
                    h.update(block)
            return h.hexdigest()

        return str(self.call("reading back a shard", digest))


def output_target(output: Any, options: Any, storage_options: dict[str, Any] | None = None) -> BucketTarget | None:
    """The :class:`BucketTarget` of a conversion's ``output`` when it is a URL (checked
    now: the bucket exists, access works), None for a local path. A ``--scratch-dir`` URL
    is refused (scratch is local)."""
    refuse_url("--scratch-dir", getattr(options, "scratch_dir", None),
               "scratch space must be a local (or shared) file system")
    if not is_output_url(os.fspath(output) if isinstance(output, os.PathLike) else output):
        return None
    from scmf_shards.upload_stream import in_flight

    streamed = getattr(options, "scheduler", None) is None  # a scheduler hands shards over after its gather stage
    target = BucketTarget(str(output), storage_options, overwrite=options.overwrite,
                          scratch_dir=options.scratch_dir, quiet=options.quiet,
                          in_flight=in_flight(options.workers) if streamed else None,
                          shard_cells=getattr(options, "shard_size", None))
    target.check_reachable()
    return target


# ---- verify / info on URLs ----------------------------------------------------------------
def _open(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str, Manifest, bytes, str]:
    from scmf_loader.streaming.remote import filesystem, read_remote_manifest

    url = url.rstrip("/")
    fs, root = filesystem(url, storage_options)
    manifest, raw = read_remote_manifest(fs, root, redact(url))
    return fs, root, manifest, raw, url


def url_info(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`scmf_shards.verify.dataset_info` of the dataset at ``url`` (reads only its
    manifest)."""
    from scmf_shards.verify import dataset_info

    _, _, _, raw, url = _open(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="scmf-info-") as tmp:
        (Path(tmp) / MANIFEST_NAME).write_bytes(raw)
        info = dataset_info(tmp)
    info["path"] = redact(url)
    return info


def verify_url(url: str, storage_options: dict[str, Any] | None = None,
               progress: Callable[[int], Any] | None = None) -> tuple[list[str], int]:
    """Check the dataset at ``url`` completely: the vocabulary, and every shard downloaded
    (into a fresh temporary cache, one or two shards at a time) through the streaming cache,
    which checks every size and checksum, then its full structure. Returns ``(problems,
    number of shards)``; one line per problem, naming the URL."""
    from scmf_loader.format.integrity import check_shard_structure, check_vocab
    from scmf_loader.streaming.cache import ShardCache, shard_nbytes

    fs, root, manifest, raw, url = _open(url, storage_options)
    shown = redact(url)
    problems: list[str] = []
    limit = 2 * max((shard_nbytes(e) for e in manifest.shards), default=0) + 1
    with tempfile.TemporaryDirectory(prefix="scmf-verify-") as tmp:
        cache = ShardCache(shown, manifest, raw, cache_dir=tmp, cache_limit=limit, storage_options=storage_options)
        cache.adopt(fs, root)
        try:
            cache.prepare(raw)
            check_vocab(cache.local, manifest)
        except ScmfError as exc:
            problems.append(str(exc).replace(str(cache.local), shown))
        for i in range(len(manifest.shards)):
            try:
                cache.ensure(i)
                try:
                    check_shard_structure(cache.local, manifest, i)
                finally:
                    cache.release(i)
            except ScmfError as exc:
                problems.append(str(exc).replace(str(cache.shard_path(i)), cache.shard_url(i)))
            if progress is not None:
                progress(1)
        cache.release_all()
    return problems, len(manifest.shards)
