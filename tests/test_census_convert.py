"""Census conversion, offline: a local Census-shaped root converts to the same shards as the
equivalent .h5ad; provenance in the manifest; every bad query fails before anything is
written; the CLI and the seed's YAML."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from census_fixtures import CensusRoot

pytest_plugins = ["census_fixtures"]

BUILD_DATE = "2025-11-08"  # census_fixtures.BUILD_DATE

FILTER = "tissue in ['lung', 'heart'] and is_primary_data == True"
OPTS: dict[str, Any] = {"shard_size": 64, "chunk_size": 50, "seed": 3, "quiet": True}


def _mask(root: CensusRoot) -> np.ndarray:
    obs = root.adata.obs
    return np.asarray(obs["tissue"].isin(["lung", "heart"]) & obs["is_primary_data"], dtype=bool)


def _read_cells(out: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]], list[str]]:
    """cell id -> (vocabulary ids, values, obs) over every shard, and the cell order."""
    import anndata as ad

    cells: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]] = {}
    order: list[str] = []
    for shard in sorted((out / "shards").iterdir()):
        a = ad.read_zarr(shard)
        x = a.X.tocsr()
        obs = a.obs.drop(columns=["source"]).astype(object)
        for i, name in enumerate(a.obs_names):
            row = x[i]
            cells[name] = (row.indices.copy(), row.data.copy(), obs.iloc[i].to_dict())
            order.append(name)
    return cells, order


@pytest.fixture(scope="module")
def converted(census_root: CensusRoot, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The lung/heart primary cells converted from the Census root and from the .h5ad."""
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.sources.census import DEFAULT_OBS_COLUMNS, convert_census

    tmp = tmp_path_factory.mktemp("census_convert")
    h5 = census_root.write_h5ad(tmp / "selection.h5ad", _mask(census_root))
    m_census = convert_census(tmp / "census", uri=census_root.uri, obs_filter=FILTER, **OPTS)
    m_h5ad = convert_h5ad([h5], tmp / "h5ad", obs_columns=DEFAULT_OBS_COLUMNS, **OPTS)
    return {"tmp": tmp, "census": m_census, "h5ad": m_h5ad}


def test_open_soma_opens_the_fixture_root(census_root: CensusRoot) -> None:
    import cellxgene_census

    with cellxgene_census.open_soma(uri=census_root.uri) as census:
        assert set(census) == {"census_data", "census_info"}
        summary = census["census_info"]["summary"].read().concat().to_pandas()
        assert dict(zip(summary["label"], summary["value"], strict=True))["census_build_date"] == BUILD_DATE
        exp = census["census_data"]["homo_sapiens"]
        assert {"soma_joinid", "dataset_id", "assay", "cell_type", "tissue", "tissue_general",
                "disease", "donor_id", "sex", "is_primary_data", "raw_sum", "nnz"} <= set(exp.obs.schema.names)
        assert {"feature_id", "feature_name", "feature_length"} <= set(exp.ms["RNA"].var.schema.names)
        assert "raw" in exp.ms["RNA"].X


def test_census_conversion_equals_h5ad_conversion(census_root: CensusRoot, converted: dict[str, Any]) -> None:
    tmp = converted["tmp"]
    m_census, m_h5ad = converted["census"], converted["h5ad"]
    assert m_census.n_cells == m_h5ad.n_cells == int(_mask(census_root).sum())
    assert m_census.nnz == m_h5ad.nnz
    a, order_a = _read_cells(tmp / "census")
    b, order_b = _read_cells(tmp / "h5ad")
    assert set(a) == set(b) == {str(j) for j in np.flatnonzero(_mask(census_root))}
    for cell, (idx, val, obs) in a.items():
        idx_b, val_b, obs_b = b[cell]
        np.testing.assert_array_equal(idx, idx_b)
        np.testing.assert_array_equal(val, val_b)
        assert obs == obs_b
    # one source of the same size on both sides: the same shuffle plan, cell for cell
    assert order_a == order_b
    assert [s.nnz for s in m_census.shards] == [s.nnz for s in m_h5ad.shards]


def test_census_values_match_the_ingested_counts(census_root: CensusRoot, converted: dict[str, Any]) -> None:
    from scmf_loader.vocab import GeneVocab

    vocab = GeneVocab.human_protein_coding()
    ids = vocab.encode(census_root.adata.var_names)
    x = census_root.adata.X.tocsr()
    cells, _ = _read_cells(converted["tmp"] / "census")
    for cell, (idx, val, obs) in list(cells.items())[:50]:
        row = x[int(cell)]
        expected = {int(ids[c]): v for c, v in zip(row.indices, row.data, strict=True) if ids[c] != 1}
        assert dict(zip(idx.tolist(), val.tolist(), strict=True)) == expected
        assert obs["tissue"] in ("lung", "heart")
        assert obs["cell_type"] == census_root.adata.obs["cell_type"].iloc[int(cell)]


def test_manifest_records_census_provenance(census_root: CensusRoot, converted: dict[str, Any]) -> None:
    doc = json.loads((converted["tmp"] / "census" / "manifest.json").read_text())
    (src,) = doc["sources"]
    n = int(_mask(census_root).sum())
    assert src["kind"] == "cellxgene_census"
    assert src["census_version"] == BUILD_DATE
    assert src["census_schema_version"] == "2.1.0"
    assert src["uri"] == census_root.uri
    assert src["organism"] == "homo_sapiens"
    assert src["obs_filter"] == FILTER
    assert src["cell_count"] == src["n_cells"] == n
    assert src["genes_matched"] == 80
    assert src["genes_dropped"] == 2
    assert len(src["obs_joinids_sha256"]) == 64
    assert [c["name"] for c in doc["obs_columns"]] == [
        "source", "cell_type", "tissue", "assay", "disease", "donor_id", "dataset_id"]


def test_dataset_id_depends_on_the_query_not_the_alias(census_root: CensusRoot, tmp_path: Path) -> None:
    from scmf_shards.sources.census import CensusSource

    pinned = CensusSource(uri=census_root.uri, obs_filter=FILTER, census_version=BUILD_DATE)
    alias = CensusSource(uri=census_root.uri, obs_filter=FILTER, census_version="stable")
    other = CensusSource(uri=census_root.uri, obs_filter="tissue == 'lung'")
    assert alias.census_version == BUILD_DATE
    assert pinned.fingerprint() == alias.fingerprint()
    assert pinned.fingerprint() != other.fingerprint()
    assert "time" not in json.dumps(pinned.fingerprint())


def test_filters_mapping_equals_the_filter_expression(census_root: CensusRoot) -> None:
    from scmf_shards.sources.census import CensusSource

    by_map = CensusSource(
        uri=census_root.uri,
        filters={"tissue": ["lung", "heart"], "is_primary_data": True, "assay": ["10x 3' v3", "Smart-seq2"]},
    )
    by_expr = CensusSource(
        uri=census_root.uri,
        obs_filter=FILTER + " and assay in [\"10x 3' v3\", 'Smart-seq2']",
    )
    np.testing.assert_array_equal(by_map.query.obs_joinids, by_expr.query.obs_joinids)
    obs = census_root.adata.obs
    mask = _mask(census_root) & np.asarray(obs["assay"].isin(["10x 3' v3", "Smart-seq2"]))
    np.testing.assert_array_equal(by_map.query.obs_joinids, np.flatnonzero(mask))


def test_var_filter_and_pickled_source(census_root: CensusRoot) -> None:
    from scmf_shards.sources.census import CensusSource

    keep = list(census_root.adata.var_names[:5])
    src = CensusSource(uri=census_root.uri, obs_filter=FILTER, var_filter=f"feature_id in {keep}")
    assert src.n_genes == 5
    assert sorted(src.genes) == sorted(keep)
    blob = pickle.dumps(src)
    assert len(blob) < 20_000  # no joinid arrays, no open handle
    copy = pickle.loads(blob)
    a = src.read_rows(3, 40, ["tissue"])
    b = copy.read_rows(3, 40, ["tissue"])
    assert (a.matrix != b.matrix).nnz == 0
    np.testing.assert_array_equal(a.cell_ids, b.cell_ids)
    x = census_root.adata[:, keep].X.tocsr()
    rows = [int(c) for c in a.cell_ids]
    np.testing.assert_array_equal(a.matrix.toarray(), x[rows].toarray())
    assert list(a.obs["tissue"]) == list(census_root.adata.obs["tissue"].iloc[rows])


# ---- errors: clear, and before anything is written ----------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"organism": "danio_rerio"}, "unknown organism 'danio_rerio'"),
        ({"obs_filter": "tissue == 'brain'"}, "selects no cells"),
        ({"obs_filter": "tissue in ['lung'"}, "malformed obs filter"),
        ({"obs_filter": "no_such_column == 1"}, "malformed obs filter"),
        ({"var_filter": "feature_id == 'ENSG_NOPE'"}, "selects no genes"),
        ({"filters": {"tissue": {"nested": 1}}}, "expected a string, number, boolean"),
        ({"census_version": "2024-07-01"}, "not the requested census_version 2024-07-01"),
        ({"obs_columns": ("no_such_column",)}, "obs has no column(s) ['no_such_column']"),
    ],
)
def test_bad_query_fails_before_writing(
    census_root: CensusRoot, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    from scmf_loader.errors import InvalidInputError
    from scmf_shards.sources.census import convert_census

    out = tmp_path / "out"
    kwargs = {"uri": census_root.uri, **kwargs}
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        convert_census(out, **kwargs, quiet=True)
    assert not out.exists()


def test_unreachable_uri(tmp_path: Path) -> None:
    from scmf_loader.errors import InvalidInputError
    from scmf_shards.sources.census import convert_census

    pytest.importorskip("tiledbsoma", reason="tiledbsoma is not installed")
    with pytest.raises(InvalidInputError, match="cannot open the Census root"):
        convert_census(tmp_path / "out", uri=str(tmp_path / "no_census_here"), quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        ("offline", "cannot be resolved: the Census release directory is unreachable"),
        ("unknown", "is not a Census release"),
    ],
)
def test_version_that_cannot_be_resolved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: str, message: str
) -> None:
    pytest.importorskip("tiledbsoma", reason="tiledbsoma is not installed")
    import cellxgene_census
    import requests

    from scmf_loader.errors import InvalidInputError
    from scmf_shards.sources.census import convert_census

    def directory(version: str) -> dict[str, Any]:
        if exc == "offline":
            raise requests.ConnectionError("Failed to resolve 'census.cellxgene.cziscience.com'")
        raise ValueError(f"Unable to locate Census version: {version}.")

    monkeypatch.setattr(cellxgene_census, "get_census_version_description", directory)
    with pytest.raises(InvalidInputError, match=re.escape(message)) as info:
        convert_census(tmp_path / "out", census_version="stable", quiet=True)
    assert "'stable'" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_undated_root_needs_a_concrete_version(census_root_undated: CensusRoot) -> None:
    from scmf_loader.errors import InvalidInputError
    from scmf_shards.sources.census import CensusSource

    with pytest.raises(InvalidInputError, match="cannot be resolved offline"):
        CensusSource(uri=census_root_undated.uri)
    with pytest.raises(InvalidInputError, match="cannot be resolved offline"):
        CensusSource(uri=census_root_undated.uri, census_version="latest")
    src = CensusSource(uri=census_root_undated.uri, census_version="2024-07-01")
    assert src.census_version == "2024-07-01"
    assert src.n_cells == 30


# ---- CLI and YAML --------------------------------------------------------------------------
def test_cli_census_command(census_root: CensusRoot, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scmf_loader.format import read_manifest
    from scmf_shards.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "census", "--output", str(out), "--organism", "homo_sapiens", "--census-version", BUILD_DATE,
        "--obs-filter", FILTER, "--uri", census_root.uri, "--obs-columns", "cell_type,tissue",
        "--shard-size", "100",
    ])
    assert result.exit_code == 0, result.output
    assert f"from Census {BUILD_DATE} homo_sapiens" in result.output
    m = read_manifest(out)
    assert m.n_cells == int(_mask(census_root).sum())
    assert [c.name for c in m.obs_columns] == ["source", "cell_type", "tissue"]


def test_cli_census_error_is_one_line(census_root: CensusRoot, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scmf_shards.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "census", "-o", str(out), "--uri", census_root.uri, "--organism", "mus_musculus", "-q"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert "unknown organism 'mus_musculus'" in result.output
    assert not out.exists()


def test_seed_yaml_config(census_root: CensusRoot, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scmf_loader.format import read_manifest
    from scmf_shards.cli import main

    root = tmp_path / "census_copy"
    shutil.copytree(census_root.uri, root)  # relative URIs inside: the copy opens too
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        "  source: cellxgene_census\n"
        "  organism: homo_sapiens\n"
        "  uri: census_copy\n"  # relative to the config file
        "  filters:\n"
        "    tissue: [lung, heart]\n"
        "    is_primary_data: true\n"
        "    assay: [\"10x 3' v3\", \"Smart-seq2\"]\n"
        f"  census_version: \"{BUILD_DATE}\"\n"
        "  output: shards/lung_heart\n"
        "  gene_vocab: human_protein_coding\n"
        "  shard_size: 100\n"
        "  max_genes: 2048\n"
        "  num_workers: 4\n"
    )
    result = CliRunner().invoke(main, ["census", "--config", str(config), "-q"])
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "shards" / "lung_heart")
    obs = census_root.adata.obs
    expected = _mask(census_root) & np.asarray(obs["assay"].isin(["10x 3' v3", "Smart-seq2"]))
    assert m.n_cells == int(expected.sum())
    src = m.sources[0].extra
    assert src["filters"] == {"tissue": ["lung", "heart"], "is_primary_data": True,
                              "assay": ["10x 3' v3", "Smart-seq2"]}
    assert src["census_version"] == BUILD_DATE
    assert src["uri"] == str(root)
    assert [c.name for c in m.obs_columns][1:] == [
        "cell_type", "tissue", "assay", "disease", "donor_id", "dataset_id"]


def test_config_for_another_source_is_refused(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scmf_shards.cli import main

    config = tmp_path / "data.yaml"
    config.write_text("data:\n  source: local\n  paths: [a.h5ad]\n  output: out\n")
    result = CliRunner().invoke(main, ["census", "--config", str(config)])
    assert result.exit_code == 1
    assert "use 'scmf-convert h5ad'" in result.output


def test_cli_preprocessing_options_match_the_h5ad_path(census_root: CensusRoot, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scmf_loader.format import read_manifest
    from scmf_shards.cli import main

    h5 = census_root.write_h5ad(tmp_path / "selection.h5ad", _mask(census_root))
    common = ["--shard-size", "64", "--chunk-size", "50", "--hvg", "20", "--bake",
              "--obs-columns", "cell_type,tissue", "-q"]
    r1 = CliRunner().invoke(main, ["census", "-o", str(tmp_path / "c"), "--uri", census_root.uri,
                                   "--obs-filter", FILTER, *common])
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(main, ["h5ad", str(h5), "-o", str(tmp_path / "h"), *common])
    assert r2.exit_code == 0, r2.output
    m1, m2 = read_manifest(tmp_path / "c"), read_manifest(tmp_path / "h")
    assert m1.preprocessing == m2.preprocessing
    assert m1.preprocessing["n_hvg_genes"] == 20
    assert m1.preprocessing["baked"]
    a, order_a = _read_cells(tmp_path / "c")
    b, order_b = _read_cells(tmp_path / "h")
    assert order_a == order_b
    for cell, (idx, val, _) in a.items():
        np.testing.assert_array_equal(idx, b[cell][0])
        np.testing.assert_array_equal(val, b[cell][1])


def test_var_filter_conversion_keeps_library_size_over_all_genes(census_root: CensusRoot, tmp_path: Path) -> None:
    """``scmf-convert census --var-filter``: values only for the selected genes, but each
    cell's library_size is its total over all Census genes (as normalize_total on the source)."""
    import anndata as ad

    from scmf_shards.sources.census import convert_census

    keep = list(census_root.adata.var_names[:20])
    m = convert_census(tmp_path / "ds", uri=census_root.uri, obs_filter=FILTER,
                       var_filter=f"feature_id in {keep}", **OPTS)
    full = np.asarray(census_root.adata.X.sum(axis=1)).ravel()
    part = np.asarray(census_root.adata[:, keep].X.sum(axis=1)).ravel()
    seen = 0
    for shard in sorted((tmp_path / "ds" / "shards").glob("*.zarr")):
        a = ad.read_zarr(shard)
        ids = np.array([int(c) for c in a.obs_names])
        np.testing.assert_allclose(a.obs["library_size"].to_numpy(), full[ids], rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a.X.sum(axis=1)).ravel(), part[ids], rtol=1e-6)
        assert (full[ids] > part[ids]).any()
        seen += a.n_obs
    assert seen == m.n_cells > 0
