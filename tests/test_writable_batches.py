"""Zero-copy batches are safe to write: in-place torch ops neither crash, nor change the shard
files, nor leak into later reads of the same cells (the next epoch sees the file's values)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scmf_loader import CellDataLoader, CellDataset
from scmf_shards.verify import verify_dataset

IN_PLACE_OPS = {
    "log1p_": lambda t: t.log1p_(),
    "div_": lambda t: t.div_(3.0),
    "mul_": lambda t: t.mul_(2.0),
    "clamp_": lambda t: t.clamp_(max=1.0),
    "add_": lambda t: t.add_(1.0),
    "fill_": lambda t: t.fill_(7.0),
    "zero_": lambda t: t.zero_(),
    "masked_fill_": lambda t: t.masked_fill_(t > 1, 0.0),
    "index_put_": lambda t: t.index_put_((torch.arange(min(3, len(t))),), torch.tensor(5.0)),
}


def _csr_reference(ds: CellDataset, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    b = ds.get_range(lo, hi)
    return b.indices.numpy().copy(), b.values.numpy().copy()


@pytest.mark.parametrize("op", sorted(IN_PLACE_OPS))
def test_in_place_op_on_a_zero_copy_batch(loader_dataset: Path, op: str) -> None:
    ds = CellDataset(loader_dataset)
    ref_idx, ref_val = _csr_reference(ds, 10, 20)
    batch = ds[list(range(10, 20))]
    assert batch.values.dtype.is_floating_point
    IN_PLACE_OPS[op](batch.values)
    batch.indices.zero_()
    again = ds[list(range(10, 20))]  # the same cells read again: the file's values
    np.testing.assert_array_equal(again.values.numpy(), ref_val)
    np.testing.assert_array_equal(again.indices.numpy(), ref_idx)
    verify_dataset(loader_dataset)


def test_writes_do_not_leak_into_later_epochs(loader_dataset: Path) -> None:
    ds = CellDataset(loader_dataset)
    expected = {}
    loader = CellDataLoader(ds, batch_size=32, num_workers=0, drop_last=False)
    for batch in loader:
        for i, cid in enumerate(batch.cell_ids.tolist()):
            lo, hi = int(batch.indptr[i]), int(batch.indptr[i + 1])
            expected[cid] = batch.values[lo:hi].clone()
        batch.values.log1p_()
    loader.set_epoch(1)
    seen = 0
    for batch in loader:
        for i, cid in enumerate(batch.cell_ids.tolist()):
            lo, hi = int(batch.indptr[i]), int(batch.indptr[i + 1])
            torch.testing.assert_close(batch.values[lo:hi], expected[cid], rtol=0, atol=0)
            seen += 1
        batch.values.div_(2)
    assert seen == len(ds)
    verify_dataset(loader_dataset)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("output", ["csr", "padded", "dense"])
def test_every_output_is_writable(loader_dataset: Path, output: str, num_workers: int) -> None:
    ds = CellDataset(loader_dataset)
    loader = CellDataLoader(ds, batch_size=64, num_workers=num_workers, output=output,
                            max_genes=64, drop_last=False)
    for batch in loader:
        tensors = [batch.values, batch.indices] if output == "csr" else [
            v for v in batch.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        for t in tensors:
            t.clamp_(max=1) if t.is_floating_point() else t.clamp_(max=0)
        if output == "csr":
            batch.values.log1p_()
    verify_dataset(loader_dataset)


def test_log1p_in_place_does_not_kill_the_process(loader_dataset: Path) -> None:
    """The issue's exact reproduction, in a fresh interpreter so a SIGSEGV would show."""
    code = (
        "from scmf_loader import CellDataset\n"
        f"ds = CellDataset({str(loader_dataset)!r})\n"
        "c = ds[list(range(10, 20))]\n"
        "c.values.log1p_()\n"
        "print('ok', float(c.values.sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
    verify_dataset(loader_dataset)
