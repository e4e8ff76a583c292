"""Opening a dataset directory: manifest and vocabulary, lazy memory maps, size and
checksum checks, bounded file descriptors, pickling."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scmf_loader.errors import (
    ChecksumMismatchError,
    FormatVersionError,
    ManifestNotFoundError,
    ObsColumnNotFoundError,
    ShardCorruptError,
    ShardNotFoundError,
    ShardSizeError,
)
from scmf_loader.format import (
    ArrayEntry,
    Manifest,
    ShardEntry,
    other_files_digest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from scmf_loader.format._common import file_checksum
from scmf_loader.format.integrity import shard_ok
from scmf_loader.opening import open_dataset
from scmf_loader.vocab import GeneVocab
from scmf_shards.verify import verify_dataset


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def copy(loader_dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(loader_dataset, out)
    return out


def test_open_reads_manifest_vocab_and_offsets(loader_dataset: Path) -> None:
    store = open_dataset(loader_dataset)
    assert store.n_cells == 1437
    assert store.n_shards == 8
    assert store.shard_offsets[0] == 0
    assert store.shard_offsets[-1] == 1437
    assert np.all(np.diff(store.shard_offsets) == [s.n_cells for s in store.manifest.shards])
    assert len(store.vocab) == store.n_genes
    assert store.obs_columns == ("source", "cell_type", "batch")
    assert store.categories["source"] == ("la.h5ad", "lb.h5ad")
    assert store.locate(np.array([0, 179, 1436])).tolist()[0] == 0
    assert store.locate(np.array([1436]))[0] == 7


def test_memory_maps_equal_the_shard_read_by_anndata(loader_dataset: Path) -> None:
    store = open_dataset(loader_dataset)
    assert not store._maps  # nothing mapped on open
    for s in range(store.n_shards):
        ref = ad.read_zarr(store.shard_dir(s))
        arrays = store.csr(s)
        np.testing.assert_array_equal(arrays.indptr, ref.X.indptr)
        np.testing.assert_array_equal(arrays.indices, ref.X.indices)
        np.testing.assert_array_equal(arrays.data, ref.X.data)
        assert not arrays.data.flags.writeable
        np.testing.assert_array_equal(store.obs_codes(s, "cell_type"), ref.obs["cell_type"].cat.codes)
        np.testing.assert_array_equal(store.cell_stat(s, "library_size"), ref.obs["library_size"])
        assert list(store.cell_names(s)) == list(ref.obs_names)


def test_open_holds_no_file_and_maps_stay_bounded(loader_dataset: Path) -> None:
    before = _fds()
    store = open_dataset(loader_dataset, max_open_shards=2)
    assert _fds() == before
    for s in range(store.n_shards):
        store.csr(s)
        store.obs_codes(s, "batch")
    assert len(store._maps) == 2
    assert len(store._obs) == 2
    assert _fds() <= before + 2 * 3
    store.close()
    assert _fds() == before


def test_pickle_drops_maps(loader_dataset: Path) -> None:
    store = open_dataset(loader_dataset)
    store.csr(0)
    clone = pickle.loads(pickle.dumps(store))
    assert not clone._maps
    np.testing.assert_array_equal(clone.csr(0).data, store.csr(0).data)


def test_many_shards_open_fast_and_never_exhaust_descriptors(tmp_path: Path) -> None:
    """2,000 one-cell shards (hard links to one set of files): open is per-shard work only,
    and reading every shard keeps at most max_open_shards maps (3 descriptors each)."""
    n = 2000
    proto = tmp_path / "proto"
    arrays = {
        "data": np.array([1.0, 2.0], dtype=np.float32),
        "indices": np.array([4, 6], dtype=np.int32),
        "indptr": np.array([0, 2], dtype=np.int64),
    }
    for name, a in arrays.items():
        (proto / name).mkdir(parents=True)
        a.tofile(proto / name / "0")
    entries = {
        name: ArrayEntry(path=f"X/{name}/c/0", nbytes=a.nbytes, sha256=sha256_file(proto / name / "0"), dtype=str(a.dtype))
        for name, a in arrays.items()
    }
    root = tmp_path / "many"
    shards = []
    for i in range(n):
        rel = f"shards/{i:06d}.zarr"
        for name in arrays:
            d = root / rel / "X" / name / "c"
            d.mkdir(parents=True)
            os.link(proto / name / "0", d / "0")
        shards.append(ShardEntry(path=rel, n_cells=1, nnz=2, arrays=entries))
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(5)])
    vocab.save(root / "vocab.json")
    write_manifest(root, Manifest(
        dataset_id="sha256:test", n_cells=n, n_genes=len(vocab), nnz=2 * n, dtype="float32",
        vocab={"path": "vocab.json", "sha256": vocab.sha256()}, preprocessing={}, sources=[],
        obs_columns=[], shuffle={}, shards=shards,
    ))
    before = _fds()
    store = open_dataset(root, max_open_shards=16)
    assert store.n_shards == n
    assert store.shard_offsets.nbytes == (n + 1) * 8
    for s in range(n):
        assert store.csr(s).indices.tolist() == [4, 6]
    assert _fds() <= before + 16 * 3


def test_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestNotFoundError, match="no manifest"):
        open_dataset(tmp_path)
    with pytest.raises(ManifestNotFoundError, match="no such dataset directory"):
        open_dataset(tmp_path / "missing")


def test_unknown_format_version(copy: Path) -> None:
    doc = json.loads((copy / "manifest.json").read_text())
    doc["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(FormatVersionError, match="99"):
        open_dataset(copy)


def test_missing_shard(copy: Path) -> None:
    shutil.rmtree(copy / "shards" / "000003.zarr")
    with pytest.raises(ShardNotFoundError, match="000003.zarr"):
        open_dataset(copy)


def test_missing_array_file(copy: Path) -> None:
    (copy / "shards" / "000002.zarr" / "X" / "indices" / "c" / "0").unlink()
    with pytest.raises(ShardNotFoundError, match="000002.zarr/X/indices/c/0"):
        open_dataset(copy)


def test_truncated_shard(copy: Path) -> None:
    f = copy / "shards" / "000005.zarr" / "X" / "data" / "c" / "0"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(ShardSizeError, match="shorter"):
        open_dataset(copy)


def test_corrupt_bytes_caught_by_verify_only(copy: Path) -> None:
    f = copy / "shards" / "000001.zarr" / "X" / "data" / "c" / "0"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0xFF
    f.write_bytes(bytes(raw))
    open_dataset(copy)  # sizes agree: the cheap check passes
    with pytest.raises(ChecksumMismatchError, match="000001.zarr/X/data/c/0"):
        open_dataset(copy, verify=True)


def test_verify_passes_on_intact_dataset(loader_dataset: Path) -> None:
    open_dataset(loader_dataset, verify=True)


def test_in_place_write_on_a_mapped_array_leaves_the_file_unchanged(copy: Path) -> None:
    """The maps are copy-on-write: a torch in-place op on a zero-copy view (torch ignores
    numpy's read-only flag) must neither crash nor change the shard file."""
    import torch

    store = open_dataset(copy)
    f = store.shard_dir(0) / store.manifest.shards[0].arrays["data"].path
    before = f.read_bytes()
    arrays = store.csr(0)
    assert not arrays.data.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "array is not writable"
        t = torch.from_numpy(arrays.data[:50])
    t.log1p_()
    t.fill_(12345)
    assert float(arrays.data[0]) == 12345  # the write went to this process's private pages
    assert f.read_bytes() == before
    assert file_checksum(f, "xxh3_128") == store.manifest.shards[0].arrays["data"].xxh3_128
    fresh = open_dataset(copy).csr(0)
    np.testing.assert_array_equal(fresh.data, np.frombuffer(before, dtype=fresh.data.dtype))


# ---- the one integrity checker: structure, error types, resume, vocabulary -------------------
def _reseal(root: Path, shard: int) -> None:
    """Record the shard's current bytes in the manifest, so only structure checks can object."""
    m = read_manifest(root)
    entry = m.shards[shard]
    base = root / entry.path
    arrays = {n: dataclasses.replace(a, sha256=None, xxh3_128=file_checksum(base / a.path, "xxh3_128"))
              for n, a in entry.arrays.items()}
    shards = list(m.shards)
    shards[shard] = dataclasses.replace(entry, arrays=arrays, other_files=other_files_digest(base))
    write_manifest(root, dataclasses.replace(m, shards=shards))


def _raw(root: Path, shard: int, name: str) -> np.memmap:
    entry = read_manifest(root).shards[shard]
    dtype = {"indptr": np.int64, "indices": np.int32, "data": np.float32}[name]
    return np.memmap(root / entry.path / entry.arrays[name].path, dtype=dtype, mode="r+")


def test_bad_indptr_range_is_a_corrupt_shard_not_a_checksum_error(copy: Path) -> None:
    indptr = _raw(copy, 3, "indptr")
    indptr[-1] += 1
    indptr.flush()
    del indptr
    store = open_dataset(copy)  # sizes agree: open is stat-only
    with pytest.raises(ShardCorruptError, match=r"000003.zarr: X/indptr ends at \d+ \(position \d+\); the manifest says nnz") as info:
        store.csr(3)
    assert not isinstance(info.value, ChecksumMismatchError)
    store.csr(2)  # the other shards read on


def _unsorted(root: Path) -> tuple[str, int]:
    indptr = np.array(_raw(root, 2, "indptr"))
    row = int(np.flatnonzero(np.diff(indptr) >= 2)[0])
    indices = _raw(root, 2, "indices")
    a = int(indptr[row])
    indices[a], indices[a + 1] = indices[a + 1], indices[a]
    indices.flush()
    return rf"not strictly increasing in row {row} at X/indices\[{a + 1}\]", 2


def _out_of_range(root: Path) -> tuple[str, int]:
    indices = _raw(root, 2, "indices")
    n_genes = read_manifest(root).n_genes
    indices[7] = n_genes
    indices.flush()
    return rf"X/indices\[7\] is {n_genes}, outside the vocabulary \[0, {n_genes}\)", 2


def _obs_code(root: Path) -> tuple[str, int]:
    import zarr

    codes = zarr.open_group(str(root / "shards" / "000004.zarr"), mode="r+")["obs"]["cell_type"]["codes"]
    codes[5] = 99
    return r"obs/cell_type/codes\[5\] is 99, outside the 4 categories", 4


@pytest.mark.parametrize("corrupt", [_unsorted, _out_of_range, _obs_code])
def test_verify_finds_structure_errors_behind_valid_checksums(copy: Path, corrupt) -> None:
    message, shard = corrupt(copy)
    _reseal(copy, shard)
    with pytest.raises(ShardCorruptError, match=message):
        open_dataset(copy, verify=True)
    problems = verify_dataset(copy)
    assert len(problems) == 1
    assert re.search(message, problems[0])
    assert f"{shard:06d}.zarr" in problems[0]
    store = open_dataset(copy)  # open is stat-only; a shard's first read checks indptr and the index range
    if corrupt is _out_of_range:
        with pytest.raises(ShardCorruptError, match=message):
            store.csr(shard)
    else:
        store.csr(shard)
    if corrupt is _obs_code:
        with pytest.raises(ShardCorruptError, match=message):
            store.obs_codes(shard, "cell_type")


def test_obs_column_errors_have_their_own_types(copy: Path) -> None:
    store = open_dataset(copy)
    with pytest.raises(ObsColumnNotFoundError, match="no obs column 'donor'") as info:
        store.obs_codes(0, "donor")
    assert isinstance(info.value, KeyError)
    assert "'donor'" in str(info.value)
    with pytest.raises(ObsColumnNotFoundError, match="no cell stat"):
        store.cell_stat(0, "size_factor")
    shutil.rmtree(copy / "shards" / "000001.zarr" / "obs" / "batch")
    with pytest.raises(ShardCorruptError, match="000001.zarr: obs has no column 'batch'") as corrupt:
        store.obs_codes(1, "batch")
    assert not isinstance(corrupt.value, ShardNotFoundError)


def test_shard_ok_is_the_resume_check(copy: Path) -> None:
    m = read_manifest(copy)
    assert all(shard_ok(copy, e) for e in m.shards)
    f = copy / m.shards[1].path / "X" / "data" / "c" / "0"
    raw = bytearray(f.read_bytes())
    raw[0] ^= 1
    f.write_bytes(bytes(raw))
    (copy / m.shards[2].path / "obs" / "zarr.json").write_text("{}")
    shutil.rmtree(copy / m.shards[3].path)
    assert [shard_ok(copy, e) for e in m.shards[:5]] == [True, False, False, False, True]


def test_the_vocabulary_is_checked_under_one_key_its_content_hash(copy: Path) -> None:
    doc = json.loads((copy / "vocab.json").read_text())
    (copy / "vocab.json").write_text(json.dumps(doc, indent=4))  # other bytes, same content
    open_dataset(copy, verify=True)
    assert verify_dataset(copy) == []
    doc["tokens"][5] = "ENSG99999999999"
    (copy / "vocab.json").write_text(json.dumps(doc))
    with pytest.raises(ChecksumMismatchError, match="vocab.json: checksum mismatch: vocabulary hash"):
        open_dataset(copy)
    assert any("vocab.json: checksum mismatch" in p for p in verify_dataset(copy))


# ---- zarr-free reads of numeric obs columns ---------------------------------------------------
@pytest.mark.parametrize(("dtype", "chunks", "compressed"), [("int8", 7, True), ("<f8", 10, False),
                                                             (">i4", 3, True), ("bool", 5, True)])
def test_plain_reader_equals_zarr(tmp_path: Path, dtype: str, chunks: int, compressed: bool) -> None:
    import zarr
    from zarr.codecs import BytesCodec, ZstdCodec

    from scmf_loader.format._plain import read_plain_array

    values = np.random.default_rng(0).integers(-50, 50, 23).astype(dtype)
    endian = "big" if dtype.startswith(">") else "little"
    z = zarr.create_array(str(tmp_path / "a"), shape=(23,), chunks=(chunks,), dtype=values.dtype, fill_value=5,
                          serializer=BytesCodec(endian=endian), compressors=[ZstdCodec()] if compressed else None)
    z[...] = values
    (tmp_path / "a" / "c" / "1").unlink(missing_ok=True)  # a missing chunk reads as the fill value
    expected = zarr.open_array(str(tmp_path / "a"), mode="r")[...]
    got = read_plain_array(tmp_path / "a")
    assert got is not None
    assert got.dtype == expected.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, expected)
    assert got[chunks] == np.array(5).astype(got.dtype)


def test_plain_reader_leaves_the_rest_to_zarr(tmp_path: Path, loader_dataset: Path) -> None:
    import zarr

    from scmf_loader.format._plain import read_plain_array

    shard = loader_dataset / "shards" / "000000.zarr"
    assert read_plain_array(shard / "obs" / "_index") is None  # strings
    zarr.create_array(str(tmp_path / "m"), shape=(4, 3), chunks=(2, 3), dtype="int32")[...] = 1
    assert read_plain_array(tmp_path / "m") is None  # two dimensions
    assert read_plain_array(tmp_path / "missing") is None
    f = tmp_path / "trunc"
    zarr.create_array(str(f), shape=(8,), chunks=(8,), dtype="int32", compressors=None)[...] = 3
    (f / "c" / "0").write_bytes(b"\0" * 5)  # not a whole chunk: zarr reports it
    assert read_plain_array(f) is None
    codes = zarr.open_group(str(shard), mode="r")["obs"]["cell_type"]["codes"][...]
    np.testing.assert_array_equal(read_plain_array(shard / "obs" / "cell_type" / "codes"), codes)


def test_sampled_residency_sees_evicted_pages(tmp_path: Path) -> None:
    from scmf_loader.store import _resident_fraction

    f = tmp_path / "big"
    f.write_bytes(b"\1" * (4096 * 4000))
    a = np.memmap(f, dtype=np.uint8, mode="r")  # never touched: mincore reports the page cache
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        while os.read(fd, 1 << 20):  # read: every page cached
            pass
        assert _resident_fraction(a, samples=64) == _resident_fraction(a) == 1.0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean, unmapped pages: dropped
    finally:
        os.close(fd)
    assert _resident_fraction(a, samples=64) < 1.0
    assert _resident_fraction(a) < 1.0
