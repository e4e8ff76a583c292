"""Dataset versions: ``append`` reuses BASE's shards untouched, lineage, diff, verify of
reused shards, and the inputs ``append`` must refuse."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hpc_genes, write_counts_h5ad

from scmf_loader.errors import ConfigurationError, DatasetExistsError, VocabularyError
from scmf_loader.format import read_manifest

SIZES = (300, 260, 240, 200, 180)  # three BASE inputs, two appended


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """BASE from three inputs, NEW = BASE + two inputs (one with a new cell type)."""
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.versions import append_dataset

    d = tmp_path_factory.mktemp("versions")
    genes = hpc_genes()
    rng = np.random.default_rng(5)
    srcs = []
    for i, n in enumerate(SIZES):
        obs = {"cell_type": rng.choice(["T cell", "B cell"] + (["new type"] if i == 4 else []), n).tolist()}
        srcs.append(write_counts_h5ad(d / f"s{i}.h5ad", n, genes[20 * i : 20 * i + 150], seed=i, obs=obs))
    base = d / "v1"
    convert_h5ad(srcs[:3], base, shard_size=200, obs_columns=("cell_type",), quiet=True)
    before = _snapshot(base)
    new = d / "v2"
    manifest = append_dataset(base, srcs[3:], new)
    return {"dir": d, "srcs": srcs, "base": base, "new": new, "manifest": manifest, "before": before}


def test_base_untouched_and_only_new_shards_written(versions: dict) -> None:
    base, new = versions["base"], versions["new"]
    assert _snapshot(base) == versions["before"]  # bytes and mtimes of every BASE file
    bm, nm = read_manifest(base), read_manifest(new)
    assert [s.to_dict() for s in nm.shards[: len(bm.shards)]] == [s.to_dict() for s in bm.shards]
    for s in bm.shards:  # reused: a link to BASE's shard, nothing written under NEW
        link = new / s.path
        assert link.is_symlink()
        assert link.resolve() == (base / s.path).resolve()
    added = nm.shards[len(bm.shards) :]
    assert sum(s.n_cells for s in added) == sum(SIZES[3:])
    assert len(added) == -(-sum(SIZES[3:]) // 200)  # BASE's shard size
    assert all(not (new / s.path).is_symlink() for s in added)
    assert nm.n_cells == sum(SIZES)
    assert (new / "vocab.json").read_bytes() == (base / "vocab.json").read_bytes()


def test_manifest_records_parent_and_lineage(versions: dict) -> None:
    base, new = versions["base"], versions["new"]
    raw = json.loads((new / "manifest.json").read_text())
    bm = read_manifest(base)
    assert raw["parent"]["dataset_id"] == bm.dataset_id
    assert (new / raw["parent"]["location"]).resolve() == base.resolve()
    assert [e["dataset_id"] for e in raw["lineage"]] == [bm.dataset_id, raw["dataset_id"]]
    assert raw["lineage"][1]["sources"] == ["s3.h5ad", "s4.h5ad"]
    assert raw["dataset_id"] != bm.dataset_id
    # categories grow by appending: BASE's codes keep their meaning
    cats = {c["name"]: c["categories"] for c in raw["obs_columns"]}
    base_cats = {c.name: list(c.categories) for c in bm.obs_columns}
    assert cats["source"] == [*base_cats["source"], "s3.h5ad", "s4.h5ad"]
    assert cats["cell_type"][: len(base_cats["cell_type"])] == base_cats["cell_type"]
    assert "new type" in cats["cell_type"]


def test_dataset_id_is_content_defined(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.versions import append_dataset

    again = append_dataset(versions["base"], versions["srcs"][3:], tmp_path / "again", link="copy")
    nm = versions["manifest"]
    assert again.dataset_id == nm.dataset_id
    assert [s.to_dict() for s in again.shards] == [s.to_dict() for s in nm.shards]  # same bytes
    other = append_dataset(versions["base"], versions["srcs"][4:], tmp_path / "other")
    assert other.dataset_id != nm.dataset_id


def _reference(srcs: list[Path], vocab_path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Every input cell as a dense row over the vocabulary and its cell type (anndata)."""
    import anndata as ad

    from scmf_loader.vocab import GeneVocab

    vocab = GeneVocab.from_file(vocab_path)
    out = {}
    for p in srcs:
        a = ad.read_h5ad(p)
        dense = np.zeros((a.n_obs, len(vocab)), dtype=np.float32)
        dense[:, vocab.encode(a.var_names)] = a.X.toarray()
        out.update(zip(a.obs_names, zip(dense, a.obs["cell_type"].astype(str), strict=True), strict=True))
    return out


def test_shards_read_with_anndata(versions: dict) -> None:
    import anndata as ad

    new = versions["new"]
    ref = _reference(versions["srcs"], new / "vocab.json")
    seen = []
    for s in read_manifest(new).shards:
        a = ad.read_zarr(new / s.path)
        assert a.n_obs == s.n_cells
        for name, row, ct in zip(a.obs_names, a.X.toarray(), a.obs["cell_type"].astype(str), strict=True):
            np.testing.assert_array_equal(row, ref[name][0])
            assert ct == ref[name][1]
        seen.extend(a.obs_names)
    assert sorted(seen) == sorted(ref)


def test_cell_dataset_yields_every_cell_once_per_epoch(versions: dict) -> None:
    from scmf_loader.dataloader import CellDataLoader
    from scmf_loader.dataset import CellDataset

    new = versions["new"]
    ds = CellDataset(new, verify=True)
    ref = _reference(versions["srcs"], new / "vocab.json")
    loader = CellDataLoader(ds, batch_size=64, num_workers=0, shuffle=True, drop_last=False)
    for _ in range(2):  # two epochs
        names = []
        for batch in loader:
            ids = batch.cell_ids.numpy()
            dense = batch.to_dense().numpy()
            cell_names = ds.cell_names(ids)
            types = ds.decode("cell_type", batch.obs["cell_type"])
            for name, row, ct in zip(cell_names, dense, types, strict=True):
                np.testing.assert_array_equal(row, ref[name][0])
                assert ct == ref[name][1]
            names.extend(cell_names)
        assert len(names) == len(ref)
        assert sorted(names) == sorted(ref)


def test_log_diff_register_cli(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.cli import main

    base, new = versions["base"], versions["new"]
    runner = CliRunner()
    out = runner.invoke(main, ["log", str(new)])
    assert out.exit_code == 0, out.output
    bm = read_manifest(base)
    assert out.output.index(read_manifest(new).dataset_id) < out.output.index(bm.dataset_id)  # newest first
    assert "s3.h5ad, s4.h5ad" in out.output
    out = runner.invoke(main, ["diff", str(base), str(new), "--json"])
    assert out.exit_code == 0, out.output
    diff = json.loads(out.output)
    assert diff["relation"] == "b descends from a"
    assert diff["cells"] == [sum(SIZES[:3]), sum(SIZES)]
    assert diff["shards"] == {"shared": len(bm.shards), "only_a": 0, "only_b": len(read_manifest(new).shards) - len(bm.shards)}
    assert [Path(p).name for p in diff["sources"]["only_b"]] == ["s3.h5ad", "s4.h5ad"]
    assert diff["vocabulary"]["same"]
    assert diff["preprocessing"] == {}
    reg = tmp_path / "reg.yaml"
    out = runner.invoke(main, ["register", str(new), "--name", "atlas", "--version", "v2", "--registry", str(reg)])
    assert out.exit_code == 0, out.output
    from scmf_loader.registry import resolve

    assert resolve("atlas@v2", reg).dataset_id == read_manifest(new).dataset_id


def test_verify_fails_on_child_when_a_parent_shard_is_deleted(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.cli import main
    from scmf_shards.verify import verify_dataset
    from scmf_shards.versions import append_dataset, reference_problems

    base = tmp_path / "base"
    shutil.copytree(versions["base"], base)
    child = tmp_path / "child"
    append_dataset(base, versions["srcs"][3:], child)
    assert verify_dataset(child) == []
    assert reference_problems(child) == []
    shutil.rmtree(base / "shards" / "000001.zarr")
    problems = reference_problems(child)
    assert any("000001.zarr" in p and "parent" in p for p in problems)
    out = CliRunner().invoke(main, ["verify", "-q", str(child)])
    assert out.exit_code == 1
    assert "000001.zarr" in out.output
    assert "reused from its parent" in out.output


def test_hard_links_share_bytes_without_the_parent_directory(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.verify import verify_dataset
    from scmf_shards.versions import append_dataset

    base = tmp_path / "base"
    shutil.copytree(versions["base"], base)
    child = tmp_path / "child"
    append_dataset(base, versions["srcs"][3:], child, link="hard")
    f = "shards/000000.zarr/X/data/c/0"
    assert os.path.samefile(base / f, child / f)
    shutil.rmtree(base)  # a hard-linked version stands alone
    assert verify_dataset(child) == []


def test_append_refuses_another_organism(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.versions import append_dataset

    mouse = write_counts_h5ad(tmp_path / "mouse.h5ad", 50, [f"ENSMUSG{i:011d}" for i in range(1, 80)], seed=9)
    with pytest.raises(VocabularyError, match=r"mouse.h5ad.*mus_musculus.*homo_sapiens"):
        append_dataset(versions["base"], [mouse], tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_append_refuses_genes_outside_the_vocabulary(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.versions import append_dataset

    odd = write_counts_h5ad(tmp_path / "odd.h5ad", 50, [f"NOT_A_GENE_{i}" for i in range(40)], seed=9)
    with pytest.raises(VocabularyError, match="odd.h5ad"):
        append_dataset(versions["base"], [odd], tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_append_refuses_scran_and_an_existing_output(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.versions import append_dataset

    srcs = versions["srcs"]
    scran = tmp_path / "scran"
    convert_h5ad(srcs[:2], scran, shard_size=300, quiet=True, preprocessing={"normalize": "scran"})
    with pytest.raises(ConfigurationError, match=r"scran.*scran size factors"):
        append_dataset(scran, srcs[3:], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetExistsError, match="v2"):
        append_dataset(versions["base"], srcs[3:], versions["new"])
    with pytest.raises(DatasetExistsError, match="inside BASE"):
        append_dataset(versions["base"], srcs[3:], versions["base"] / "sub")


@pytest.mark.parametrize("bake", [True, False])
def test_append_applies_base_preprocessing_and_hvgs(versions: dict, tmp_path: Path, bake: bool) -> None:
    """HVGs selected on BASE's cells and the normalisation (baked, or recorded for the
    loader): the new cells come out as BASE's pipeline makes them, checked against numpy."""
    import anndata as ad

    from scmf_loader.dataset import CellDataset
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.versions import append_dataset

    srcs = versions["srcs"]
    base = tmp_path / "base"
    convert_h5ad(srcs[:2], base, shard_size=200, quiet=True, preprocessing={"hvg_selection": 30, "bake": bake})
    bm = read_manifest(base)
    child = append_dataset(base, srcs[3:], tmp_path / "child")
    assert dict(child.preprocessing) == dict(bm.preprocessing)
    assert child.cell_stats == bm.cell_stats
    ds = CellDataset(tmp_path / "child")  # applies the recorded pipeline when not baked
    hvg = np.zeros(len(ds.vocab), dtype=bool)
    hvg[ds.vocab.encode(bm.preprocessing["hvg_genes"])] = True
    expected = {}
    for p in srcs[3:]:
        a = ad.read_h5ad(p)
        x = a.X.toarray().astype(np.float64)
        x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
        dense = np.zeros((a.n_obs, len(ds.vocab)))
        dense[:, ds.vocab.encode(a.var_names)] = x
        dense[:, ~hvg] = 0
        expected.update(zip(a.obs_names, dense, strict=True))
    first_new = int(ds.shard_offsets[len(bm.shards)])
    ids = np.arange(first_new, len(ds))
    batch = ds[ids]
    assert set(np.unique(batch.indices.numpy()).tolist()) <= set(np.flatnonzero(hvg).tolist())
    got = batch.to_dense().numpy()
    for name, row in zip(ds.cell_names(ids), got, strict=True):
        np.testing.assert_allclose(row, expected[name], rtol=1e-5, atol=1e-6)
    assert len(ids) == sum(SIZES[3:])


def test_an_interrupted_append_is_finished_by_a_rerun(versions: dict, tmp_path: Path) -> None:
    from scmf_shards.versions import WORK_DIR, append_dataset

    out = tmp_path / "out"
    (out / WORK_DIR).mkdir(parents=True)  # what a killed append leaves: its scratch ...
    (out / "shards" / "000005.zarr").mkdir(parents=True)  # ... and a half-written shard
    manifest = append_dataset(versions["base"], versions["srcs"][3:], out)
    assert manifest.dataset_id == versions["manifest"].dataset_id
    assert not (out / WORK_DIR).exists()
