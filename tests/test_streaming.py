"""StreamingCellDataset and CellDataset(url) against a real S3 API on loopback (moto), with
s3fs: coverage over 2 ranks x 2 workers, batches equal to the local dataset's, exact resume,
a shared node cache that downloads each shard once, and bad input."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from scmf_loader.batch import CSRBatch
from scmf_loader.dataset import CellDataset
from scmf_loader.streaming import StreamingCellDataset

pytest_plugins = ["s3_fixtures"]

if TYPE_CHECKING:
    from s3_fixtures import FaultProxy, MotoS3


def storage_options(endpoint: str) -> dict[str, Any]:
    from s3_fixtures import storage_options as options

    return options(endpoint)


@dataclass
class Remote:
    url: str
    local: Path
    server: MotoS3

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        return storage_options(endpoint or self.server.endpoint)


@pytest.fixture(scope="module")
def remote(s3_server: MotoS3, loader_dataset: Path) -> Remote:
    """The loader test dataset (8 shards, 1437 cells) uploaded to a fresh bucket."""
    bucket = s3_server.make_bucket()
    return Remote(s3_server.upload(loader_dataset, f"s3://{bucket}/atlas/v1"), loader_dataset, s3_server)


@pytest.fixture(scope="module")
def local(loader_dataset: Path) -> CellDataset:
    return CellDataset(loader_dataset)


def assert_same_batch(batch: CSRBatch, local: CellDataset) -> None:
    """The batch equals the local dataset's cells of the same ids (arrays and obs)."""
    ref = local[batch.cell_ids.numpy()]
    for name in ("indptr", "indices", "values"):
        np.testing.assert_array_equal(getattr(batch, name).numpy(), getattr(ref, name).numpy(), err_msg=name)
    assert batch.obs.keys() == ref.obs.keys()
    for k in ref.obs:
        np.testing.assert_array_equal(batch.obs[k].numpy(), ref.obs[k].numpy())


def read_rank(ds: StreamingCellDataset, workers: int, limit: int | None = None) -> list[CSRBatch]:
    if workers == 0:
        it: Any = iter(ds)
    else:
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
    out: list[Any] = []
    if limit == 0:
        return out
    for batch in it:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def cells(batches: list[CSRBatch]) -> list[int]:
    return [c for b in batches for c in b.cell_ids.tolist()]


def test_two_ranks_two_workers_cover_every_cell_once(remote: Remote, local: CellDataset, tmp_path: Path,
                                                      fault_proxy: FaultProxy) -> None:
    """Both ranks read concurrently (2 workers each) through one node cache: every cell once
    per epoch plus DistributedSampler padding, equal batch counts, batches equal to the
    local dataset's, and every object downloaded exactly once."""
    n = len(local)
    opts = remote.options(fault_proxy.endpoint)
    for epoch in (0, 1):
        results: dict[int, list[CSRBatch]] = {}
        errors: list[BaseException] = []

        def run(rank: int, epoch: int = epoch, results: dict[int, list[CSRBatch]] = results,
                errors: list[BaseException] = errors) -> None:
            try:
                ds = StreamingCellDataset(remote.url, batch_size=64, rank=rank, world_size=2, seed=7,
                                          cache_dir=tmp_path / "cache", storage_options=opts)
                ds.set_epoch(epoch)
                results[rank] = read_rank(ds, workers=2)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        n_batches = (n + 63) // 64
        assert len(results[0]) == len(results[1]) == (n_batches + 1) // 2
        counts = Counter(cells(results[0]) + cells(results[1]))
        assert set(counts) == set(range(n))
        padding = 2 * len(results[0]) * 64 - (64 - n % 64) - n  # one padded batch of 64 cells
        assert sum(counts.values()) - n == padding == 64
        assert max(counts.values()) == 2
        for b in results[0][:5] + results[1][-5:]:
            assert_same_batch(b, local)
    shard_gets = {k: v for k, v in fault_proxy.gets.items() if "/shards/" in k}
    assert len(shard_gets) == sum(1 for f in (remote.local / "shards").rglob("*") if f.is_file())
    assert set(shard_gets.values()) == {1}, "a shard object was downloaded twice"


def test_rank_cells_do_not_depend_on_workers_and_match_local(remote: Remote, local: CellDataset, tmp_path: Path) -> None:
    kw = {"batch_size": 50, "rank": 1, "world_size": 2, "cache_dir": tmp_path, "storage_options": remote.options()}
    ds = StreamingCellDataset(remote.url, **kw)
    ds.set_epoch(3)
    alone = read_rank(ds, 0)
    with_workers = read_rank(ds, 2)
    assert sorted(cells(alone)) == sorted(cells(with_workers))
    assert [len(b) for b in alone][:-1] == [50] * (len(alone) - 1)
    assert len(alone) == len(with_workers) == len(ds)
    # the same plan over the local directory (read in place, no cache) gives the same batches
    here = StreamingCellDataset(remote.local, **{**kw, "storage_options": None})
    here.set_epoch(3)
    assert [b.cell_ids.tolist() for b in read_rank(here, 0)] == [b.cell_ids.tolist() for b in alone]
    for b in alone:
        assert_same_batch(b, local)


def test_epochs_are_seeded(remote: Remote, tmp_path: Path) -> None:
    kw = {"batch_size": 100, "cache_dir": tmp_path, "storage_options": remote.options(), "world_size": 1, "rank": 0}
    a, b = StreamingCellDataset(remote.url, **kw), StreamingCellDataset(remote.url, **kw)
    orders = []
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        orders.append(cells(read_rank(a, 0)))
        assert orders[-1] == cells(read_rank(b, 0))
        assert sorted(orders[-1]) == list(range(len(a.dataset)))
    assert orders[0] != orders[1]
    flat = StreamingCellDataset(remote.url, shuffle=False, **kw)
    assert cells(read_rank(flat, 0)) == list(range(len(a.dataset)))


@pytest.mark.parametrize(("before", "after"), [(0, 0), (2, 2), (2, 1), (0, 2)])
def test_resume_yields_exactly_the_remaining_cells(remote: Remote, tmp_path: Path, before: int, after: int) -> None:
    kw = {"batch_size": 40, "rank": 0, "world_size": 2, "cache_dir": tmp_path, "storage_options": remote.options(),
          "seed": 3}
    full = StreamingCellDataset(remote.url, **kw)
    full.set_epoch(1)
    whole = sorted(tuple(b.cell_ids.tolist()) for b in read_rank(full, 0))
    for k in (0, 5, 11):
        first = StreamingCellDataset(remote.url, **kw)
        first.set_epoch(1)
        head = read_rank(first, before, limit=k)
        state = first.state_dict(batches_done=k) if before else first.state_dict()
        assert state["batches_done"] == k
        second = StreamingCellDataset(remote.url, **kw)
        second.load_state_dict(state)
        rest = read_rank(second, after)
        assert len(head) + len(rest) == len(full)
        assert sorted(tuple(b.cell_ids.tolist()) for b in head + rest) == whole
        if after == 0:  # chained: stop again and resume once more
            third = StreamingCellDataset(remote.url, **kw)
            third.load_state_dict(state)
            part = read_rank(third, 0, limit=3)
            fourth = StreamingCellDataset(remote.url, **kw)
            fourth.load_state_dict(third.state_dict())
            tail = read_rank(fourth, 2)
            assert sorted(tuple(b.cell_ids.tolist()) for b in head + part + tail) == whole


def test_state_through_workers_needs_the_count_and_settings_must_match(remote: Remote, tmp_path: Path) -> None:
    from scmf_loader.errors import ConfigurationError

    kw = {"batch_size": 40, "cache_dir": tmp_path, "storage_options": remote.options(), "world_size": 1, "rank": 0}
    ds = StreamingCellDataset(remote.url, **kw)
    read_rank(ds, 2, limit=3)
    with pytest.raises(ConfigurationError, match="pass state_dict\\(batches_done=...\\)"):
        ds.state_dict()
    state = ds.state_dict(batches_done=3)
    other = StreamingCellDataset(remote.url, **{**kw, "batch_size": 32})
    with pytest.raises(ConfigurationError, match="batch_size=40 vs 32"):
        other.load_state_dict(state)


def test_set_epoch_reaches_persistent_workers(remote: Remote, tmp_path: Path) -> None:
    kw = {"batch_size": 100, "cache_dir": tmp_path, "storage_options": remote.options(), "world_size": 1, "rank": 0}
    ds = StreamingCellDataset(remote.url, **kw)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    ref = StreamingCellDataset(remote.url, **kw)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        ref.set_epoch(epoch)
        assert sorted(tuple(b.cell_ids.tolist()) for b in loader) == sorted(
            tuple(b.cell_ids.tolist()) for b in read_rank(ref, 0))


@pytest.mark.parametrize("output", ["dense", "padded"])
def test_other_outputs_match_the_loader_conversion(remote: Remote, local: CellDataset, tmp_path: Path, output: str) -> None:
    ds = StreamingCellDataset(remote.url, batch_size=30, output=output, max_genes=16, cache_dir=tmp_path,
                              storage_options=remote.options(), world_size=1, rank=0)
    for item in read_rank(ds, 0, limit=3):
        ref = local[item["cell_ids"].numpy()]
        want = ref.to_dense() if output == "dense" else ref.to_padded(16, True, "top")
        got = item["expression"] if output == "dense" else item["gene_indices"]
        expected = want if output == "dense" else want["gene_indices"]
        torch.testing.assert_close(got, expected)


def test_map_style_cell_dataset_at_a_url(remote: Remote, local: CellDataset, tmp_path: Path) -> None:
    ds = CellDataset(remote.url, cache_dir=tmp_path, storage_options=remote.options())
    assert len(ds) == len(local)
    assert ds.vocab == local.vocab
    shards = ds.store.path / "shards"
    cached = lambda: sorted(p.name for p in shards.iterdir()) if shards.exists() else []  # noqa: E731
    assert cached() == []  # nothing fetched before first access
    batch = ds[np.arange(210, 260)]
    assert_same_batch(batch, local)
    assert cached() == ["000001.zarr"]
    for i in (0, 555, len(ds) - 1):
        got, want = ds[i], local[i]
        torch.testing.assert_close(got["expression"], want["expression"])
        assert got["metadata"] == want["metadata"]
    ids = np.random.default_rng(0).permutation(len(ds))[:300]
    assert_same_batch(ds[ids], local)


def test_lru_budget_holds_while_reading_everything(remote: Remote, local: CellDataset, tmp_path: Path) -> None:
    from scmf_loader.streaming.cache import shard_nbytes

    sizes = [shard_nbytes(e) for e in local.store.manifest.shards]
    limit = sum(sorted(sizes)[-5:])
    ds = StreamingCellDataset(remote.url, batch_size=64, cache_dir=tmp_path, cache_limit=limit,
                              storage_options=remote.options(), world_size=1, rank=0, prefetch_shards=1)
    got = cells(read_rank(ds, 0))
    assert sorted(got) == list(range(len(local)))
    shards = ds.cache.local / "shards"
    held = sum(sizes[int(p.name[:6])] for p in shards.iterdir() if not p.name.startswith("."))
    assert held <= limit
    assert len(list(shards.iterdir())) < 8  # some were evicted


def test_retries_with_backoff_through_a_faulty_proxy(remote: Remote, local: CellDataset, tmp_path: Path,
                                                     fault_proxy: FaultProxy) -> None:
    fault_proxy.delay_s = 0.005
    fault_proxy.fail_rate = 0.25
    ds = StreamingCellDataset(remote.url, batch_size=64, cache_dir=tmp_path,
                              storage_options=remote.options(fault_proxy.endpoint), world_size=1, rank=0)
    batches = read_rank(ds, 0)
    assert sorted(cells(batches)) == list(range(len(local)))
    for b in batches[::4]:
        assert_same_batch(b, local)
    assert fault_proxy.failures >= 10


def test_flipped_byte_in_a_stored_shard_is_caught(s3_server: MotoS3, loader_dataset: Path, tmp_path: Path,
                                                  fault_proxy: FaultProxy) -> None:
    from scmf_loader.errors import ChecksumMismatchError, ShardSizeError

    bucket = s3_server.make_bucket()
    url = s3_server.upload(loader_dataset, f"s3://{bucket}/ds")
    key = f"{url}/shards/000003.zarr/X/data/c/0"
    data = bytearray(s3_server.get(key))
    data[len(data) // 2] ^= 0x01
    s3_server.put(key, bytes(data))
    ds = CellDataset(url, cache_dir=tmp_path, storage_options=storage_options(fault_proxy.endpoint))
    ds[np.arange(0, 10)]  # an intact shard reads
    start = int(ds.shard_offsets[3])
    with pytest.raises(ChecksumMismatchError, match=rf"^{url}/shards/000003\.zarr: refused after two downloads.*checksum mismatch in data"):
        ds[np.arange(start, start + 5)]
    assert fault_proxy.gets[f"/{bucket}/ds/shards/000003.zarr/X/data/c/0"] == 2  # fetched again, then refused
    assert not (ds.store.path / "shards" / "000003.zarr").exists()
    s3_server.put(key, bytes(data[:-8]))  # truncated
    with pytest.raises(ShardSizeError, match=rf"^{url}/shards/000003\.zarr: refused"):
        ds[np.arange(start, start + 5)]


def test_credentials_never_written_or_shown(remote: Remote, tmp_path: Path) -> None:
    marker = "s3cr3t-MARKER-value"
    opts = {**remote.options(), "secret": marker}
    ds = StreamingCellDataset(remote.url, batch_size=64, cache_dir=tmp_path, storage_options=opts, world_size=1, rank=0)
    read_rank(ds, 0, limit=2)
    shown = repr(ds) + repr(ds.store) + repr(ds.cache) + str(ds.state_dict())
    assert marker not in shown
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert marker.encode() not in f.read_bytes(), f
