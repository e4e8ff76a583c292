"""CELLxGENE Census as a conversion source: the cells of one Census query, read in bounded
row ranges of the query's sorted obs ``soma_joinid`` s.

Row ``i`` of a :class:`CensusSource` is the cell with the ``i``-th smallest ``soma_joinid``
selected by the query; its cell id is that joinid as a string (unique within a Census
release and organism; prefixed ``organism:`` when several organisms are converted
together). Genes are the Census ``feature_id`` s (Ensembl ids), which the vocabulary maps
directly. Counts come from ``X["raw"]``.

Needs the ``census`` extra (``cellxgene-census``, ``tiledbsoma``), imported when a source is
opened. Example::

    from scmf_shards.sources.census import convert_census

    convert_census(
        "shards/lung_heart",
        organism="homo_sapiens",
        census_version="2025-11-08",
        filters={"tissue": ["lung", "heart"], "is_primary_data": True},
    )
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from scmf_loader.census.filters import DEFAULT_OBS_COLUMNS, build_value_filter
from scmf_loader.census.query import GENE_COLUMN, MEASUREMENT, X_LAYER, CensusQuery, CensusSpec
from scmf_loader.format import Manifest
from scmf_shards.options import ConvertOptions
from scmf_shards.sources.h5ad import RowChunk

__all__ = ["DEFAULT_OBS_COLUMNS", "CensusSource", "convert_census"]


class CensusSource:
    """The cells of one Census query, opened lazily in every process (picklable).

    ``organism``: ``homo_sapiens`` or ``mus_musculus``; ``filters``: the seed's mapping of
    obs column to a value (``==``) or a list of values (``in``); ``obs_filter``: a SOMA value
    filter expression (both may be given: they are joined with ``and``); ``var_filter``: a
    SOMA filter on var (e.g. ``"feature_id in ['ENSG...']"``); ``census_version``: a release
    date, or ``"stable"``/``"latest"`` (resolved to its date, which is recorded); ``uri``: any
    Census-shaped SOMA root (local path or ``s3://``) instead of the public Census;
    ``tiledb_config``: TileDB settings for reads (not part of the data definition).

    Raises :class:`~scmf_loader.errors.InvalidInputError` on construction for an unknown
    organism, an empty or malformed filter, an unreachable URI or an unresolvable version.
    """

    kind = "cellxgene_census"
    layout = "soma"
    #: put before each joinid in the cell ids (``"mus_musculus:"`` when several organisms are
    #: converted together: joinids are unique within one organism's experiment only)
    cell_id_prefix = ""

    def __init__(
        self,
        organism: str = "homo_sapiens",
        *,
        filters: Mapping[str, Any] | None = None,
        obs_filter: str | None = None,
        var_filter: str | None = None,
        census_version: str | None = None,
        uri: str | None = None,
        tiledb_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.filters = dict(filters) if filters else {}
        value_filter = build_value_filter(self.filters, obs_filter)
        self.query = CensusQuery(
            CensusSpec(
                organism=organism,
                obs_filter=value_filter,
                var_filter=var_filter,
                census_version=census_version,
                uri=uri,
                tiledb_config=tiledb_config,
            )
        )
        self.path = self.query.experiment_uri
        self.n_cells = self.query.n_cells
        self.n_genes = self.query.n_genes
        self.dtype = self.query.dtype

    @property
    def genes(self) -> list[str]:
        """Census ``feature_id`` of every gene of the query, in column order."""
        return self.query.genes

    @property
    def organism(self) -> str:
        """The organism queried (canonical: ``homo_sapiens``, ``mus_musculus``)."""
        return self.query.spec.organism

    @property
    def census_version(self) -> str:
        """The concrete Census release (build date) read."""
        return self.query.census_version

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """Raise if any requested obs column is missing from the Census obs."""
        self.query.check_obs_columns(columns)

    def obs_values(self, column: str) -> np.ndarray:
        """All values of one obs column over the query's cells (strings, None = NA)."""
        return self.query.obs_values(column)

    def read_rows(self, start: int, stop: int, obs_columns: Sequence[str] = (),
                  reuse: bool = False) -> RowChunk:
        """Cells ``[start, stop)`` of the query (in sorted joinid order) as a CSR matrix over
        the query's genes, with their joinids as cell ids and the requested obs columns.
        (``reuse`` is accepted for the source protocol; SOMA reads allocate their own.)"""
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.n_cells})")
        joinids = self.query.obs_joinids[start:stop]
        indptr, indices, data = self.query.read(joinids)
        matrix = sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_genes))
        cell_ids = np.array([f"{self.cell_id_prefix}{j}" for j in joinids.tolist()], dtype=object)
        obs = self.query.read_obs(joinids, list(obs_columns))
        # with a var filter the matrix holds some genes only: the library size is still the
        # cell's total over all genes of the experiment (raw_sum, else whole rows)
        totals = self.query.library_sizes(joinids) if self.query.spec.var_filter else None
        return RowChunk(start=start, stop=stop, matrix=matrix, cell_ids=cell_ids, obs=obs,
                        library_size=totals)

    def fingerprint(self) -> dict[str, object]:
        """What identifies the cells read (hashed into ``dataset_id``): concrete release,
        root URI if one was given, organism, filters, cell and gene counts and digests of the
        selected joinids and feature ids. Never a time."""
        q = self.query
        return {
            "kind": self.kind,
            "census_version": q.census_version,
            "uri": q.spec.uri,
            "organism": q.spec.organism,
            "obs_filter": q.spec.obs_filter,
            "var_filter": q.spec.var_filter,
            "measurement": MEASUREMENT,
            "layer": X_LAYER,
            "n_cells": q.n_cells,
            "obs_joinids_sha256": q.obs_digest,
            "n_genes": q.n_genes,
            "feature_ids_sha256": q.genes_digest,
            **({"cell_id_prefix": self.cell_id_prefix} if self.cell_id_prefix else {}),
        }

    def manifest_fields(self, fingerprint: Mapping[str, object]) -> dict[str, object]:
        """Provenance recorded for this source in the manifest."""
        q = self.query
        return {
            "census_version": fingerprint["census_version"],
            "requested_census_version": q.requested_version,
            "census_schema_version": q.schema_version,
            "uri": fingerprint["uri"],
            "soma_uri": q.soma_uri,
            "organism": fingerprint["organism"],
            "filters": self.filters,
            "obs_filter": fingerprint["obs_filter"],
            "var_filter": fingerprint["var_filter"],
            "measurement": MEASUREMENT,
            "layer": X_LAYER,
            "gene_column": GENE_COLUMN,
            "cell_count": fingerprint["n_cells"],
            "obs_joinids_sha256": fingerprint["obs_joinids_sha256"],
            "feature_ids_sha256": fingerprint["feature_ids_sha256"],
            "dtype": str(self.dtype),
        }


def convert_census(
    output: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    *,
    organism: str | Sequence[str] | None = None,
    filters: Mapping[str, Any] | None = None,
    obs_filter: str | None = None,
    var_filter: str | None = None,
    census_version: str | None = None,
    uri: str | None = None,
    tiledb_config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Manifest:
    """Convert the cells of one Census query into the dataset directory ``output``: the same
    shards and manifest as :func:`~scmf_shards.convert.convert_h5ad`.

    ``organism``: one organism, or several (``"homo_sapiens,mus_musculus"`` or a list: one
    query per organism, converted into one dataset; use a vocabulary that covers them all,
    ``vocab="human+mouse"``); default ``options.organism``, else ``homo_sapiens``.
    Conversion options come from ``options`` or keyword arguments (see
    :class:`~scmf_shards.options.ConvertOptions`); when no ``obs_columns`` are given the
    Census defaults (:data:`DEFAULT_OBS_COLUMNS`) are kept. The query is resolved and checked
    before anything is written. Returns the manifest.
    """
    from scmf_shards.convert import convert_sources

    if options is None:
        kwargs.setdefault("obs_columns", DEFAULT_OBS_COLUMNS)
        options = ConvertOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or keyword arguments, not both")
    wanted = organism or options.organism or "homo_sapiens"
    names = wanted.split(",") if isinstance(wanted, str) else list(wanted)
    sources: list[CensusSource] = []
    try:
        for name in dict.fromkeys(n.strip() for n in names if n.strip()):
            sources.append(CensusSource(
                name, filters=filters, obs_filter=obs_filter, var_filter=var_filter,
                census_version=census_version, uri=uri, tiledb_config=tiledb_config,
            ))
        if len(sources) > 1:
            for source in sources:
                source.cell_id_prefix = f"{source.organism}:"
        return convert_sources(sources, output, options)
    finally:
        for source in sources:
            source.query.close()
