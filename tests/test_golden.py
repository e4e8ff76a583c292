"""Golden datasets written by earlier format versions must stay readable (STYLE.md habit 9).

``tests/data/golden_v1`` (format v1: sha256 array checksums) and ``tests/data/golden_v2``
(format v2: xxh3_128 array checksums; written by ``tests/data/make_golden_v2.py``) were
converted from ``tests/data/golden_source.h5ad`` (``vocab="union"``, ``shard_size=16``,
``chunk_size=10``, ``obs_columns=("cell_type",)``). Never regenerate them: if a test here
fails, the format changed — bump ``format_version``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import xxhash

from scmf_loader.errors import ChecksumMismatchError
from scmf_loader.format import FORMAT_VERSION, manifest_bytes, read_manifest
from scmf_loader.format.integrity import check_dataset
from scmf_loader.opening import open_dataset
from scmf_shards.convert import convert_h5ad
from scmf_shards.verify import verify_dataset

DATA = Path(__file__).parent / "data"
GOLDEN = {
    1: (DATA / "golden_v1", "sha256:fd1b8cab37ddc48bcb5a5c2885cb27f8131a77968e8de6df39cd36b830f08182"),
    2: (DATA / "golden_v2", "sha256:379814c29a2a3deee75bc2ab2ff1a7197777be7208d8eaf502f01b7ae103798e"),
}
OPTIONS = {"vocab": "union", "shard_size": 16, "chunk_size": 10, "obs_columns": ("cell_type",)}


@pytest.mark.parametrize("version", sorted(GOLDEN))
def test_golden_reads_and_verifies(version: int) -> None:
    root, golden_id = GOLDEN[version]
    m = read_manifest(root)
    assert m.format_version == version
    assert m.dataset_id == golden_id
    algorithm = {1: "sha256", 2: "xxh3_128"}[version]
    assert all(set(a.checksums) == {algorithm} for s in m.shards for a in s.arrays.values())
    assert verify_dataset(root) == []  # checksums and full structure
    open_dataset(root, verify=True).close()
    # read and written again through the typed manifest: the same bytes
    assert manifest_bytes(m) == (root / "manifest.json").read_bytes()
    src = ad.read_h5ad(DATA / "golden_source.h5ad")
    dense_src = {c: np.asarray(src.X[i].todense()).ravel() for i, c in enumerate(src.obs_names)}
    seen = 0
    for s in m.shards:
        shard = ad.read_zarr(root / s.path)
        dense = shard.X.toarray()
        for i, cell in enumerate(shard.obs_names):
            assert np.array_equal(dense[i, 4:], dense_src[cell])
            seen += 1
    assert seen == src.n_obs == m.n_cells


@pytest.mark.parametrize("version", sorted(GOLDEN))
def test_golden_checksum_catches_a_flipped_byte(version: int, tmp_path: Path) -> None:
    """Each version's checksum is checked with its own algorithm: one flipped bit is caught."""
    root = tmp_path / "ds"
    shutil.copytree(GOLDEN[version][0], root)
    f = root / read_manifest(root).shards[1].path / "X" / "data" / "c" / "0"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0x01
    f.write_bytes(bytes(raw))
    algorithm = {1: "sha256", 2: "xxh3_128"}[version]
    with pytest.raises(ChecksumMismatchError, match=algorithm):
        check_dataset(root, read_manifest(root), level="checksum")


def test_v2_checksum_is_xxh3_128_of_the_chunk_file() -> None:
    """docs/format.md: the digest is XXH3-128 (seed 0) of the raw chunk file, 32 hex digits."""
    root, _ = GOLDEN[2]
    doc = json.loads((root / "manifest.json").read_text())
    for s in doc["shards"]:
        for a in s["arrays"].values():
            assert len(a["xxh3_128"]) == 32
            assert xxhash.xxh3_128_hexdigest((root / s["path"] / a["path"]).read_bytes()) == a["xxh3_128"]


def test_current_writer_reproduces_golden_v2_bytes(tmp_path: Path) -> None:
    assert FORMAT_VERSION == 2
    root, golden_id = GOLDEN[2]
    for limit in (None, "1KB"):  # one pass in memory, and the two-stage path through buckets
        out = tmp_path / f"again-{limit}"
        kwargs = {} if limit is None else {"memory_limit": limit}
        m = convert_h5ad([DATA / "golden_source.h5ad"], out, quiet=True, **OPTIONS, **kwargs)
        assert m.dataset_id == golden_id
        golden = read_manifest(root)
        for s, g in zip(m.shards, golden.shards, strict=True):
            assert {n: a.checksums for n, a in s.arrays.items()} == {n: a.checksums for n, a in g.arrays.items()}
            # X is ours byte for byte; obs/var encoding bytes belong to the installed anndata.
            for f in sorted((root / s.path / "X").rglob("*")):
                if f.is_file():
                    assert (out / s.path / f.relative_to(root / s.path)).read_bytes() == f.read_bytes(), f
        shutil.rmtree(out)
