"""Multi-species conversion (issue 14 item 3): ``--vocab human+mouse``, ``--organism``, the
``organism`` obs column and the per-source mapping counts, checked value by value through
``anndata.read_zarr`` against the shipped ortholog table (never through the vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scmf_loader.dataset import CellDataset
from scmf_loader.format import read_manifest
from scmf_loader.organisms import gene_table, ortholog_table
from scmf_shards.cli import main

pytest_plugins = ["census_fixtures"]

N_ONE2ONE = 60


def _one2one_pairs() -> list[tuple[str, str]]:
    """(human id, mouse id) pairs of the shipped table whose mouse gene is one-to-one only."""
    by_mouse: dict[str, set[str]] = {}
    for h, m, t in ortholog_table():
        by_mouse.setdefault(m, set()).add(f"{t}:{h}")
    return [(next(iter(v)).split(":", 1)[1], m) for m, v in sorted(by_mouse.items())
            if len(v) == 1 and next(iter(v)).startswith("one2one:")]


def _non_one2one_mouse() -> list[str]:
    types: dict[str, set[str]] = {}
    for _h, m, t in ortholog_table():
        types.setdefault(m, set()).add(t)
    return sorted(m for m, ts in types.items() if "one2one" not in ts)


PAIRS = _one2one_pairs()[::97][:N_ONE2ONE]
HUMAN_OF = {m: h for h, m in PAIRS}


def _counts(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.random(n_cells, n_genes, density=0.3, format="csr", random_state=rng,
                     data_rvs=lambda k: rng.integers(1, 40, k)).astype(np.float32)


def _write(path: Path, genes: list[str], n_cells: int, seed: int, obs: dict[str, Any] | None = None,
           uns: dict[str, Any] | None = None) -> ad.AnnData:
    index = [f"{path.stem}_{i}" for i in range(n_cells)]
    a = ad.AnnData(X=_counts(n_cells, len(genes), seed), obs=pd.DataFrame(obs or {}, index=index),
                   var=pd.DataFrame(index=genes), uns=uns or {})
    a.write_h5ad(path)
    return a


def _mouse_file(tmp_path: Path, name: str = "m.h5ad", n_cells: int = 150, seed: int = 1) -> tuple[Path, ad.AnnData, dict]:
    """Mouse genes: the one-to-one ones (some with an Ensembl version), 3 whose orthology is
    not one-to-one and one unknown id. Returns the path, the AnnData and the expected mapping."""
    one2one = [m if i % 3 else f"{m}.7" for i, m in enumerate(HUMAN_OF)]
    genes = [*one2one, *_non_one2one_mouse()[:3], "ENSMUSG00000999999"]
    a = _write(tmp_path / name, genes, n_cells, seed)
    expected = {g: HUMAN_OF[g.split(".")[0]] for g in one2one}
    return tmp_path / name, a, expected


def _shard_rows(out: Path) -> dict[tuple[str, str], tuple[dict[str, float], dict[str, Any]]]:
    """(source, cell id) -> ({token: value}, obs row) of every cell, read with anndata."""
    m = read_manifest(out)
    rows = {}
    for s in m.shards:
        shard = ad.read_zarr(out / s.path)
        x = shard.X.tocsr()
        tokens = np.asarray(shard.var_names)
        for i, cell in enumerate(shard.obs_names):
            lo, hi = x.indptr[i], x.indptr[i + 1]
            values = dict(zip(tokens[x.indices[lo:hi]].tolist(), x.data[lo:hi].tolist(), strict=True))
            obs = {k: shard.obs[k].iloc[i] for k in shard.obs.columns}
            rows[(str(obs["source"]), str(cell))] = (values, obs)
    return rows


def _expected_rows(a: ad.AnnData, token_of: dict[str, str]) -> dict[str, dict[str, float]]:
    x = a.X.tocsr()
    genes = list(a.var_names)
    out = {}
    for i, cell in enumerate(a.obs_names):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        out[cell] = {token_of[genes[j]]: float(v) for j, v in zip(x.indices[lo:hi], x.data[lo:hi], strict=True)
                     if genes[j] in token_of}
    return out


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_mouse_file_lands_on_human_orthologs(tmp_path: Path) -> None:
    path, a, token_of = _mouse_file(tmp_path)
    out = tmp_path / "out"
    result = _invoke("h5ad", str(path), "-o", str(out), "--vocab", "human+mouse", "--shard-size", "64", "-q")
    assert result.exit_code == 0, result.output
    rows = _shard_rows(out)
    expected = _expected_rows(a, token_of)
    assert len(rows) == a.n_obs
    for cell, want in expected.items():
        values, obs = rows[("m.h5ad", cell)]
        assert values == want  # every value on its human ortholog's token, nothing else
        assert obs["organism"] == "mus_musculus"
    m = read_manifest(out)
    assert m.sources[0].extra["organism"] == "mus_musculus"
    assert m.sources[0].extra["gene_mapping"] == {
        "organism": "mus_musculus", "n_genes": N_ONE2ONE + 4, "direct": 0, "one2one": N_ONE2ONE,
        "non_one2one": 3, "unmapped": 1}
    assert m.sources[0].genes_matched == N_ONE2ONE
    assert CellDataset(out).organisms == ["homo_sapiens", "mus_musculus"]


def test_human_and_mouse_into_one_dataset_from_yaml(tmp_path: Path) -> None:
    human = [h for h, _ in _one2one_pairs()[5:400:7]]
    ha = _write(tmp_path / "h.h5ad", human, 120, 2)
    mpath, ma, token_of = _mouse_file(tmp_path, n_cells=90)
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  paths: [h.h5ad, m.h5ad]\n  output: out\n  gene_vocab: human+mouse\n"
                      "  shard_size: 100\n")
    result = _invoke("h5ad", "--config", str(config), "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    rows = _shard_rows(out)
    assert len(rows) == 210
    for src, a, mapping, org in (("h.h5ad", ha, {g: g for g in human}, "homo_sapiens"),
                                 ("m.h5ad", ma, token_of, "mus_musculus")):
        for cell, want in _expected_rows(a, mapping).items():
            values, obs = rows[(src, cell)]
            assert values == want
            assert obs["organism"] == org
    m = read_manifest(out)
    assert [s.extra["organism"] for s in m.sources] == ["homo_sapiens", "mus_musculus"]
    assert m.sources[0].extra["gene_mapping"]["direct"] == len(human)
    organism = next(c for c in m.obs_columns if c.name == "organism")
    assert list(organism.categories) == ["homo_sapiens", "mus_musculus"]


def test_organism_told_by_obs_or_option(tmp_path: Path) -> None:
    """Mouse symbols (no Ensembl prefix): the organism comes from obs, or from --organism."""
    symbol = dict(gene_table("mouse"))
    genes = [symbol[m] for m in list(HUMAN_OF)[:30]]
    tagged = _write(tmp_path / "tagged.h5ad", genes, 40, 3,
                    obs={"organism_ontology_term_id": ["NCBITaxon:10090"] * 40})
    _write(tmp_path / "bare.h5ad", genes, 40, 4)
    out = tmp_path / "out1"
    assert _invoke("h5ad", str(tmp_path / "tagged.h5ad"), "-o", str(out), "--vocab", "human+mouse", "-q").exit_code == 0
    rows = _shard_rows(out)
    token_of = {symbol[m]: h for m, h in HUMAN_OF.items()}
    for cell, want in _expected_rows(tagged, token_of).items():
        assert rows[("tagged.h5ad", cell)][0] == want
    bare = _invoke("h5ad", str(tmp_path / "bare.h5ad"), "-o", str(tmp_path / "out2"), "--vocab", "human+mouse", "-q")
    assert bare.exit_code == 1
    assert "cannot tell the organism" in bare.output
    assert "--organism" in bare.output
    told = _invoke("h5ad", str(tmp_path / "bare.h5ad"), "-o", str(tmp_path / "out3"), "--vocab", "human+mouse",
                   "--organism", "mouse", "-q")
    assert told.exit_code == 0, told.output
    assert read_manifest(tmp_path / "out3").sources[0].extra["gene_mapping"]["one2one"] == 30


# ---- bad input: one line, nothing written -----------------------------------------------
def _one_line_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_organism(tmp_path: Path) -> None:
    path, _, _ = _mouse_file(tmp_path)
    result = _invoke("h5ad", str(path), "-o", str(tmp_path / "out"), "--vocab", "human+mouse", "--organism", "rat")
    _one_line_error(result, "--organism", "unknown organism 'rat'")
    assert not (tmp_path / "out").exists()


def test_mouse_file_under_the_human_vocabulary(tmp_path: Path) -> None:
    path, _, _ = _mouse_file(tmp_path)
    result = _invoke("h5ad", str(path), "-o", str(tmp_path / "out"))
    _one_line_error(result, "m.h5ad", "mus_musculus", "--vocab human+mouse")
    told = _invoke("h5ad", str(path), "-o", str(tmp_path / "out"), "--organism", "mouse")
    _one_line_error(told, "m.h5ad", "--vocab human+mouse")
    assert not (tmp_path / "out").exists()


def test_ambiguous_organism(tmp_path: Path) -> None:
    genes = list(HUMAN_OF)[:20]
    _write(tmp_path / "mixed.h5ad", genes, 30, 5, obs={"organism": ["Homo sapiens"] * 30})
    result = _invoke("h5ad", str(tmp_path / "mixed.h5ad"), "-o", str(tmp_path / "out"), "--vocab", "human+mouse")
    _one_line_error(result, "mixed.h5ad", "ambiguous organism", "--organism")
    assert not (tmp_path / "out").exists()


def test_two_mouse_genes_on_one_token_are_refused(tmp_path: Path) -> None:
    mouse = list(HUMAN_OF)[0]
    symbol = dict(gene_table("mouse"))[mouse]
    _write(tmp_path / "dup.h5ad", [mouse, list(HUMAN_OF)[1], symbol], 20, 6)
    result = _invoke("h5ad", str(tmp_path / "dup.h5ad"), "-o", str(tmp_path / "out"), "--vocab", "human+mouse")
    _one_line_error(result, "dup.h5ad", repr(mouse), repr(symbol), HUMAN_OF[mouse])


# ---- Census --------------------------------------------------------------------------------
def _census_mouse(n_cells: int, seed: int) -> Any:
    from census_fixtures import make_census_adata

    return make_census_adata([*HUMAN_OF, "ENSMUSG00000999999"], n_cells=n_cells, seed=seed)


@pytest.fixture(scope="module")
def two_organism_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    """A Census-shaped root with a homo_sapiens and a mus_musculus experiment."""
    pytest.importorskip("tiledbsoma")
    import tiledbsoma as soma
    import tiledbsoma.io
    from census_fixtures import build_census_root, census_genes, make_census_adata

    human = make_census_adata(census_genes(), n_cells=120, seed=7)
    mouse = _census_mouse(80, 8)
    root = build_census_root(tmp_path_factory.mktemp("census2") / "root", human)
    with soma.Collection.open(root.uri, "w") as census:
        exp_uri = f"{root.uri}/census_data/mus_musculus"
        tiledbsoma.io.from_anndata(exp_uri, mouse, measurement_name="RNA", X_layer_name="raw",
                                   obs_id_name="observation_joinid", var_id_name="feature_id")
        with soma.Experiment.open(exp_uri) as exp:
            census["census_data"].set("mus_musculus", exp, use_relative_uri=True)
    return root.uri, human, mouse


def _census_expected(a: Any, token_of: dict[str, str], prefix: str = "") -> dict[str, dict[str, float]]:
    b = a.copy()
    b.obs_names = [f"{prefix}{i}" for i in range(b.n_obs)]  # Census cell ids are the joinids
    return _expected_rows(b, token_of)


def test_census_mouse(two_organism_root: tuple[str, Any, Any], tmp_path: Path) -> None:
    uri, _, mouse = two_organism_root
    out = tmp_path / "out"
    result = _invoke("census", "-o", str(out), "--uri", uri, "--organism", "mus_musculus",
                     "--vocab", "human+mouse", "--obs-columns", "cell_type", "-q")
    assert result.exit_code == 0, result.output
    rows = _shard_rows(out)
    assert len(rows) == mouse.n_obs
    for cell, want in _census_expected(mouse, HUMAN_OF).items():
        values, obs = rows[("mus_musculus", cell)]
        assert values == want
        assert obs["organism"] == "mus_musculus"
    m = read_manifest(out)
    assert m.sources[0].extra["gene_mapping"]["one2one"] == N_ONE2ONE
    assert m.sources[0].extra["gene_mapping"]["unmapped"] == 1
    refused = _invoke("census", "-o", str(tmp_path / "out2"), "--uri", uri, "--organism", "mus_musculus", "-q")
    _one_line_error(refused, "mus_musculus", "--vocab human+mouse")


def test_census_both_organisms_into_one_dataset(two_organism_root: tuple[str, Any, Any], tmp_path: Path) -> None:
    uri, human, mouse = two_organism_root
    out = tmp_path / "out"
    result = _invoke("census", "-o", str(out), "--uri", uri, "--organism", "homo_sapiens,mus_musculus",
                     "--vocab", "human+mouse", "--obs-columns", "cell_type", "--shard-size", "64", "-q")
    assert result.exit_code == 0, result.output
    rows = _shard_rows(out)
    assert len(rows) == human.n_obs + mouse.n_obs
    human_tokens = {g: g for g in human.var_names if g in set(CellDataset(out).vocab.tokens)}
    for src, a, mapping in (("homo_sapiens", human, human_tokens), ("mus_musculus", mouse, HUMAN_OF)):
        for cell, want in _census_expected(a, mapping, f"{src}:").items():  # joinids per organism
            values, obs = rows[(src, cell)]
            assert values == want
            assert obs["organism"] == src
    m = read_manifest(out)
    assert [s.extra["organism"] for s in m.sources] == ["homo_sapiens", "mus_musculus"]
