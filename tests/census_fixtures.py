"""A small local Census-shaped SOMA root for offline tests of the Census paths.

:func:`build_census_root` writes, under a directory, what ``cellxgene_census.open_soma(uri=)``
opens like the real Census: a SOMA Collection holding ``census_data/homo_sapiens`` (an
Experiment with measurement ``RNA`` and X layer ``raw``, built with
``tiledbsoma.io.from_anndata`` and added with ``use_relative_uri=True``) and ``census_info``
(``summary`` with ``census_build_date``/``census_schema_version`` and ``datasets``), with the
real Census obs and var column names. :meth:`CensusRoot.write_h5ad` writes the ``.h5ad``
equivalent of a selection (obs names = the ``soma_joinid`` s as strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BUILD_DATE = "2025-11-08"
SCHEMA_VERSION = "2.1.0"
DATASETS = ("3de0ad6d-4378-4f62-b37b-ec0b75a50d94", "9f222629-9e39-47d0-b83f-e08d610c51f1",
            "e0ed3c55-aff6-4bb7-b6ff-98a2d90b890c")
ASSAYS = ("10x 3' v3", "10x 5' v1", "Smart-seq2")
CELL_TYPES = ("T cell", "B cell", "macrophage", "fibroblast", "endothelial cell")
TISSUES = (("lung", "lung"), ("heart left ventricle", "heart"), ("heart", "heart"), ("liver", "liver"),
           ("blood", "blood"))
DISEASES = ("normal", "COVID-19", "lung adenocarcinoma")


@dataclass
class CensusRoot:
    """A built root: ``uri`` (its directory), ``adata`` (the cells and genes ingested in
    ``soma_joinid`` order; var names = ``feature_id``), ``organism`` and ``build_date``."""

    uri: str
    adata: Any
    organism: str = "homo_sapiens"
    build_date: str = BUILD_DATE

    def selected(self, mask: np.ndarray) -> Any:
        """The cells of ``mask`` as an AnnData whose obs names are their joinids as strings
        (the cell ids a Census conversion writes)."""
        sub = self.adata[np.asarray(mask, dtype=bool)].copy()
        sub.obs_names = [str(j) for j in np.flatnonzero(mask)]
        return sub

    def write_h5ad(self, path: Path, mask: np.ndarray) -> Path:
        """Write :meth:`selected` to ``path``: the ``.h5ad`` equivalent of the query."""
        self.selected(mask).write_h5ad(path)
        return path


def make_census_adata(genes: list[str], n_cells: int = 400, seed: int = 0) -> Any:
    """Random integer counts with Census-like obs/var columns. Cells are ordered by dataset,
    as in the real Census; obs names become the ``observation_joinid`` column."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    x = sp.random(
        n_cells, len(genes), density=0.15, format="csr", random_state=rng,
        data_rvs=lambda k: rng.integers(1, 50, k),
    ).astype(np.float32)
    dataset = np.sort(rng.integers(0, len(DATASETS), n_cells))
    tissue = rng.integers(0, len(TISSUES), n_cells)
    donor = [f"donor_{d}_{rng.integers(0, 3)}" for d in dataset]
    is_primary = rng.random(n_cells) < 0.8
    sums = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    nnz = np.diff(x.indptr).astype(np.int64)

    def cat(values: list[str]) -> Any:
        return pd.Categorical(values)

    obs = pd.DataFrame(
        {
            "dataset_id": cat([DATASETS[d] for d in dataset]),
            "assay": cat([ASSAYS[d] for d in dataset]),
            "assay_ontology_term_id": cat([f"EFO:00{d:05d}" for d in dataset]),
            "cell_type": cat(rng.choice(CELL_TYPES, n_cells).tolist()),
            "cell_type_ontology_term_id": cat(rng.choice(["CL:0000084", "CL:0000236"], n_cells).tolist()),
            "development_stage": cat(rng.choice(["adult stage", "unknown"], n_cells).tolist()),
            "disease": cat(rng.choice(DISEASES, n_cells).tolist()),
            "donor_id": cat(donor),
            "is_primary_data": is_primary,
            "self_reported_ethnicity": cat(rng.choice(["European", "unknown"], n_cells).tolist()),
            "sex": cat(rng.choice(["female", "male"], n_cells).tolist()),
            "suspension_type": cat(["cell"] * n_cells),
            "tissue": cat([TISSUES[t][0] for t in tissue]),
            "tissue_type": cat(["tissue"] * n_cells),
            "tissue_general": cat([TISSUES[t][1] for t in tissue]),
            "raw_sum": sums,
            "nnz": nnz,
            "raw_mean_nnz": np.where(nnz > 0, sums / np.maximum(nnz, 1), 0.0),
            "n_measured_vars": np.full(n_cells, len(genes), dtype=np.int64),
        },
        index=[f"obs{i:06d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {
            "feature_name": [f"GENE{i}" for i in range(len(genes))],
            "feature_length": rng.integers(500, 5000, len(genes)).astype(np.int64),
            "nnz": np.bincount(x.indices, minlength=len(genes)).astype(np.int64),
            "n_measured_obs": np.full(len(genes), n_cells, dtype=np.int64),
        },
        index=list(genes),
    )
    return ad.AnnData(X=x, obs=obs, var=var)


def _dataframe(parent: Any, name: str, columns: dict[str, list[Any]]) -> None:
    import pyarrow as pa

    n = len(next(iter(columns.values())))
    table = pa.table({"soma_joinid": pa.array(np.arange(n), pa.int64()), **columns})
    df = parent.add_new_dataframe(
        name, schema=table.schema, index_column_names=["soma_joinid"], domain=[(0, max(n - 1, 0))]
    )
    df.write(table)


def build_census_root(
    directory: Path, adata: Any, *, build_date: str | None = BUILD_DATE, organism: str = "homo_sapiens"
) -> CensusRoot:
    """Write ``adata`` as a Census-shaped SOMA root under ``directory`` (see the module
    docstring). ``build_date=None`` leaves ``census_build_date`` out of the summary."""
    import tiledbsoma as soma
    import tiledbsoma.io

    root = str(directory)
    with soma.Collection.create(root) as census:
        data = census.add_new_collection("census_data")
        exp_uri = f"{root}/census_data/{organism}"
        tiledbsoma.io.from_anndata(
            exp_uri, adata, measurement_name="RNA", X_layer_name="raw",
            obs_id_name="observation_joinid", var_id_name="feature_id",
        )
        with soma.Experiment.open(exp_uri) as exp:
            data.set(organism, exp, use_relative_uri=True)
        info = census.add_new_collection("census_info")
        labels = ["census_schema_version", "dataset_schema_version", "total_cell_count",
                  "unique_cell_count", f"number_donors_{organism}"]
        values = [SCHEMA_VERSION, "5.3.0", str(adata.n_obs),
                  str(int(adata.obs["is_primary_data"].sum())),
                  str(adata.obs["donor_id"].nunique())]
        if build_date is not None:
            labels.insert(1, "census_build_date")
            values.insert(1, build_date)
        _dataframe(info, "summary", {"label": labels, "value": values})
        counts = adata.obs["dataset_id"].value_counts()
        _dataframe(info, "datasets", {
            "collection_id": ["c0"] * len(DATASETS),
            "collection_name": ["Offline test collection"] * len(DATASETS),
            "dataset_id": list(DATASETS),
            "dataset_title": [f"test dataset {i}" for i in range(len(DATASETS))],
            "dataset_h5ad_path": [f"{d}.h5ad" for d in DATASETS],
            "dataset_total_cell_count": [int(counts.get(d, 0)) for d in DATASETS],
        })
    return CensusRoot(uri=root, adata=adata, organism=organism,
                      build_date=build_date or "")


# ---- pytest fixtures (load with ``pytest_plugins = ["census_fixtures"]`` in a test module) ----
def _require_tiledbsoma() -> None:
    pytest.importorskip(
        "tiledbsoma", reason="tiledbsoma is not installed (pip install 'scmodelforge-data[census]')"
    )


def census_genes() -> list[str]:
    """80 genes of the shipped human protein-coding vocabulary (in reverse vocabulary order,
    so alignment must reorder columns) plus two Ensembl ids outside it."""
    from scmf_loader.vocab import GeneVocab

    genes = GeneVocab.human_protein_coding().genes[100:260:2]
    return [*reversed(genes), "ENSG00000999998", "ENSG00000999999"]


@pytest.fixture(scope="session")
def census_root(tmp_path_factory: pytest.TempPathFactory) -> CensusRoot:
    """A 400-cell, 82-gene Census-shaped root (build date 2025-11-08), built once per session;
    skips when tiledbsoma is not installed."""
    _require_tiledbsoma()
    adata = make_census_adata(census_genes(), n_cells=400, seed=0)
    return build_census_root(tmp_path_factory.mktemp("census") / "root", adata)


@pytest.fixture(scope="session")
def census_root_undated(tmp_path_factory: pytest.TempPathFactory) -> CensusRoot:
    """A 30-cell root whose ``census_info/summary`` has no ``census_build_date``."""
    _require_tiledbsoma()
    adata = make_census_adata(census_genes(), n_cells=30, seed=1)
    return build_census_root(tmp_path_factory.mktemp("census_undated") / "root", adata, build_date=None)
