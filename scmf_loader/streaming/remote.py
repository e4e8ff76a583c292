"""Datasets at fsspec URLs: the filesystem, retries, the manifest, and the remote store.

:func:`open_remote_dataset` reads ``<url>/manifest.json`` (and the vocabulary) and returns a
:class:`RemoteDatasetStore`: a :class:`~scmf_loader.store.DatasetStore` over the node-local
cache directory (:class:`~scmf_loader.streaming.cache.ShardCache`) whose shards are fetched
and verified on first access, then memory-mapped from the cache like a local dataset's.
``file://`` URLs and plain paths are opened in place (no cache).

fsspec (and the protocol's own package: s3fs, gcsfs, ...) is imported here, when a URL is
opened: it is the optional extra ``scmodelforge-data[remote]``. ``storage_options`` are
passed to fsspec unchanged; credentials otherwise come from the usual environment and
config files of the store. Neither ever appears in a manifest, a cache file, a message or
a ``repr``.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from scmf_loader.errors import ManifestError, ManifestNotFoundError, ScmfError
from scmf_loader.format import MANIFEST_NAME, Manifest, manifest_from_dict
from scmf_loader.format.integrity import check_manifest_arrays, check_shard_structure, check_vocab
from scmf_loader.store import DEFAULT_MAX_OPEN_SHARDS, DatasetStore, open_local_dataset
from scmf_loader.streaming.errors import RemoteError
from scmf_loader.streaming.fs import DEFAULT_RETRIES, filesystem, is_url, local_path, with_retries

__all__ = [
    "DEFAULT_RETRIES",
    "RemoteDatasetStore",
    "filesystem",
    "is_url",
    "local_path",
    "open_remote_dataset",
    "read_remote_manifest",
    "with_retries",
]

PIN_SLOTS = 4  # shards a map-style reader keeps pinned: the most recently opened ones


def _exists(fs: Any, path: str, url: str, retries: int) -> bool:
    try:
        return bool(with_retries(lambda: fs.exists(path), url, "looking up the dataset", retries))
    except (FileNotFoundError, PermissionError):
        return False


def read_remote_manifest(fs: Any, root: str, url: str, retries: int = DEFAULT_RETRIES) -> tuple[Manifest, bytes]:
    """Read and validate ``<url>/manifest.json``: ``(manifest, its bytes)``. A missing
    bucket or prefix, or a URL that is not a dataset, raises
    :class:`~scmf_loader.errors.ManifestNotFoundError` naming the URL."""
    murl = f"{url}/{MANIFEST_NAME}"
    try:
        raw = with_retries(lambda: fs.cat_file(f"{root}/{MANIFEST_NAME}"), murl, "reading the manifest", retries)
    except FileNotFoundError as exc:
        if not _exists(fs, root, url, retries):
            raise ManifestNotFoundError(
                f"{url}: no such dataset: nothing is stored at this URL (missing bucket or "
                f"prefix: {exc})"
            ) from None
        raise ManifestNotFoundError(
            f"{murl}: no manifest; {url} is not a complete scmf dataset (a conversion that did "
            "not finish leaves no manifest; re-run it)"
        ) from None
    except PermissionError as exc:
        raise RemoteError(
            f"{murl}: access refused ({exc}); check the credentials of the environment or "
            "storage_options"
        ) from None
    try:
        manifest = manifest_from_dict(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{murl}: not valid JSON ({exc}); {url} is not an scmf dataset") from None
    except ManifestError as exc:
        raise type(exc)(f"{murl}: {exc}") from None
    check_manifest_arrays(manifest, murl)
    return manifest, bytes(raw)


class RemoteDatasetStore(DatasetStore):
    """A dataset at a URL, read through its node-local cache. Build one with
    :func:`open_remote_dataset`. ``shard_dir(i)`` fetches and verifies shard ``i`` on first
    access and keeps the few most recently opened shards pinned in the cache; everything
    else is :class:`~scmf_loader.store.DatasetStore`'s (memory maps, obs columns)."""

    def __init__(self, cache: Any, manifest: Manifest, vocab: Any, max_open_shards: int) -> None:
        super().__init__(cache.local, manifest, vocab, max_open_shards)
        self.cache = cache
        self.url: str = cache.url
        self._pinned: deque[int] = deque()

    def shard_dir(self, shard: int) -> Any:
        """The cached directory of ``shard``, fetched (and verified) first if absent."""
        path = self.cache.ensure(shard)
        self._pinned.append(shard)
        if len(self._pinned) > PIN_SLOTS:
            self.cache.release(self._pinned.popleft())
        return path

    def check_sizes(self) -> None:
        """Nothing to check on open: each shard is checked in full when it is fetched."""

    def verify(self) -> None:
        """Fetch every shard (each checked against every checksum on the way in) and check
        its full structure; raises the first problem found, naming its URL."""
        for i in range(self.n_shards):
            self.shard_dir(i)
            try:
                check_shard_structure(self.path, self.manifest, i)
            except ScmfError as exc:
                raise type(exc)(str(exc).replace(str(self.shard_dir(i)), self.cache.shard_url(i))) from None

    def close(self) -> None:
        """Drop cached maps, obs columns and this reader's pins."""
        super().close()
        while self._pinned:
            self.cache.release(self._pinned.popleft())

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_pinned"] = deque()
        return state

    def __repr__(self) -> str:
        return (
            f"RemoteDatasetStore({self.url!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
            f"n_shards={self.n_shards}, cache={str(self.path)!r})"
        )


def open_remote_dataset(
    url: str,
    *,
    verify: bool = False,
    max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
    cache_dir: Any = None,
    cache_limit: int | str = "20GB",
    storage_options: dict[str, Any] | None = None,
    retries: int = DEFAULT_RETRIES,
) -> DatasetStore:
    """Open the dataset at ``url`` (any fsspec URL) through a node-local cache.

    Reads the manifest and the vocabulary now (checked as for a local dataset); shards are
    fetched on first access into ``cache_dir`` (default :func:`~scmf_loader.streaming.cache.default_cache_dir`),
    verified against the manifest's checksums, and kept under ``cache_limit`` bytes (LRU).
    ``verify=True`` fetches and fully checks every shard now. A ``file://`` URL or a plain
    path is opened in place with :func:`~scmf_loader.store.open_local_dataset`. Every error names
    the URL.
    """
    from scmf_loader.streaming.cache import ShardCache

    local = local_path(url)
    if local is not None:
        return open_local_dataset(local, verify=verify, max_open_shards=max_open_shards)
    url = url.rstrip("/")
    fs, root = filesystem(url, storage_options)
    manifest, raw = read_remote_manifest(fs, root, url, retries)
    cache = ShardCache(url, manifest, raw, cache_dir=cache_dir, cache_limit=cache_limit,
                       storage_options=storage_options, retries=retries)
    cache.adopt(fs, root)
    cache.prepare(raw)
    try:
        vocab = check_vocab(cache.local, manifest)
    except ScmfError:  # a damaged cached copy: fetch it again, then believe the store
        cache.fetch_vocab(again=True)
        try:
            vocab = check_vocab(cache.local, manifest)
        except ScmfError as exc:
            raise type(exc)(f"{url}/{manifest.vocab['path']}: {exc}") from None
    store = RemoteDatasetStore(cache, manifest, vocab, max_open_shards)
    if verify:
        store.verify()
    return store
