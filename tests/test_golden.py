"""Golden datasets written by earlier format versions must stay readable (STYLE.md habit 9).

``tests/data/golden_v1`` was written by format v1 from ``tests/data/golden_source.h5ad``
(``vocab="union"``, ``shard_size=16``, ``chunk_size=10``, ``obs_columns=("cell_type",)``).
Never regenerate it: if a test here fails, the format changed — bump ``format_version``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np

from scmf_loader.format import manifest_bytes, read_manifest
from scmf_loader.store import open_dataset
from scmf_shards.convert import convert_h5ad
from scmf_shards.verify import verify_dataset

DATA = Path(__file__).parent / "data"
GOLDEN_V1 = DATA / "golden_v1"
GOLDEN_ID = "sha256:fd1b8cab37ddc48bcb5a5c2885cb27f8131a77968e8de6df39cd36b830f08182"


def test_golden_v1_reads_and_verifies() -> None:
    m = read_manifest(GOLDEN_V1)
    assert m.format_version == 1
    assert m.dataset_id == GOLDEN_ID
    assert verify_dataset(GOLDEN_V1) == []  # checksums and full structure
    open_dataset(GOLDEN_V1, verify=True).close()
    # read and written again through the typed manifest: the same bytes
    assert manifest_bytes(m) == (GOLDEN_V1 / "manifest.json").read_bytes()
    src = ad.read_h5ad(DATA / "golden_source.h5ad")
    dense_src = {c: np.asarray(src.X[i].todense()).ravel() for i, c in enumerate(src.obs_names)}
    seen = 0
    for s in m.shards:
        shard = ad.read_zarr(GOLDEN_V1 / s.path)
        dense = shard.X.toarray()
        for i, cell in enumerate(shard.obs_names):
            assert np.array_equal(dense[i, 4:], dense_src[cell])
            seen += 1
    assert seen == src.n_obs == m.n_cells


def test_current_writer_reproduces_golden_v1_bytes(tmp_path: Path) -> None:
    out = tmp_path / "again"
    m = convert_h5ad([DATA / "golden_source.h5ad"], out, vocab="union", shard_size=16, chunk_size=10,
                     obs_columns=("cell_type",), quiet=True)
    assert m.dataset_id == GOLDEN_ID
    for s in m.shards:
        # X is ours byte for byte; obs/var encoding bytes belong to the installed anndata.
        for f in sorted((GOLDEN_V1 / s.path / "X").rglob("*")):
            if f.is_file():
                assert (out / s.path / f.relative_to(GOLDEN_V1 / s.path)).read_bytes() == f.read_bytes(), f
    shutil.rmtree(out)
