"""Remote datasets: bad input gives one clear error naming the URL; the cache's pins,
eviction and single download; retries with backoff; other fsspec protocols."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from scmf_loader.dataset import CellDataset
from scmf_loader.errors import (
    ConfigurationError,
    FormatVersionError,
    ManifestError,
    ManifestNotFoundError,
    ShardNotFoundError,
    VocabularyError,
)
from scmf_loader.streaming import CacheError, RemoteError, StreamingCellDataset
from scmf_loader.streaming.cache import ShardCache, parse_size, shard_nbytes
from scmf_loader.streaming.remote import open_remote_dataset, with_retries

pytest_plugins = ["s3_fixtures"]

if TYPE_CHECKING:
    from s3_fixtures import MotoS3


@pytest.fixture(scope="module")
def bucket(s3_server: MotoS3, loader_dataset: Path) -> str:
    name = s3_server.make_bucket()
    s3_server.upload(loader_dataset, f"s3://{name}/ds")
    return name


def opts(server: MotoS3) -> dict[str, Any]:
    return server.storage_options()


# ---- bad input ------------------------------------------------------------------------------
def test_missing_bucket_or_prefix(s3_server: MotoS3, bucket: str, tmp_path: Path) -> None:
    for url in ("s3://no-such-bucket-scmf/ds", f"s3://{bucket}/no/such/prefix"):
        with pytest.raises(ManifestNotFoundError, match=rf"^{url}: no such dataset: nothing is stored at this URL"):
            CellDataset(url, cache_dir=tmp_path, storage_options=opts(s3_server))
        with pytest.raises(ManifestNotFoundError, match=rf"^{url}: no such dataset"):
            StreamingCellDataset(url, cache_dir=tmp_path, storage_options=opts(s3_server), world_size=1, rank=0)


def test_url_that_is_not_a_dataset(s3_server: MotoS3, bucket: str, tmp_path: Path) -> None:
    s3_server.put(f"s3://{bucket}/other/readme.txt", b"hello")
    for url in (f"s3://{bucket}/other", f"s3://{bucket}/other/readme.txt"):
        with pytest.raises(ManifestNotFoundError, match=rf"^{url}/manifest.json: no manifest; {url} is not a complete scmf dataset"):
            CellDataset(url, cache_dir=tmp_path, storage_options=opts(s3_server))


def test_malformed_manifest(s3_server: MotoS3, bucket: str, loader_dataset: Path, tmp_path: Path) -> None:
    s3_server.put(f"s3://{bucket}/bad/manifest.json", b"{not json")
    with pytest.raises(ManifestError, match=rf"^s3://{bucket}/bad/manifest.json: not valid JSON"):
        CellDataset(f"s3://{bucket}/bad", cache_dir=tmp_path, storage_options=opts(s3_server))
    raw = json.loads((loader_dataset / "manifest.json").read_text())
    s3_server.put(f"s3://{bucket}/future/manifest.json", json.dumps({**raw, "format_version": 99}).encode())
    with pytest.raises(FormatVersionError, match=rf"^s3://{bucket}/future/manifest.json: .*format_version is 99"):
        CellDataset(f"s3://{bucket}/future", cache_dir=tmp_path, storage_options=opts(s3_server))
    s3_server.put(f"s3://{bucket}/novocab/manifest.json", json.dumps(raw).encode())
    with pytest.raises(VocabularyError, match=rf"^s3://{bucket}/novocab/vocab.json: missing"):
        CellDataset(f"s3://{bucket}/novocab", cache_dir=tmp_path, storage_options=opts(s3_server))


def test_missing_shard_in_the_store(s3_server: MotoS3, loader_dataset: Path, tmp_path: Path) -> None:
    name = s3_server.make_bucket()
    url = s3_server.upload(loader_dataset, f"s3://{name}/ds")
    client = s3_server.client()
    for obj in client.list_objects_v2(Bucket=name, Prefix="ds/shards/000002.zarr/")["Contents"]:
        client.delete_object(Bucket=name, Key=obj["Key"])
    ds = CellDataset(url, cache_dir=tmp_path, storage_options=opts(s3_server))
    start = int(ds.shard_offsets[2])
    with pytest.raises(ShardNotFoundError, match=rf"^{url}/shards/000002.zarr: refused after two downloads: .*missing shard"):
        ds[np.arange(start, start + 3)]


def test_unwritable_cache(s3_server: MotoS3, bucket: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    url = f"s3://{bucket}/ds"
    with pytest.raises(CacheError, match=rf"^{url}: the cache directory {blocker}/sub cannot be written"):
        CellDataset(url, cache_dir=blocker / "sub", storage_options=opts(s3_server))


def test_cache_too_small(s3_server: MotoS3, bucket: str, loader_dataset: Path, tmp_path: Path) -> None:
    url = f"s3://{bucket}/ds"
    with pytest.raises(CacheError, match=rf"^{url}: cache_limit 1.0 kB is smaller than shard \d"):
        CellDataset(url, cache_dir=tmp_path, cache_limit="1kB", storage_options=opts(s3_server))
    biggest = max(shard_nbytes(e) for e in CellDataset(loader_dataset).store.manifest.shards)
    with pytest.raises(CacheError, match=rf"^{url}: cache_limit .* is too small: a shuffle window"):
        StreamingCellDataset(url, cache_dir=tmp_path, cache_limit=2 * biggest, storage_options=opts(s3_server),
                             world_size=1, rank=0)


def test_unknown_protocol_and_bad_limits(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="^nope://x/y: not a URL fsspec can open"):
        CellDataset("nope://x/y", cache_dir=tmp_path)
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1GB", 0, True):
        with pytest.raises(ConfigurationError, match="cache_limit"):
            parse_size(bad)


# ---- retries --------------------------------------------------------------------------------
def test_retries_back_off_then_succeed_or_name_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("scmf_loader.streaming.fs.time.sleep", sleeps.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("reset by peer")
        return "ok"

    assert with_retries(flaky, "s3://b/k", "reading", retries=5) == "ok"
    assert len(calls) == 4
    assert len(sleeps) == 3
    assert sleeps[2] > sleeps[0]  # exponential (with jitter in [0.5, 1.5))
    with pytest.raises(RemoteError, match=r"^s3://b/k: reading failed after 3 attempt\(s\); last error: TimeoutError: slow"):
        with_retries(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "s3://b/k", "reading", retries=2)
    calls.clear()

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "s3://b/k", "reading")
    assert len(calls) == 1  # permanent: not retried


# ---- the cache over fsspec's memory filesystem ----------------------------------------------
@pytest.fixture
def memory_url(loader_dataset: Path) -> Any:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/scmf-k-{id(fs)}-{np.random.default_rng().integers(1 << 30)}"
    for f in loader_dataset.rglob("*"):
        if f.is_file():
            fs.pipe(f"{root}/{f.relative_to(loader_dataset).as_posix()}", f.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_memory_url_streams_like_the_local_dataset(memory_url: str, loader_dataset: Path, tmp_path: Path) -> None:
    kw = {"batch_size": 100, "world_size": 1, "rank": 0, "seed": 2}
    remote = [b.cell_ids.tolist() for b in StreamingCellDataset(memory_url, cache_dir=tmp_path, **kw)]
    here = [b.cell_ids.tolist() for b in StreamingCellDataset(loader_dataset, **kw)]
    assert remote == here
    from scmf_loader.opening import open_dataset

    store = open_dataset(memory_url, cache_dir=tmp_path)  # the hook in open_dataset
    assert type(store).__name__ == "RemoteDatasetStore"
    assert store.n_cells == CellDataset(loader_dataset).store.n_cells
    with pytest.raises(ConfigurationError, match="apply to datasets at URLs only"):
        open_dataset(loader_dataset, cache_dir=tmp_path)


def test_pins_eviction_and_waiting(memory_url: str, tmp_path: Path) -> None:
    store = open_remote_dataset(memory_url, cache_dir=tmp_path)
    sizes = [shard_nbytes(e) for e in store.manifest.shards]
    limit = sizes[0] + sizes[1] + sizes[2] - 1  # room for two of them, not three
    cache = store.cache
    small = ShardCache(memory_url, store.manifest, (store.path / "manifest.json").read_bytes(), cache_dir=tmp_path / "c",
                       cache_limit=limit, wait_s=0.3)
    small.prepare((store.path / "manifest.json").read_bytes())
    assert small.ensure(0) is not None
    assert small.ensure(1) is not None
    assert small.ensure(2, patient=False) is None  # both pinned: a prefetch gives up
    with pytest.raises(CacheError, match=rf"^{memory_url}: cache_limit .* is too small: shard 2 needs"):
        small.ensure(2)
    small.release(0)
    assert small.ensure(2) is not None  # shard 0 evicted to make room
    assert not small.shard_path(0).exists()
    assert small.shard_path(1).is_dir()
    small.release_all()
    del cache


def test_one_download_when_threads_race(memory_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_remote_dataset(memory_url, cache_dir=tmp_path)
    cache = store.cache
    fetched: list[int] = []
    original = ShardCache._fetch_files

    def counting(self: ShardCache, i: int, tmp: Path) -> None:
        fetched.append(i)
        original(self, i, tmp)

    monkeypatch.setattr(ShardCache, "_fetch_files", counting)
    stale = cache.shard_path(4).with_name(".000004.zarr.tmp-999999-1")
    stale.mkdir(parents=True)  # left by a process that died mid-download
    threads = [threading.Thread(target=cache.ensure, args=(3,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetched == [3]
    assert cache.ensure(4) is not None
    assert not stale.exists()
    assert fetched == [3, 4]
    cache.release_all()
