"""The converter's direct reads of an .h5ad CSR matrix (scmf_shards.sources.anndata_source):
memory maps where the file stores the arrays contiguously, h5py reads into reused scratch
buffers where it chunks them; both against anndata's own reading of the same rows, and the
streamed shard writer (format.writer.StreamedArray, kernels.fill_rows) against held arrays."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from scmf_loader.errors import InvalidInputError
from scmf_shards.kernels import block_bounds, fill_rows
from scmf_shards.sources.anndata_source import AnnDataSource, _plain_dataset


def _h5ad(path: Path, contiguous: bool, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(300, 40, density=0.3, format="csr", dtype=np.float32, random_state=seed)
    x.data = rng.integers(1, 50, x.nnz).astype(np.float32)
    x.indices = x.indices.astype(np.int32)
    a = ad.AnnData(x)
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(a.n_vars)]
    a.write_h5ad(path)
    if contiguous:  # what h5py (or other writers) produce: no chunks, no filters
        with h5py.File(path, "r+") as f:
            for k in ("indptr", "indices", "data"):
                values = f["X"][k][...]
                del f["X"][k]
                f["X"].create_dataset(k, data=values)
    return a


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("reuse", [True, False])
def test_rows_equal_anndata(tmp_path: Path, contiguous: bool, reuse: bool) -> None:
    path = tmp_path / "a.h5ad"
    a = _h5ad(path, contiguous)
    with h5py.File(path) as f:
        assert all(_plain_dataset(f["X"][k]) for k in ("indptr", "indices", "data")) == contiguous
    src = AnnDataSource(path)
    for start, stop in [(0, 300), (17, 18), (50, 50), (123, 299)]:
        m = src.read_rows(start, stop, reuse=reuse).matrix
        ref = a.X[start:stop]
        assert m.shape == ref.shape
        np.testing.assert_array_equal(m.indptr, ref.indptr)
        np.testing.assert_array_equal(m.indices, ref.indices)
        np.testing.assert_array_equal(m.data, ref.data)
        if contiguous and stop > start:
            assert not m.data.flags.writeable  # a read-only map of the file, not a copy


def test_scratch_rows_are_reused_buffers(tmp_path: Path) -> None:
    """With reuse, a chunked file's rows land in the same buffer each read (no fresh memory)."""
    path = tmp_path / "a.h5ad"
    a = _h5ad(path, contiguous=False)
    src = AnnDataSource(path)
    first = src.read_rows(0, 200, reuse=True).matrix  # the larger read first: the buffer fits the next
    address = first.data.__array_interface__["data"][0]
    second = src.read_rows(100, 200, reuse=True).matrix
    assert second.data.__array_interface__["data"][0] == address
    np.testing.assert_array_equal(second.data, a.X[100:200].data)


def test_malformed_indptr_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "a.h5ad"
    _h5ad(path, contiguous=True)
    with h5py.File(path, "r+") as f:
        ip = f["X"]["indptr"][...]
        ip[-1] = ip[-1] + 1000  # points past the data
        f["X"]["indptr"][...] = ip
    with pytest.raises(InvalidInputError, match=r"a\.h5ad.*indptr"):
        AnnDataSource(path).read_rows(250, 300, reuse=True)


@pytest.mark.parametrize("block", [1, 14, 15, 64, 10_000])
def test_fill_rows_blocks_equal_a_plain_gather(block: int) -> None:
    rng = np.random.default_rng(block)
    sources = [rng.random(n).astype(np.float32) for n in (500, 20, 300)]
    piece = rng.integers(0, 3, 200)
    length = rng.integers(0, 15, 200)
    length[7] = 40  # a row longer than some blocks
    sources[piece[7]] = np.concatenate([sources[piece[7]], rng.random(40).astype(np.float32)])
    start = np.array([rng.integers(0, sources[p].size - n + 1) for p, n in zip(piece, length, strict=True)])
    expected = np.concatenate([sources[p][s : s + n] for p, s, n in zip(piece, start, length, strict=True)])
    indptr = np.concatenate([[0], np.cumsum(length)])
    by_source = [np.flatnonzero(piece == k) for k in range(3)]
    bounds = block_bounds(indptr, block)
    assert bounds[0] == 0
    assert bounds[-1] == piece.size
    assert (np.diff(bounds) > 0).all()
    sizes = indptr[bounds[1:]] - indptr[bounds[:-1]]
    assert sizes.max() < 2 * block + length.max()
    buf = np.empty(2 * block + length.max(), np.float32)
    out = []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        w = fill_rows(sources, by_source, start, indptr, int(r0), int(r1), buf)
        out.append(buf[:w].copy())
    np.testing.assert_array_equal(np.concatenate(out), expected)
    with pytest.raises(InvalidInputError, match="more than the buffer"):
        fill_rows(sources, by_source, start, indptr, 0, piece.size, np.empty(3, np.float32))


def test_prefetched_checksum_is_the_files_and_a_changed_file_is_read_again(tmp_path: Path) -> None:
    import hashlib

    from scmf_shards.sources import base

    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 100_000)
    base.prefetch_fingerprints([str(f), "memory://not/local.h5ad", str(tmp_path)])
    assert base.source_fingerprint(str(f)) == (100_000, hashlib.sha256(b"a" * 100_000).hexdigest())
    base.prefetch_fingerprints([str(f)])
    f.write_bytes(b"b" * 50)  # changed after the prefetch started: not its result
    assert base.source_fingerprint(str(f)) == (50, hashlib.sha256(b"b" * 50).hexdigest())
