"""The node-local shard cache of a remote dataset: fetch, verify, pin, evict.

``<cache_dir>/<key>/`` (``key``: a hash of the manifest's bytes, so two URLs holding the same
dataset share one copy and a changed dataset never reuses stale shards) is laid out as a
dataset directory: ``manifest.json``, ``vocab.json``, ``shards/NNNNNN.zarr``. Shards appear
in it one at a time, which is what lets :class:`~scmf_loader.store.DatasetStore` read them
with its ordinary memory maps.

- **Fetch.** A shard is listed (one request), its files downloaded (concurrently where the
  filesystem can) into a temporary directory, checked against the manifest with the one
  integrity checker (:func:`scmf_loader.format.integrity.check_shard`: every size and
  sha256 and the digest of its other files), and renamed into place. A transient failure
  is retried with exponential backoff; a download that fails its checksum is fetched once
  more, then refused with the error type of the problem, naming the URL.
- **Locks.** Every shard has a lock file. A reader holds it shared while it uses the shard
  (a *pin*); whoever downloads holds it exclusive, so the processes of a node (DataLoader
  workers, ranks) never download one shard twice at the same time: the others wait, then
  find it there. ``flock`` locks belong to an open file, so threads of one process
  exclude each other the same way.
- **Budget.** Before a download, least recently used shards that no reader pins are evicted
  (renamed away, then deleted: memory maps already open stay valid) until the new shard
  fits in ``cache_limit`` bytes (shards' array and metadata bytes, as the manifest lists
  them, downloads in flight included). If pinned shards alone fill the budget, the caller
  waits for readers to move on, then gets a :class:`~scmf_loader.streaming.errors.CacheError`.

POSIX only (``fcntl.flock``); ``cache_dir`` must be on a local filesystem.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from scmf_loader.errors import (
    ChecksumMismatchError,
    ConfigurationError,
    ScmfError,
    ShardNotFoundError,
    ShardSizeError,
    VocabularyError,
)
from scmf_loader.format import MANIFEST_NAME, Manifest, ShardEntry
from scmf_loader.format.integrity import check_shard
from scmf_loader.streaming.errors import CacheError
from scmf_loader.streaming.fs import DEFAULT_RETRIES, filesystem, with_retries

__all__ = ["DEFAULT_CACHE_LIMIT", "ShardCache", "default_cache_dir", "format_size", "parse_size", "shard_nbytes"]

DEFAULT_CACHE_LIMIT = "20GB"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_LOCAL_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def parse_size(value: int | str) -> int:
    """Bytes of ``value``: an integer, or a string such as ``"20GB"``, ``"512 MiB"``, ``"1.5e9"``."""
    if isinstance(value, bool):
        raise ConfigurationError(f"cache_limit must be a byte count or a size such as '20GB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if m is None or m.group(2) not in _UNITS:
            raise ConfigurationError(f"cache_limit must be a byte count or a size such as '20GB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n < 1:
        raise ConfigurationError(f"cache_limit must be positive, got {value!r}")
    return n


def format_size(n: int) -> str:
    """``n`` bytes for a message (``"1.5 GB"``)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def default_cache_dir() -> Path:
    """``$SCMF_CACHE_DIR``, else ``$XDG_CACHE_HOME/scmf``, else ``~/.cache/scmf``."""
    if os.environ.get("SCMF_CACHE_DIR"):
        return Path(os.environ["SCMF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scmf"


def shard_nbytes(entry: ShardEntry) -> int:
    """Bytes a shard takes in the cache: its arrays and (when listed) its other files."""
    other = entry.other_files.nbytes if entry.other_files is not None else 0
    return sum(a.nbytes for a in entry.arrays.values()) + other


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardCache:
    """The cache of one remote dataset on this node (see the module docstring). Picklable:
    open lock files and the filesystem object are per process and rebuilt on use."""

    def __init__(
        self, url: str, manifest: Manifest, manifest_bytes: bytes, *, cache_dir: Any = None,
        cache_limit: int | str = DEFAULT_CACHE_LIMIT, storage_options: dict[str, Any] | None = None,
        retries: int = DEFAULT_RETRIES, wait_s: float = 60.0,
    ) -> None:
        self.url = url
        self.manifest = manifest
        self.limit = parse_size(cache_limit)
        self.retries = retries
        self.wait_s = wait_s
        key = hashlib.sha256(manifest_bytes).hexdigest()[:24]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.local = self.cache_dir / key
        self._storage_options = dict(storage_options or {})
        self._sizes = [shard_nbytes(e) for e in manifest.shards]
        self._by_tmp = {(str(Path(e.path).parent), Path(e.path).name): i for i, e in enumerate(manifest.shards)}
        self._fs: Any = None
        self._fs_pid = -1
        self._root = ""
        self._pins: dict[int, list[int]] = {}  # shard -> [lock fd, count]
        self._mutex = threading.Lock()
        self._pid = os.getpid()

    # ---- setup ------------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made anew in each process (a forked copy is never used)."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._root = filesystem(self.url, self._storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def adopt(self, fs: Any, root: str) -> None:
        """Use ``fs`` (already made by the caller, in this process) for ``root``."""
        self._fs, self._root, self._fs_pid = fs, root, os.getpid()

    @property
    def root(self) -> str:
        """The dataset's path inside the filesystem."""
        _ = self.fs
        return self._root

    def prepare(self, manifest_bytes: bytes) -> None:
        """Create the cache directory, write the manifest and fetch the vocabulary; refuse
        an unwritable directory or a limit below the largest shard."""
        biggest = max(self._sizes, default=0)
        if biggest > self.limit:
            i = self._sizes.index(biggest)
            raise CacheError(
                f"{self.url}: cache_limit {format_size(self.limit)} is smaller than shard {i} "
                f"({format_size(biggest)}); raise cache_limit to at least a few shards"
            )
        try:
            (self.local / ".locks").mkdir(parents=True, exist_ok=True)
            manifest = self.local / MANIFEST_NAME
            if not manifest.is_file() or manifest.read_bytes() != manifest_bytes:
                _write_atomic(manifest, manifest_bytes)
        except OSError as exc:
            raise self._local_error(exc) from None
        self.fetch_vocab()

    def fetch_vocab(self, again: bool = False) -> Path:
        """The vocabulary file in the cache, downloaded when absent (or ``again``)."""
        rel = self.manifest.vocab["path"]
        path = self.local / rel
        if again or not path.is_file():
            try:
                data = with_retries(lambda: self.fs.cat_file(f"{self.root}/{rel}"), f"{self.url}/{rel}",
                                    "reading the vocabulary", self.retries)
            except FileNotFoundError:
                raise VocabularyError(
                    f"{self.url}/{rel}: missing: the manifest lists this vocabulary but the store "
                    "has no such file; the dataset is incomplete (re-upload or re-convert it)"
                ) from None
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(path, data)
            except OSError as exc:
                raise self._local_error(exc) from None
        return path

    def _local_error(self, exc: OSError) -> CacheError:
        return CacheError(
            f"{self.url}: the cache directory {self.cache_dir} cannot be written ({exc.strerror or exc}); "
            "pass cache_dir= a writable local directory with room (or set SCMF_CACHE_DIR)"
        )

    # ---- paths ------------------------------------------------------------------------
    def shard_path(self, i: int) -> Path:
        """Where shard ``i`` lives in the cache once fetched."""
        return self.local / self.manifest.shards[i].path

    def shard_url(self, i: int) -> str:
        """The URL of shard ``i``."""
        return f"{self.url}/{self.manifest.shards[i].path}"

    def _lock_path(self, i: int) -> Path:
        return self.local / ".locks" / f"{i}.lock"

    def _complete(self, i: int) -> bool:
        if not self.shard_path(i).is_dir():
            return False
        try:
            check_shard(self.local, self.manifest.shards[i], "size", index=i)
        except ScmfError:
            return False
        return True

    # ---- pins ---------------------------------------------------------------------------
    def ensure(self, i: int, *, patient: bool = True) -> Path | None:
        """Shard ``i``'s directory in the cache, fetched and verified first if absent, and
        pinned (kept from eviction) until a matching :meth:`release`. ``patient=False``
        (prefetching) gives up and returns ``None`` when the budget has no room now."""
        self._own()
        with self._mutex:
            pin = self._pins.get(i)
            if pin is not None:
                pin[1] += 1
                return self.shard_path(i)
        try:
            fd = os.open(self._lock_path(i), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise self._local_error(exc) from None
        try:
            path = self._acquire(i, fd, patient)
        except OSError as exc:
            os.close(fd)
            if not isinstance(exc, ScmfError) and exc.errno in _LOCAL_ERRNOS:
                raise self._local_error(exc) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        if path is None:
            os.close(fd)
            return None
        with self._mutex:
            pin = self._pins.get(i)
            if pin is not None:  # another thread pinned it meanwhile: keep one lock
                pin[1] += 1
                os.close(fd)
            else:
                self._pins[i] = [fd, 1]
        return path

    def release(self, i: int) -> None:
        """Undo one :meth:`ensure` of shard ``i``."""
        self._own()
        with self._mutex:
            pin = self._pins.get(i)
            if pin is None:
                return
            pin[1] -= 1
            if pin[1] > 0:
                return
            del self._pins[i]
        os.close(pin[0])  # drops the shared lock

    def _own(self) -> None:
        """In a forked child: forget the parent's pins (closing the inherited lock files,
        which would otherwise keep the parent's locks alive) and its mutex."""
        if self._pid != os.getpid():
            for fd, _ in self._pins.values():
                os.close(fd)
            self._pins, self._mutex, self._pid = {}, threading.Lock(), os.getpid()

    def release_all(self) -> None:
        """Drop every pin of this process."""
        self._own()
        with self._mutex:
            pins, self._pins = self._pins, {}
        for fd, _ in pins.values():
            os.close(fd)

    def _acquire(self, i: int, fd: int, patient: bool) -> Path | None:
        final = self.shard_path(i)
        while True:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held while pinned: nobody evicts the shard
            if self._complete(i):
                os.utime(fd)  # the LRU clock
                return final
            # Never wait for an exclusive lock on the shard's own lock file: pinned readers hold
            # it shared for as long as they read, so a waiting writer (and every thread queued
            # behind it) would block until they all let go. Downloaders queue on a lock of
            # their own, held only while one of them fetches.
            fcntl.flock(fd, fcntl.LOCK_UN)
            with self._download_lock(i):
                if self._complete(i):
                    continue
                # Exclusive while fetching: marks the temporary download as live (never
                # taken for a dead process's leftovers) and the shard as not evictable.
                # Waiting for it is safe here: an incomplete shard has no pinned readers,
                # only threads that hold it shared for one check.
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if not self._make_room(i, patient):
                        return None
                    self._download(i)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def _download_lock(self, i: int) -> Iterator[None]:
        """One downloader of shard ``i`` at a time on this node (threads and processes)."""
        fd = os.open(self._lock_path(i).with_suffix(".download"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- budget ---------------------------------------------------------------------------
    @contextmanager
    def _cache_lock(self) -> Iterator[None]:
        fd = os.open(self.local / ".locks" / "cache.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _try_exclusive(self, i: int) -> int | None:
        """An exclusive lock on shard ``i`` if no one holds it (the fd), else ``None``."""
        fd = os.open(self._lock_path(i), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _usage(self, skip: int) -> tuple[int, list[tuple[float, int]]]:
        """Bytes held (complete shards and downloads in flight) and the complete shards as
        eviction candidates ``(last use, shard)``; stale temporary directories removed."""
        used, candidates = 0, []
        for j in range(len(self._sizes)):
            if j != skip and self.shard_path(j).is_dir():
                used += self._sizes[j]
                try:
                    candidates.append((os.stat(self._lock_path(j)).st_mtime, j))
                except FileNotFoundError:
                    candidates.append((0.0, j))
        for parent in {str(Path(e.path).parent) for e in self.manifest.shards}:
            try:
                names = os.listdir(self.local / parent)
            except FileNotFoundError:
                continue
            for name in names:
                if not name.startswith(".") or (".tmp-" not in name and ".trash-" not in name):
                    continue
                j = self._by_tmp.get((parent, name[1:].split(".tmp-")[0]))
                if ".trash-" in name or j is None:
                    shutil.rmtree(self.local / parent / name, ignore_errors=True)
                    continue
                fd = self._try_exclusive(j)
                if fd is None:
                    used += self._sizes[j]  # a download in flight
                else:  # left by a process that died mid-download
                    shutil.rmtree(self.local / parent / name, ignore_errors=True)
                    os.close(fd)
        return used, sorted(candidates)

    def _trash(self, path: Path) -> None:
        trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{threading.get_ident()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _evict(self, j: int) -> bool:
        fd = self._try_exclusive(j)
        if fd is None:
            return False  # pinned by a reader somewhere on this node
        try:
            if not self.shard_path(j).is_dir():
                return False
            self._trash(self.shard_path(j))
            return True
        finally:
            os.close(fd)

    def _make_room(self, i: int, patient: bool) -> bool:
        need = self._sizes[i]
        deadline = time.monotonic() + (self.wait_s if patient else 0.0)
        delay = 0.05
        while True:
            with self._cache_lock():
                used, candidates = self._usage(skip=i)
                for _, j in candidates:
                    if used + need <= self.limit:
                        break
                    if self._evict(j):
                        used -= self._sizes[j]
                if used + need <= self.limit:
                    return True
            if time.monotonic() >= deadline:
                if not patient:
                    return False
                raise CacheError(
                    f"{self.url}: cache_limit {format_size(self.limit)} is too small: shard {i} "
                    f"needs {format_size(need)} but {format_size(used)} are held by shards that "
                    f"readers on this node are using (waited {self.wait_s:.0f} s); raise "
                    "cache_limit, or lower prefetch_shards or the number of workers"
                )
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    # ---- download -------------------------------------------------------------------------
    def _download(self, i: int) -> None:
        """Fetch shard ``i`` into a temporary directory, verify it, rename it into place;
        a copy failing its checks is fetched once more, then refused."""
        entry, url, final = self.manifest.shards[i], self.shard_url(i), self.shard_path(i)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # present but broken (failed the size check)
            self._trash(final)
        problem: ScmfError | None = None
        for _ in range(2):
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self._fetch_files(i, tmp)
                check_shard(self.local, replace(entry, path=tmp.relative_to(self.local).as_posix()),
                            "checksum", index=i)
            except (ShardSizeError, ChecksumMismatchError, ShardNotFoundError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                problem = type(exc)(str(exc).replace(str(tmp), url))
                continue
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.replace(tmp, final)
            return
        assert problem is not None
        raise type(problem)(
            f"{url}: refused after two downloads: {problem} (the stored shard does not match "
            "the manifest: re-upload or re-convert the dataset)"
        )

    def _fetch_files(self, i: int, tmp: Path) -> None:
        url = self.shard_url(i)
        rroot = f"{self.root}/{self.manifest.shards[i].path}"
        listing = with_retries(lambda: self.fs.find(rroot, detail=True), url, "listing the shard", self.retries)
        files = [(p, int(info.get("size") or 0)) for p, info in sorted(listing.items())
                 if info.get("type", "file") != "directory"]
        if not files:
            raise ShardNotFoundError(
                f"{url}: missing shard: shard {i} is listed in the manifest but absent from the "
                "store; the dataset is incomplete (re-upload or re-convert it)"
            )
        pairs = []
        for p, size in files:
            rel = p[len(rroot):].lstrip("/")
            if not p.startswith(rroot) or not rel or ".." in rel.split("/"):
                raise ShardNotFoundError(f"{url}: the store listed {p!r}, outside the shard")
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            pairs.append((p, str(local), size))

        def get_missing() -> None:
            todo = [(r, lp) for r, lp, size in pairs if not (os.path.exists(lp) and os.path.getsize(lp) == size)]
            if todo:
                self.fs.get([r for r, _ in todo], [lp for _, lp in todo])
            short = [r for r, lp, size in pairs if not (os.path.exists(lp) and os.path.getsize(lp) == size)]
            if short:  # a truncated transfer: fetch those files again
                raise ConnectionError(f"{len(short)} file(s) arrived incomplete, e.g. {short[0]}")

        with_retries(get_missing, url, "downloading the shard", self.retries)

    # ---- pickling -------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs=None, _fs_pid=-1, _pins={}, _mutex=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mutex, self._pid = threading.Lock(), os.getpid()

    def __repr__(self) -> str:
        return f"ShardCache({self.url!r}, local={str(self.local)!r}, limit={format_size(self.limit)})"
