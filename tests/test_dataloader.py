"""CellDataLoader: epochs, outputs, zero copy, real worker processes (fork and spawn),
resume, errors, and the light import of scmf_loader."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scmf_loader import BatchAwareSampler, CellDataLoader, CellDataset, CSRBatch
from scmf_loader.errors import ConfigurationError


@pytest.fixture(scope="module")
def ds(loader_dataset: Path) -> CellDataset:
    return CellDataset(loader_dataset)


def _ids(loader: CellDataLoader) -> list[np.ndarray]:
    out = []
    for b in loader:
        ids = b.cell_ids if isinstance(b, CSRBatch) else b["cell_ids"]
        out.append(ids.numpy().copy())
    return out


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


class Double:
    """A picklable preprocessing step (doubles the values)."""

    def apply_batch(self, batch: CSRBatch) -> CSRBatch:
        return CSRBatch(batch.indptr, batch.indices, batch.values * 2, batch.cell_ids, batch.n_genes, batch.obs, batch.stats)


def test_epoch_covers_every_cell_with_source_contents(ds: CellDataset, loader_reference: dict[str, np.ndarray]) -> None:
    loader = CellDataLoader(ds, batch_size=64, num_workers=0, drop_last=False, seed=3)
    seen = []
    for b in loader:
        ids = b.cell_ids.numpy()
        np.testing.assert_array_equal(b.to_dense().numpy(), np.stack([loader_reference[c] for c in ds.cell_names(ids)]))
        seen.append(ids)
    assert len(seen) == len(loader) == -(-len(ds) // 64)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(ds)))


@pytest.mark.parametrize("workers", [0, 2])
def test_contiguous_batches_view_the_memory_map(ds: CellDataset, workers: int) -> None:
    loader = CellDataLoader(ds, batch_size=32, num_workers=workers, seed=1)
    views = 0
    for b in loader:
        ids = b.cell_ids.numpy()
        shard = int(np.searchsorted(ds.shard_offsets, ids[0], side="right")) - 1
        contiguous = np.all(np.diff(ids) == 1) and ids[-1] < ds.shard_offsets[shard + 1]
        maps = ds.store.csr(shard)
        assert np.shares_memory(b.values.numpy(), maps.data) == bool(contiguous)
        views += bool(contiguous)
    assert views >= len(loader) - 2 * ds.n_shards


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 2-core machine
@pytest.mark.parametrize("drop_last", [False, True])
def test_real_workers_match_one_process(ds: CellDataset, drop_last: bool) -> None:
    for rank in range(2):
        kw: dict[str, Any] = {"batch_size": 24, "drop_last": drop_last, "seed": 7, "rank": rank, "world_size": 2, "block_size": 8}
        one = CellDataLoader(ds, num_workers=0, **kw)
        ref = [_ids(one), _ids(one)]
        for workers in (1, 2, 3):
            loader = CellDataLoader(ds, num_workers=workers, **kw)
            assert _same(_ids(loader), ref[0])
            assert _same(_ids(loader), ref[1])  # persistent workers, next epoch


def test_spawned_workers_padded_output(ds: CellDataset) -> None:
    kw: dict[str, Any] = {"batch_size": 50, "seed": 2, "output": "padded", "max_genes": 12, "truncation": "random"}
    ref = list(CellDataLoader(ds, num_workers=0, **kw))
    got = list(CellDataLoader(ds, num_workers=1, multiprocessing_context="spawn", **kw))
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        for key in ("gene_indices", "expression", "attention_mask", "cell_ids"):
            assert torch.equal(a[key], b[key])
        assert a["gene_indices"].shape == (50, 13)


def test_outputs_equal_the_batch_converters(ds: CellDataset) -> None:
    for output in ("padded", "dense"):
        loader = CellDataLoader(ds, batch_size=40, num_workers=0, output=output, max_genes=10, seed=4)
        for out in loader:
            b = ds[out["cell_ids"].numpy()]
            if output == "dense":
                assert torch.equal(out["expression"], b.to_dense())
            else:
                ref = b.to_padded(10)
                assert all(torch.equal(out[k], ref[k]) for k in ref)
            assert torch.equal(out["obs"]["cell_type"], b.obs["cell_type"])


def test_preprocessing_runs_in_workers(loader_dataset: Path, ds: CellDataset) -> None:
    doubled = CellDataset(loader_dataset, preprocessing=Double())
    for b in CellDataLoader(doubled, batch_size=100, num_workers=2, seed=5):
        assert torch.equal(b.values, ds[b.cell_ids.numpy()].values * 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_random_points(ds: CellDataset, workers: int) -> None:
    kw: dict[str, Any] = {"batch_size": 30, "seed": 9, "num_workers": workers, "drop_last": False, "block_size": 10}
    ref = CellDataLoader(ds, **kw)
    epochs = [_ids(ref), _ids(ref)]
    rng = np.random.default_rng(workers)
    for k in sorted({0, len(epochs[0]), *rng.integers(1, len(epochs[0]), size=1).tolist()}):
        first = CellDataLoader(ds, **kw)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # a state survives a JSON checkpoint
        resumed = CellDataLoader(ds, **kw)
        resumed.load_state_dict(state)
        assert _same(_ids(resumed), epochs[0][k:])
        assert _same(_ids(resumed), epochs[1])


def test_epochs_advance_and_set_epoch_replays(ds: CellDataset) -> None:
    loader = CellDataLoader(ds, batch_size=64, num_workers=0)
    e0, e1 = _ids(loader), _ids(loader)
    assert loader.epoch == 2
    assert not _same(e0, e1)
    loader.set_epoch(0)
    assert _same(_ids(loader), e0)
    it = iter(loader)  # a broken-off epoch restarts from its start on the next iteration
    next(it)
    assert _same(_ids(loader), e1)


def test_batch_aware_sampler_in_the_loader(ds: CellDataset) -> None:
    sampler = BatchAwareSampler(ds, "batch", 30, balanced=True, drop_last=True)
    loader = CellDataLoader(ds, sampler=sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler)
    assert all(len(b) == 30 for b in batches)


def test_the_loaders_drop_last_applies_to_a_given_sampler(ds: CellDataset) -> None:
    """The issue's case: a BatchAwareSampler (drop_last=False by default) in a loader with
    the default drop_last=True gave [64 x 8, 47]; the loader's drop_last now applies."""
    sampler = BatchAwareSampler(ds, "batch", 64)
    sizes = [len(b) for b in CellDataLoader(ds, sampler=sampler, num_workers=0)]
    assert sizes == [64] * (len(ds) // 64)
    assert sampler.drop_last is False  # the given sampler is not changed
    sizes = [len(b) for b in CellDataLoader(ds, sampler=sampler, num_workers=0, drop_last=False)]
    assert sizes == [64] * (len(ds) // 64) + [len(ds) % 64]
    keep = BatchAwareSampler(ds, "batch", 64, drop_last=True)
    assert CellDataLoader(ds, sampler=keep, num_workers=0).sampler is keep


def test_pin_memory_without_cuda_is_silent(ds: CellDataset) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = CellDataLoader(ds, batch_size=64, num_workers=1, pin_memory=True)
        assert len(list(loader)) == len(loader)
    assert loader.pin_memory == torch.cuda.is_available()


def test_errors(ds: CellDataset) -> None:
    with pytest.raises(ConfigurationError, match="output"):
        CellDataLoader(ds, output="coo")
    with pytest.raises(ConfigurationError, match="max_genes"):
        CellDataLoader(ds, output="padded", max_genes=0)
    with pytest.raises(ConfigurationError, match="rank"):
        CellDataLoader(ds, rank=2, world_size=2)
    state = CellDataLoader(ds, batch_size=64, num_workers=0).state_dict()
    with pytest.raises(ConfigurationError, match="batch_size"):
        CellDataLoader(ds, batch_size=32, num_workers=0).load_state_dict(state)


def test_import_loads_no_converter_dependency() -> None:
    """``import scmf_loader`` and its loader classes add none of the converter's libraries to
    what numpy, torch and zarr load themselves (torch itself imports tqdm through torch.hub)."""
    heavy = ["anndata", "dask", "click", "tqdm", "scanpy", "scipy", "h5py", "pandas"]
    code = (
        "import sys, json\n"
        "import numpy, torch, zarr\n"
        "base = set(sys.modules)\n"
        "import scmf_loader\n"
        "from scmf_loader import BatchAwareSampler, CellDataLoader, CellDataset, CSRBatch, open_dataset\n"
        f"print(json.dumps([[m for m in {heavy!r} if m in base], [m for m in {heavy!r} if m in set(sys.modules) - base]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    baseline, added = json.loads(out.strip().splitlines()[-1])
    assert added == [], f"import scmf_loader loaded {added}"
    assert not {"anndata", "dask", "click", "scanpy"} & set(baseline)
