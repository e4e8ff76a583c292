"""CensusDataset, offline: batches equal the source data; every cell once per epoch across
ranks and DataLoader workers; seeded block shuffle; the CellDataset batch and item formats;
lazy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from census_fixtures import CensusRoot

pytest_plugins = ["census_fixtures"]

FILTER = "tissue in ['lung', 'heart'] and is_primary_data == True"


def _mask(root: CensusRoot) -> np.ndarray:
    obs = root.adata.obs
    return np.asarray(obs["tissue"].isin(["lung", "heart"]) & obs["is_primary_data"], dtype=bool)


def _dataset(root: CensusRoot, **kwargs: Any) -> Any:
    from scmf_loader.census import CensusDataset

    kwargs.setdefault("obs_filter", FILTER)
    kwargs.setdefault("batch_size", 16)
    return CensusDataset(uri=root.uri, **kwargs)


@pytest.fixture(scope="module")
def reference(census_root: CensusRoot) -> dict[int, dict[int, float]]:
    """joinid -> {vocabulary id: count} over the human protein-coding vocabulary, from the
    AnnData that was ingested (independent of the Census code)."""
    from scmf_loader.vocab import GeneVocab

    ids = GeneVocab.human_protein_coding().encode(census_root.adata.var_names)
    x = census_root.adata.X.tocsr()
    out = {}
    for j in range(x.shape[0]):
        row = x[j]
        out[j] = {int(ids[c]): float(v) for c, v in zip(row.indices, row.data, strict=True) if ids[c] != 1}
    return out


def _check_batch(ds: Any, batch: Any, root: CensusRoot, reference: dict[int, dict[int, float]]) -> None:
    from scmf_loader.batch import CSRBatch

    assert isinstance(batch, CSRBatch)
    assert batch.n_genes == len(ds.vocab)
    indptr = batch.indptr.numpy()
    indices = batch.indices.numpy()
    values = batch.values.numpy()
    assert indptr[0] == 0
    assert indptr[-1] == len(indices) == len(values)
    obs = root.adata.obs
    x = root.adata.X.tocsr()
    for r, j in enumerate(batch.cell_ids.tolist()):
        idx, val = indices[indptr[r] : indptr[r + 1]], values[indptr[r] : indptr[r + 1]]
        assert np.all(np.diff(idx) > 0)  # sorted vocabulary ids
        assert dict(zip(idx.tolist(), val.tolist(), strict=True)) == reference[j]
        assert batch.stats["library_size"][r].item() == pytest.approx(float(x[j].sum()))
        for c in ds.obs_columns:
            assert ds.decode(c, batch.obs[c][r : r + 1]) == [obs[c].iloc[j]]


def test_batches_equal_the_source(census_root: CensusRoot, reference: dict[int, dict[int, float]]) -> None:
    ds = _dataset(census_root, seed=1)
    assert ds.census_version == census_root.build_date
    assert ds.n_cells == int(_mask(census_root).sum())
    seen: list[int] = []
    for batch in ds:
        _check_batch(ds, batch, census_root, reference)
        seen.extend(batch.cell_ids.tolist())
    assert len(ds) == -(-ds.n_cells // 16)
    assert sorted(seen) == np.flatnonzero(_mask(census_root)).tolist()  # each cell once


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_every_cell_once_across_ranks_and_workers(
    census_root: CensusRoot, world_size: int, num_workers: int
) -> None:
    expected = np.flatnonzero(_mask(census_root)).tolist()
    # drop_last=False: DistributedSampler semantics, the epoch padded by repeating its
    # first batches so that every rank reads as many batches
    per_rank: list[list[np.ndarray]] = []
    for rank in range(world_size):
        ds = _dataset(census_root, batch_size=10, seed=7, rank=rank, world_size=world_size)
        ds.set_epoch(2)
        mine = []
        for w in range(max(num_workers, 1)):
            mine.extend(b.cell_ids.numpy() for b in ds.batches(num_workers, w))
        assert len(mine) == len(ds)
        per_rank.append(mine)
    assert len({len(m) for m in per_rank}) == 1
    cells = np.concatenate([np.concatenate(m) for m in per_rank])
    n_batches = -(-len(expected) // 10)
    padding = len(per_rank[0]) * world_size - n_batches
    unique, counts = np.unique(cells, return_counts=True)
    assert unique.tolist() == expected
    assert (counts > 1).sum() <= padding * 10
    if padding == 0:
        assert counts.max() == 1
    # drop_last=True: no cell twice, the same number of batches on every rank
    cells_dl: list[int] = []
    lens = set()
    for rank in range(world_size):
        ds = _dataset(census_root, batch_size=10, seed=7, rank=rank, world_size=world_size, drop_last=True)
        lens.add(len(ds))
        for w in range(max(num_workers, 1)):
            cells_dl.extend(c for b in ds.batches(num_workers, w) for c in b.cell_ids.tolist())
    assert len(lens) == 1
    assert len(cells_dl) == len(set(cells_dl)) == len(expected) // 10 // world_size * world_size * 10


def test_dataloader_workers(census_root: CensusRoot) -> None:
    import torch

    ds = _dataset(census_root, batch_size=8, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    cells = [c for b in loader for c in b.cell_ids.tolist()]
    assert sorted(cells) == np.flatnonzero(_mask(census_root)).tolist()


def test_seeded_block_shuffle(census_root: CensusRoot) -> None:
    a = _dataset(census_root, seed=5, block_size=4)
    b = _dataset(census_root, seed=5, block_size=4)
    first = [c for batch in a for c in batch.cell_ids.tolist()]
    assert first == [c for batch in b for c in batch.cell_ids.tolist()]
    a.set_epoch(1)
    second = [c for batch in a for c in batch.cell_ids.tolist()]
    assert second != first
    assert sorted(second) == sorted(first)
    c = _dataset(census_root, seed=6, block_size=4)
    assert [x for batch in c for x in batch.cell_ids.tolist()] != first
    # a batch is batch_size // block_size runs of consecutive joinids of the query
    joinids = np.flatnonzero(_mask(census_root))
    pos = np.searchsorted(joinids, next(iter(a)).cell_ids.numpy())
    assert (np.diff(pos) != 1).sum() <= 16 // 4 - 1
    sequential = _dataset(census_root, shuffle=False)
    assert [x for batch in sequential for x in batch.cell_ids.tolist()] == joinids.tolist()


def test_single_cell_items(census_root: CensusRoot, reference: dict[int, dict[int, float]]) -> None:
    ds = _dataset(census_root, batch_size=None, seed=2, max_genes=3)
    items = list(ds)
    assert len(items) == len(ds) == ds.n_cells
    item = items[0]
    assert set(item) == {"expression", "gene_indices", "n_genes", "metadata"}
    assert item["n_genes"] == len(item["expression"]) <= 3
    assert set(item["metadata"]) == set(ds.obs_columns)
    # with drop_last, single-cell items come from full batches only
    dl = _dataset(census_root, obs_filter="soma_joinid >= 0", batch_size=None, seed=2,
                  drop_last=True)
    assert dl.n_cells == census_root.adata.n_obs == 400  # cells are read 256 at a time
    assert len(dl) == len(list(dl)) == 256
    full = _dataset(census_root, batch_size=None, seed=2)
    for cell in list(full)[:20]:
        genes = cell["gene_indices"].tolist()
        assert genes == sorted(genes)
        matches = [j for j, ref in reference.items() if ref == dict(zip(genes, cell["expression"].tolist(), strict=True))]
        assert matches


def test_same_batches_as_cell_dataset_over_the_conversion(
    census_root: CensusRoot, tmp_path: Path
) -> None:
    from scmf_loader.dataset import CellDataset
    from scmf_shards.sources.census import convert_census

    out = tmp_path / "ds"
    convert_census(out, uri=census_root.uri, obs_filter=FILTER, quiet=True, shard_size=50)
    cell_ds = CellDataset(out)
    census_ds = _dataset(census_root, shuffle=False, batch_size=1000)
    (streamed,) = list(census_ds)
    converted = cell_ds[np.arange(len(cell_ds))]
    assert cell_ds.vocab == census_ds.vocab
    by_name = {n: i for i, n in enumerate(cell_ds.cell_names(np.arange(len(cell_ds))))}
    s_ptr, c_ptr = streamed.indptr.numpy(), converted.indptr.numpy()
    for r, name in enumerate(census_ds.cell_names(streamed.cell_ids)):
        i = by_name[name]
        np.testing.assert_array_equal(
            streamed.indices[s_ptr[r] : s_ptr[r + 1]].numpy(), converted.indices[c_ptr[i] : c_ptr[i + 1]].numpy())
        np.testing.assert_array_equal(
            streamed.values[s_ptr[r] : s_ptr[r + 1]].numpy(), converted.values[c_ptr[i] : c_ptr[i + 1]].numpy())
        assert streamed.stats["library_size"][r].item() == converted.stats["library_size"][i].item()
        for c in census_ds.obs_columns:
            assert census_ds.decode(c, streamed.obs[c][r : r + 1]) == cell_ds.decode(c, converted.obs[c][i : i + 1])


def test_preprocessing_and_errors(census_root: CensusRoot) -> None:
    from scmf_loader.errors import ConfigurationError, InvalidInputError, VocabularyError

    seen = []

    def scale(batch: Any) -> Any:
        seen.append(len(batch))
        batch.values = batch.values * 2
        return batch

    ds = _dataset(census_root, preprocessing=scale, shuffle=False)
    plain = _dataset(census_root, shuffle=False)
    for a, b in zip(ds, plain, strict=True):
        np.testing.assert_array_equal(a.values.numpy(), 2 * b.values.numpy())
    assert sum(seen) == ds.n_cells
    with pytest.raises(InvalidInputError, match="obs has no column"):
        _dataset(census_root, obs_columns=["no_such_column"])
    with pytest.raises(VocabularyError, match="none of its 2 genes"):
        _dataset(census_root, var_filter="feature_id in ['ENSG00000999998', 'ENSG00000999999']")
    with pytest.raises(InvalidInputError, match="selects no cells"):
        _dataset(census_root, obs_filter="tissue == 'brain'")
    with pytest.raises(ConfigurationError, match="rank"):
        _dataset(census_root, rank=2, world_size=2)
    with pytest.raises(ConfigurationError, match="epoch"):
        ds.set_epoch(-1)


def test_union_vocabulary(census_root: CensusRoot) -> None:
    ds = _dataset(census_root, gene_vocab="union", shuffle=False)
    assert len(ds.vocab) == 4 + census_root.adata.n_vars
    batch = next(iter(ds))
    assert batch.n_genes == len(ds.vocab)


def test_shipped_vocabulary_by_name(census_root: CensusRoot) -> None:
    from scmf_loader.vocab import GeneVocab

    ds = _dataset(census_root, gene_vocab="human+mouse", shuffle=False)
    assert ds.vocab == GeneVocab.from_name("human+mouse")
    batch = next(iter(ds))
    assert batch.n_genes == len(ds.vocab)
    genes = ds.vocab.decode(batch.indices[: batch.indptr[1]].tolist())
    ref = set(ds.vocab.decode(ds.vocab.encode(census_root.adata.var_names).tolist()))
    assert genes
    assert set(genes) <= ref


def test_imports_stay_lazy() -> None:
    code = (
        "import sys, scmf_loader\n"
        "assert 'scmf_loader.census' not in sys.modules\n"
        "import scmf_loader.census\n"
        "heavy = [m for m in ('tiledbsoma', 'cellxgene_census', 'anndata', 'click', 'scipy', "
        "'scmf_shards') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_io_batches_do_not_change_the_batches(census_root: CensusRoot) -> None:
    one = list(_dataset(census_root, seed=4, block_size=4, io_batches=1))
    many = list(_dataset(census_root, seed=4, block_size=4, io_batches=3))
    assert len(one) == len(many)
    for a, b in zip(one, many, strict=True):
        for name in ("indptr", "indices", "values", "cell_ids"):
            np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy())
        for c in a.obs:
            np.testing.assert_array_equal(a.obs[c].numpy(), b.obs[c].numpy())
        np.testing.assert_array_equal(a.stats["library_size"].numpy(), b.stats["library_size"].numpy())


def test_library_size_covers_all_genes_with_a_var_filter(
    census_root: CensusRoot, reference: dict[int, dict[int, float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # library_size is each cell's total over ALL genes of the Census (what normalize_total
    # gives on the source), not over the genes a var filter selects
    keep = list(census_root.adata.var_names[:20])
    ds = _dataset(census_root, var_filter=f"feature_id in {keep}", shuffle=False, batch_size=32)
    assert ds.query.n_genes == 20
    x = census_root.adata.X.tocsr()
    selected = census_root.adata[:, keep].X.tocsr()
    full_sums = np.asarray(x.sum(axis=1)).ravel()
    batches = list(ds)
    for batch in batches:
        ids = batch.cell_ids.numpy()
        np.testing.assert_allclose(batch.stats["library_size"].numpy(), full_sums[ids], rtol=0, atol=1e-6)
    ids = np.concatenate([b.cell_ids.numpy() for b in batches])
    library = np.concatenate([b.stats["library_size"].numpy() for b in batches])
    assert np.all(library > np.asarray(selected[ids].sum(axis=1)).ravel())  # not the filtered genes' sum
    # a root without the obs column raw_sum: whole rows of X["raw"] are summed instead
    monkeypatch.setattr(ds.query, "obs_columns_available",
                        tuple(c for c in ds.query.obs_columns_available if c != "raw_sum"))
    np.testing.assert_array_equal(
        np.concatenate([b.stats["library_size"].numpy() for b in ds]), library)
    np.testing.assert_array_equal(ds.query.library_sizes(np.sort(ids)), full_sums[np.sort(ids)])
    # the values and genes are still only the filtered ones
    first = batches[0]
    ptr = first.indptr.numpy()
    for r, j in enumerate(first.cell_ids.tolist()):
        genes = set(first.indices[ptr[r] : ptr[r + 1]].tolist())
        assert genes <= set(ds.vocab.encode(keep).tolist())
        assert genes == {g for g in reference[j] if g in set(ds.vocab.encode(keep).tolist())}


# ---- lifetimes of the SOMA handles and TileDB contexts ---------------------------------------
def test_one_context_per_process_and_deterministic_close(census_root: CensusRoot) -> None:
    from scmf_loader.census.query import CensusQuery, CensusSpec
    from scmf_loader.errors import InvalidInputError

    a = _dataset(census_root).query
    b = _dataset(census_root, obs_filter="tissue == 'lung'").query
    context = a.experiment().context
    assert b.experiment().context is context  # not one context (and thread pools) per root
    # a query whose construction fails closes what it opened before raising
    opened: list[Any] = []
    real = CensusQuery._open_root

    def spy(self: Any, version: Any) -> Any:
        opened.append(real(self, version))
        return opened[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CensusQuery, "_open_root", spy)
        with pytest.raises(InvalidInputError, match="selects no cells"):
            CensusQuery(CensusSpec(uri=census_root.uri, obs_filter="tissue == 'brain'"))
    assert len(opened) == 1
    assert opened[0].closed
    # close() closes the handles; the query reopens them on its next read
    root = a._handles.root
    a.close()
    assert root.closed
    indptr, _, _ = a.read(a.obs_joinids[:5])
    assert indptr.size == 6
    a.close()
    b.close()


def test_copies_share_handles_until_the_last_closes(census_root: CensusRoot) -> None:
    import pickle

    from scmf_loader.census import handles

    ds = _dataset(census_root, obs_filter="tissue == 'liver'")
    blob = pickle.dumps(ds.query)
    one, two = pickle.loads(blob), pickle.loads(blob)
    ids = one.obs_joinids[:8]
    ref = ds.query.read(ids)
    for q in (one, two):
        for got, want in zip(q.read(ids), ref, strict=True):
            np.testing.assert_array_equal(got, want)
    assert one._handles is two._handles  # one open root for the copies in this process
    root = one._handles.root
    one.close()
    assert not root.closed  # two still uses it
    np.testing.assert_array_equal(two.read(ids)[2], ref[2])
    two.close()
    assert root.closed
    # evicted cache entries are closed once unused
    copies = []
    for tissue in ("lung", "heart", "blood", "liver", "heart left ventricle"):
        q = pickle.loads(pickle.dumps(_dataset(census_root, obs_filter=f"tissue == '{tissue}'").query))
        q.experiment()
        copies.append(q)
    first_root = copies[0]._handles.root
    assert len(handles._PROCESS_CACHE) <= handles._CACHE_SIZE
    assert not first_root.closed  # evicted, but copies[0] still uses it
    copies[0].close()
    assert first_root.closed
    for q in copies[1:]:
        q.close()
    ds.query.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_never_uses_the_parent_handles(census_root: CensusRoot) -> None:
    import os
    import pickle
    import time

    ds = _dataset(census_root, shuffle=False)
    parent_exp = ds.query.experiment()
    parent_ctx = parent_exp.context
    expected = ds.query.read(ds.query.obs_joinids[:10])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running any of the parent's cleanup
        code = 1
        try:
            exp = ds.query.experiment()
            got = ds.query.read(ds.query.obs_joinids[:10])
            same = all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
            os.write(w, pickle.dumps((exp is not parent_exp, exp.context is not parent_ctx, same)))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung")
        time.sleep(0.05)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    assert os.waitstatus_to_exitcode(status) == 0
    assert pickle.loads(report) == (True, True, True)
    # the parent's handles are untouched by the child
    assert ds.query.experiment() is parent_exp
    assert not parent_exp.closed
    for got, want in zip(ds.query.read(ds.query.obs_joinids[:10]), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    ds.query.close()
