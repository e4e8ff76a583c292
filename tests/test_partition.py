"""The pure rank/world/worker partition, over many world shapes, without processes."""

from __future__ import annotations

import itertools

import pytest
from torch.utils.data import DistributedSampler

from scmf_loader.errors import ConfigurationError
from scmf_loader.world import partition, resolve_world

WORLDS = list(itertools.product(range(1, 9), (False, True)))


@pytest.mark.parametrize(("world", "drop_last"), WORLDS)
def test_same_batches_as_torch_distributed_sampler(world: int, drop_last: bool) -> None:
    """torch strides ranks over the order, we give each rank a contiguous stretch: the same
    number per rank and the same batches (padding included) over all ranks."""
    for n in range(0, 40):
        ours = [list(partition(n, world, r, drop_last=drop_last)) for r in range(world)]
        theirs = [
            list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False, drop_last=drop_last))
            for r in range(world)
        ]
        assert [len(x) for x in ours] == [len(x) for x in theirs], n
        assert sorted(b for x in ours for b in x) == sorted(b for x in theirs for b in x), n
        flat = [b for x in ours for b in x]
        assert flat == [p % n for p in range(len(flat))] if n else flat == []  # contiguous stretches


@pytest.mark.parametrize(("world", "drop_last"), WORLDS)
def test_workers_split_each_rank_without_duplicate_or_loss(world: int, drop_last: bool) -> None:
    for n, rank in itertools.product(range(0, 40), range(world)):
        whole = partition(n, world, rank, drop_last=drop_last)
        for workers in range(1, 6):
            shares = [partition(n, world, rank, drop_last=drop_last, num_workers=workers, worker_id=w) for w in range(workers)]
            positions = sorted(p for s in shares for p in s.positions)
            assert positions == list(whole.positions)
            # a DataLoader's round-robin merge gives back the rank's order
            merged = [shares[i % workers][i // workers] for i in range(len(whole))]
            assert merged == list(whole)


def test_equal_counts_and_padding_semantics() -> None:
    for n, world in itertools.product(range(1, 60), range(1, 9)):
        parts = [partition(n, world, r, drop_last=False) for r in range(world)]
        assert len({len(p) for p in parts}) == 1
        seen = sorted(b for p in parts for b in p)
        assert set(seen) == set(range(n))  # every batch at least once
        assert len(seen) - n < world  # padding repeats fewer than world_size batches
        cut = [partition(n, world, r, drop_last=True) for r in range(world)]
        got = sorted(b for p in cut for b in p)
        assert got == list(range(n - n % world))


def test_constant_size_for_huge_epochs() -> None:
    p = partition(10**12, 1024, 1023, drop_last=False, num_workers=8, worker_id=7)
    assert isinstance(p.positions, range)
    per_rank = -(-(10**12) // 1024)
    assert len(p) == len(range(7, per_rank, 8))
    assert p[len(p) - 1] < 10**12


@pytest.mark.parametrize(
    ("args", "match"),
    [((10, 4, 4), "rank"), ((10, 0, 0), "world_size"), ((10, 2, -1), "rank"), ((-1, 1, 0), "n_batches")],
)
def test_errors(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        partition(*args, drop_last=False)


def test_worker_id_out_of_range() -> None:
    with pytest.raises(ConfigurationError, match="worker_id"):
        partition(10, 1, 0, drop_last=False, num_workers=2, worker_id=2)


def test_resolve_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_world() == (0, 1)
    assert resolve_world(1, 2) == (1, 2)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resolve_world() == (5, 8)
    assert resolve_world(rank=0) == (0, 8)
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ConfigurationError, match="WORLD_SIZE"):
        resolve_world()
    with pytest.raises(ConfigurationError, match="rank"):
        resolve_world(2, 2)


def test_resolve_world_prefers_an_initialised_process_group(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (one-process, gloo) torch.distributed group wins over RANK/WORLD_SIZE;
    explicit arguments still win over both."""
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert resolve_world() == (0, 1)
        assert resolve_world(rank=0, world_size=4) == (0, 4)
    finally:
        dist.destroy_process_group()
    assert resolve_world() == (3, 8)


def test_scmf_loader_partition_is_the_function_in_any_import_order() -> None:
    """Issue 19: after ``from scmf_loader import CellDataLoader`` the name used to be the
    submodule (``TypeError: 'module' object is not callable``). Checked in fresh processes,
    after importing every submodule of the package too."""
    import json
    import subprocess
    import sys

    code = (
        "import json, pkgutil, importlib, types\n"
        "from scmf_loader import CellDataLoader\n"
        "import scmf_loader\n"
        "first = scmf_loader.partition(10, 2, 1, drop_last=False).positions\n"
        "for m in pkgutil.walk_packages(scmf_loader.__path__, 'scmf_loader.'):\n"
        "    importlib.import_module(m.name)\n"
        "modules = [n for n in scmf_loader.__all__ if isinstance(getattr(scmf_loader, n), types.ModuleType)]\n"
        "print(json.dumps([list(first), callable(scmf_loader.partition), modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, is_callable, modules = json.loads(out.strip().splitlines()[-1])
    assert first == [5, 6, 7, 8, 9]
    assert is_callable
    assert modules == []
    fresh = "import scmf_loader; print(scmf_loader.partition(4, 1, 0, drop_last=True).total)"
    assert subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True).stdout.strip() == "4"


def test_dir_lists_the_public_api_only() -> None:
    import scmf_loader

    names = dir(scmf_loader)
    assert names == sorted(scmf_loader.__all__)
    for helper in ("Any", "TYPE_CHECKING", "annotations", "importlib", "world", "samplers"):
        assert helper not in names
    assert {"CellDataset", "CellDataLoader", "partition", "BlockShuffleSampler"} <= set(names)
    assert all(hasattr(scmf_loader, n) for n in names)
