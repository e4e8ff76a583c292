"""MixtureDataset / MixtureSampler: weights, determinism, resume, ranks and workers,
vocabulary mapping and the ``dataset`` obs column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import hpc_genes, write_counts_h5ad
from sampler_harness import global_order

from scmf_loader.errors import ConfigurationError
from scmf_loader.mixture import MixtureDataset, MixtureSampler

B_CELLS = 610


@pytest.fixture(scope="module")
def member_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second dataset whose vocabulary only partly overlaps the loader dataset's."""
    from scmf_shards.convert import convert_h5ad

    d = tmp_path_factory.mktemp("mix_b")
    genes = hpc_genes()
    src = write_counts_h5ad(d / "mb.h5ad", B_CELLS, genes[350:500], seed=21, density=0.1,
                            obs={"cell_type": (["T cell", "epithelial"] * B_CELLS)[:B_CELLS]})
    out = d / "b"
    convert_h5ad([src], out, shard_size=150, obs_columns=("cell_type",), vocab="union", quiet=True)
    return out


def _mixture(a: Path, b: Path, weights: list[float] | None = (0.7, 0.3), seed: int = 0, **kw: object) -> MixtureDataset:
    from scmf_loader.dataset import CellDataset

    with pytest.warns(UserWarning, match="absent from dataset 'atlas'"):
        return MixtureDataset([CellDataset(a), CellDataset(b)], None if weights is None else list(weights), seed,
                              names=["atlas", "other"], **kw)


def _ids(loader: object) -> list[np.ndarray]:
    return [batch.cell_ids.numpy().copy() for batch in loader]  # type: ignore[attr-defined]


def test_weights_over_an_epoch_and_within_batches(loader_dataset: Path, member_b: Path) -> None:
    from scmf_loader.dataloader import CellDataLoader

    mix = _mixture(loader_dataset, member_b)
    sampler = mix.make_sampler(64)
    loader = CellDataLoader(mix, batch_size=64, sampler=sampler, num_workers=0, drop_last=False)
    counts = np.zeros(2, dtype=np.int64)
    for batch in loader:
        member = batch.obs["dataset"].numpy()
        np.testing.assert_array_equal(member, mix.member_of(batch.cell_ids.numpy()))
        per = np.bincount(member, minlength=2)
        if len(batch) == 64:
            assert np.all(np.abs(per - np.array([0.7, 0.3]) * 64) <= 2)
        counts += per
    assert counts.sum() == mix.epoch_size == len(mix)
    share = counts / counts.sum()
    assert abs(share[0] - 0.7) <= 0.02
    assert abs(share[1] - 0.3) <= 0.02
    assert counts.tolist() == sampler.member_counts()


def test_identical_across_runs_with_one_seed(loader_dataset: Path, member_b: Path) -> None:
    from scmf_loader.dataloader import CellDataLoader

    def run(seed: int, mix_seed: int) -> list[np.ndarray]:
        mix = _mixture(loader_dataset, member_b, seed=mix_seed)
        loader = CellDataLoader(mix, batch_size=50, sampler=MixtureSampler(mix, 50, seed=seed), num_workers=0,
                                drop_last=False)
        return _ids(loader) + _ids(loader)  # two epochs

    a, b = run(3, 1), run(3, 1)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    epoch = len(a) // 2
    assert not all(np.array_equal(x, y) for x, y in zip(a[:epoch], a[epoch:], strict=True))  # epochs differ
    for other in (run(4, 1), run(3, 2)):
        assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("stop", [0, 1, 17, 40])
def test_resume_is_exact(loader_dataset: Path, member_b: Path, stop: int) -> None:
    from scmf_loader.dataloader import CellDataLoader

    mix = _mixture(loader_dataset, member_b)

    def loader() -> CellDataLoader:
        return CellDataLoader(mix, batch_size=32, sampler=mix.make_sampler(32, seed=5), num_workers=0)

    first = loader()
    full = _ids(first) + _ids(first)  # epochs 0 and 1
    n = len(full) // 2
    run = loader()
    it = iter(run)
    taken = [next(it).cell_ids.numpy().copy() for _ in range(stop)]
    state = run.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = _ids(resumed) + _ids(resumed)
    got = taken + rest
    assert len(got) == 2 * n
    for x, y in zip(got, full, strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_refuses_other_weights(loader_dataset: Path, member_b: Path) -> None:
    a = MixtureSampler(_mixture(loader_dataset, member_b), 32)
    b = MixtureSampler(_mixture(loader_dataset, member_b, weights=[0.5, 0.5]), 32)
    with pytest.raises(ConfigurationError, match="weights"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize(("world", "workers", "drop_last"), [(2, 2, False), (3, 2, True), (2, 0, True)])
def test_ranks_and_workers_split_the_epoch(loader_dataset: Path, member_b: Path, world: int, workers: int,
                                           drop_last: bool) -> None:
    mix = _mixture(loader_dataset, member_b)

    def make(rank: int, world_size: int) -> MixtureSampler:
        return MixtureSampler(mix, 40, drop_last=drop_last, seed=2, rank=rank, world_size=world_size)

    order, s = global_order(make, world, 1, workers)  # every rank the same count (asserted there)
    assert len(order) % world == 0
    alone = MixtureSampler(mix, 40, drop_last=drop_last, seed=2, rank=0, world_size=1)
    for i, b in enumerate(order):  # the ranks' stretches are the epoch order, padded by its start
        np.testing.assert_array_equal(b, alone.batch(1, i % s.n_batches) if not drop_last else s.batch(1, i))
    if drop_last:
        assert all(len(b) == 40 for b in order)
    else:
        assert sum(len(b) for b in order[: s.n_batches]) == mix.epoch_size


def test_size_weights_read_every_cell_once(loader_dataset: Path, member_b: Path) -> None:
    mix = _mixture(loader_dataset, member_b, weights=None)
    sampler = MixtureSampler(mix, 64, seed=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        ids = np.concatenate(list(sampler))
        np.testing.assert_array_equal(np.sort(ids), np.arange(len(mix)))


def test_smaller_share_rotates_through_the_member(loader_dataset: Path, member_b: Path) -> None:
    """Member 0 serves fewer cells than it has: consecutive epochs continue its stream, so
    over enough epochs every cell is read equally often (to within one)."""
    mix = _mixture(loader_dataset, member_b, weights=[0.3, 0.7])
    sampler = MixtureSampler(mix, 64)
    seen = np.zeros(len(mix), dtype=np.int64)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        for ids in sampler:
            np.add.at(seen, ids, 1)
    a = seen[: mix.sizes[0]]
    assert a.max() - a.min() <= 1
    assert a.sum() == 6 * sampler.member_counts()[0]


def test_vocabulary_mapped_onto_the_first(loader_dataset: Path, member_b: Path) -> None:
    from scmf_loader.dataset import CellDataset

    mix = _mixture(loader_dataset, member_b)
    a_vocab, b = mix.vocab, CellDataset(member_b)
    absent = [t for t in b.vocab.genes if t not in set(a_vocab.tokens)]
    report = mix.gene_report[1]
    assert report["dropped"] == len(absent) > 0
    assert report["dropped_genes"] == absent
    assert report["mapped"] == len(b.vocab.genes) - len(absent)
    local = np.arange(0, B_CELLS, 7)
    batch = mix[local + mix.offsets[1]]
    assert batch.n_genes == len(a_vocab)
    ip, idx = batch.indptr.numpy(), batch.indices.numpy()
    for r in range(len(local)):  # sorted, in range
        assert np.all(np.diff(idx[ip[r] : ip[r + 1]]) > 0)
    got = batch.to_dense().numpy()
    ref = b[local].to_dense().numpy()  # over B's own vocabulary
    expected = np.zeros_like(got)
    cols = np.array([a_vocab.tokens.index(t) if t in set(a_vocab.tokens) else -1 for t in b.vocab.tokens])
    expected[:, cols[cols >= 0]] = ref[:, cols >= 0]
    np.testing.assert_array_equal(got, expected)


def test_obs_columns_merged(loader_dataset: Path, member_b: Path) -> None:
    from scmf_loader.dataset import CellDataset

    mix = _mixture(loader_dataset, member_b)
    assert mix.obs_columns == ("dataset", "source", "cell_type")  # 'batch' is only in the first
    ids = np.array([0, 5, 1500, 1900, 10])
    batch = mix[ids]
    members = [CellDataset(loader_dataset), CellDataset(member_b)]
    for i, cid in enumerate(ids.tolist()):
        m = int(mix.member_of(cid))
        assert mix.decode("dataset", batch.obs["dataset"][i : i + 1]) == [["atlas", "other"][m]]
        local = cid - int(mix.offsets[m])
        want = members[m].decode("cell_type", members[m][[local]].obs["cell_type"])
        assert mix.decode("cell_type", batch.obs["cell_type"][i : i + 1]) == want
    cell = mix[1500]
    assert cell["metadata"]["dataset"] == "other"
    assert cell["n_genes"] == len(cell["expression"])


def test_workers_give_the_same_batches(loader_dataset: Path, member_b: Path) -> None:
    from scmf_loader.dataloader import CellDataLoader

    mix = _mixture(loader_dataset, member_b)
    outs = []
    for workers in (0, 2):
        loader = CellDataLoader(mix, batch_size=128, sampler=mix.make_sampler(128), num_workers=workers,
                                persistent_workers=False)
        outs.append([(b.cell_ids.numpy().copy(), b.values.numpy().copy(), b.obs["dataset"].numpy().copy())
                     for b in loader])
    assert len(outs[0]) == len(outs[1])
    for x, y in zip(*outs, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)


def test_bad_input(loader_dataset: Path) -> None:
    from scmf_loader.dataset import CellDataset

    a = CellDataset(loader_dataset)
    with pytest.raises(ConfigurationError, match="2 datasets but 1 weights"):
        MixtureDataset([a, a], [1.0])
    with pytest.raises(ConfigurationError, match="finite and >= 0"):
        MixtureDataset([a, a], [1.0, -0.5])
    with pytest.raises(ConfigurationError, match="must not all be 0"):
        MixtureDataset([a, a], [0, 0])
    with pytest.raises(ConfigurationError, match="at least one dataset"):
        MixtureDataset([])
    with pytest.raises(ConfigurationError, match="distinct"):
        MixtureDataset([a, a], names=["x", "x"])
    with pytest.raises(ConfigurationError, match="needs a MixtureDataset"):
        MixtureSampler(a, 8)  # type: ignore[arg-type]
