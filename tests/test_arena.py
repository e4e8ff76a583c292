"""scmf_shards.arena: the one-pass conversion's held rows in one pre-faulted block."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from scmf_shards import arena as arena_module
from scmf_shards.arena import Arena
from scmf_shards.convert import convert_h5ad

DATA = Path(__file__).parent / "data"


def test_take_hands_out_disjoint_aligned_arrays_until_full() -> None:
    a = Arena(1000)
    x = a.take(10, np.float32)
    y = a.take(3, np.int64)
    assert x is not None
    assert y is not None
    assert x.dtype == np.float32
    assert x.shape == (10,)
    assert y.dtype == np.int64
    assert y.shape == (3,)
    assert x.__array_interface__["data"][0] % 64 == 0
    assert y.__array_interface__["data"][0] % 64 == 0
    x[:] = 1
    y[:] = 2
    assert not np.shares_memory(x, y)
    assert (x == 1).all()
    assert (y == 2).all()
    assert a.take(1000, np.uint8) is None  # does not fit what is left
    assert a.take(1, np.uint8) is not None


def test_give_back_only_the_last_array_tail() -> None:
    a = Arena(4096)
    x = a.take(100, np.float32)
    assert x is not None
    a.give_back(x[:10], 10)  # last taken: the tail returns
    assert a.used == 64
    y = a.take(10, np.float32)
    z = a.take(10, np.float32)
    assert y is not None
    assert z is not None
    before = a.used
    a.give_back(y, 1)  # not the last array taken: nothing changes
    assert a.used == before
    assert not np.shares_memory(x[:10], y)


def test_threads_never_get_overlapping_arrays() -> None:
    a = Arena(64 * 4000)
    got: list[np.ndarray] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(500):
            t = a.take(16, np.float32)
            if t is not None:
                with lock:
                    got.append(t)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4000  # exactly what fits, none twice
    starts = sorted(g.__array_interface__["data"][0] for g in got)
    assert len(set(starts)) == len(starts)
    assert all(b - s >= 64 for s, b in zip(starts, starts[1:], strict=False))


def test_prefault_runs_and_stops() -> None:
    a = Arena(8 << 20)
    a.prefault()
    a.stop()
    x = a.take(1 << 20, np.float32)
    assert x is not None
    x[:] = 3
    assert float(x.sum()) == 3 * (1 << 20)


def test_touching_pages_never_overwrites_what_was_handed_out() -> None:
    """The prefault thread writes a zero into each page: it must skip memory already handed
    out (it once zeroed one index per page of rows already aligned, at 100k cells with 2
    workers). Run synchronously here, so the check does not depend on thread timing."""
    a = Arena(3 * (4 << 20) + 12345)
    x = a.take(5_000_000, np.uint8)  # spans two touch steps and part of a third page run
    assert x is not None
    x[:] = 7
    a._touch()
    assert int(np.count_nonzero(x != 7)) == 0
    y = a.take(1000, np.int32)  # what follows is still usable, and already touched
    assert y is not None
    y[:] = -1
    assert int(y.sum()) == -1000
    assert int(np.count_nonzero(x != 7)) == 0


def test_prefault_concurrent_with_takers_keeps_every_byte() -> None:
    a = Arena(64 << 20)
    a.prefault()
    got = []
    for i in range(60):  # ~1 MB arrays filled while the thread touches ahead
        g = a.take(1 << 18, np.int32)
        assert g is not None
        g[:] = i + 1
        got.append(g)
    a._thread.join()  # type: ignore[union-attr]  # let it finish touching the whole arena
    assert all(int(np.count_nonzero(g != i + 1)) == 0 for i, g in enumerate(got))


def test_one_pass_conversion_holds_its_rows_in_the_arena(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh one-pass conversion takes its held arrays from the arena; the bytes are the
    golden dataset's (tests/test_golden.py checks them for every path)."""
    taken: list[int] = []
    real = Arena.take

    def counting(self: Arena, n: int, dtype: np.dtype | str) -> np.ndarray | None:
        out = real(self, n, dtype)
        taken.append(0 if out is None else out.nbytes)
        return out

    monkeypatch.setattr(arena_module.Arena, "take", counting)
    m = convert_h5ad([DATA / "golden_source.h5ad"], tmp_path / "ds", quiet=True, vocab="union",
                     shard_size=16, chunk_size=10, obs_columns=("cell_type",))
    assert taken
    assert sum(taken) > 0
    assert m.nnz > 0
