"""A resolved CELLxGENE Census query: the core shared by the converter's ``CensusSource``
and the loader's ``CensusDataset``.

:class:`CensusQuery` opens a Census root (the public Census by release, or any
Census-shaped SOMA root by URI: a local path or ``s3://``), resolves the release to a concrete
build date, runs the obs filter (and optional var filter) once, and keeps the sorted obs and
var ``soma_joinid`` s. Cells are then addressed by their *position* in the sorted obs joinids;
:meth:`CensusQuery.read` returns the raw counts (``X["raw"]``) of any sorted set of joinids as
CSR arrays over the query's genes (Census ``feature_id``, Ensembl), in bounded pieces.

Every problem found while resolving (unknown organism, malformed or empty filter, unreachable
URI, unresolvable release) raises :class:`~scmf_loader.errors.InvalidInputError` with a
one-line message, before anything is read or written.

Picklable: the SOMA handle is never pickled, and neither are the joinid arrays (they can be
millions long) unless asked. A copy in another process reopens the Census lazily, re-runs the
query and checks it against the recorded digests, so a Census that changed under a pinned
release is an error, never silently different cells. ``tiledbsoma`` and ``cellxgene_census``
are imported only when a query is opened, and the TileDB lifetimes (one context per process,
shared handles, fork and exit hooks installed on the first open) live in
:mod:`scmf_loader.census.handles`: this module imports with numpy alone, with no side effect.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scmf_loader.census import handles as _h
from scmf_loader.census.filters import normalize_organism
from scmf_loader.census.reads import read_csr, row_sums
from scmf_loader.errors import InvalidInputError
from scmf_loader.labels import stringify

__all__ = ["GENE_COLUMN", "MEASUREMENT", "RAW_SUM", "X_LAYER", "CensusQuery", "CensusSpec"]

MEASUREMENT = "RNA"
X_LAYER = "raw"
GENE_COLUMN = "feature_id"
#: Census obs column: each cell's total of ``X["raw"]`` over all genes of the experiment
RAW_SUM = "raw_sum"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.removeprefix("SOMAError: ")


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i8").tobytes()).hexdigest()


def _genes_digest(genes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(genes).encode("utf-8")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class CensusSpec:
    """What to query: ``organism`` (``homo_sapiens``, ``mus_musculus``), an obs
    ``value_filter`` (SOMA syntax, e.g. ``"tissue in ['lung'] and is_primary_data == True"``),
    an optional var filter, the Census release (``census_version``: a date such as
    ``"2025-11-08"``, or ``"stable"``/``"latest"``; ``None`` means ``"stable"`` without a URI,
    and the root's own build date with one), an explicit root ``uri`` (local path or
    ``s3://``), and TileDB settings (``tiledb_config``; never part of the data definition)."""

    organism: str = "homo_sapiens"
    obs_filter: str | None = None
    var_filter: str | None = None
    census_version: str | None = None
    uri: str | None = None
    tiledb_config: Mapping[str, Any] | None = field(default=None, compare=False)


class CensusQuery:
    """A Census query resolved once: concrete release, cells and genes.

    Attributes: ``spec``; ``census_version`` (the concrete build date); ``requested_version``;
    ``soma_uri`` (the root actually opened); ``experiment_uri``; ``schema_version`` (the
    Census schema version, or ``None``); ``n_cells``; ``n_genes``; ``dtype`` of ``X["raw"]``;
    ``obs_columns_available``; ``obs_digest`` / ``genes_digest`` (sha256 of the sorted obs
    joinids and of the feature ids in order). :attr:`obs_joinids`, :attr:`var_joinids` and
    :attr:`genes` are loaded lazily after unpickling.
    """

    def __init__(self, spec: CensusSpec) -> None:
        self.spec = CensusSpec(
            organism=normalize_organism(spec.organism),
            obs_filter=spec.obs_filter.strip() if spec.obs_filter else None,
            var_filter=spec.var_filter.strip() if spec.var_filter else None,
            census_version=spec.census_version,
            uri=spec.uri,
            tiledb_config=spec.tiledb_config,
        )
        self.requested_version = spec.census_version
        self._handles: _h.Handles | None = None
        self._arrays: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        #: keep the joinid arrays when pickled (one copy per DataLoader worker) instead of
        #: re-running the query in the new process (one copy per converter task)
        self.pickle_arrays = False
        self.census_version = ""  # set while resolving; used in messages
        try:
            self._plan()
        except BaseException:
            # close now, not whenever the traceback (which holds this frame) is collected
            self.close()
            raise

    def _plan(self) -> None:
        self.census_version = self._resolve()
        exp = self.experiment()
        self.experiment_uri = str(exp.uri)
        self.obs_columns_available = tuple(
            n for n in exp.obs.schema.names if n != "soma_joinid"
        )
        x = exp.ms[MEASUREMENT].X[X_LAYER]
        self.dtype = np.dtype(x.schema.field("soma_data").type.to_pandas_dtype())
        obs, var, genes = self._load_arrays()
        if obs.size == 0:
            where = f"obs filter {self.spec.obs_filter!r}" if self.spec.obs_filter else "the query"
            raise InvalidInputError(
                f"{self.describe()}: {where} selects no cells; check the column values "
                "(e.g. tissue names are lower case: 'lung')"
            )
        if var.size == 0:
            raise InvalidInputError(
                f"{self.describe()}: var filter {self.spec.var_filter!r} selects no genes"
            )
        self._arrays = (obs, var, genes)
        self.n_cells = int(obs.size)
        self.n_genes = int(var.size)
        self.obs_digest = _digest(obs)
        self.genes_digest = _genes_digest(genes)

    # ---- opening and resolving ---------------------------------------------------------
    def describe(self) -> str:
        """Short human label: ``census <version> <organism> [<uri>]``."""
        where = f" at {self.spec.uri}" if self.spec.uri else ""
        version = self.census_version or self.requested_version or "stable"
        return f"Census {version} {self.spec.organism}{where}"

    def _open_root(self, version: str | None) -> Any:
        try:
            import cellxgene_census
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            raise InvalidInputError(
                "reading CELLxGENE Census needs the 'census' extra: "
                "pip install 'scmodelforge-data[census]'"
            ) from exc
        try:
            context = _h.context(self.spec.tiledb_config)
            if self.spec.uri is not None:
                return cellxgene_census.open_soma(uri=self.spec.uri, context=context)
            return cellxgene_census.open_soma(census_version=version, context=context)
        except Exception as exc:
            target = self.spec.uri if self.spec.uri is not None else f"census_version {version!r}"
            raise InvalidInputError(
                f"{target}: cannot open the Census root ({_first_line(exc)}); check the path or "
                "URI and your network access"
            ) from exc

    def _resolve(self) -> str:
        """Open the root and return the concrete release date."""
        requested = self.spec.census_version
        if self.spec.uri is None:
            concrete = self._resolve_online(requested or "stable")
            root = self._open_root(concrete)
            built = _summary(root).get("census_build_date")
        else:
            root = self._open_root(None)
            built = _summary(root).get("census_build_date")
            if built is None and (requested is None or not _DATE.match(requested)):
                root.close()
                raise InvalidInputError(
                    f"{self.spec.uri}: the Census version cannot be resolved offline (no "
                    "census_info/summary census_build_date in this root); pass a concrete "
                    "--census-version such as 2025-11-08"
                )
            if built is not None and requested is not None and _DATE.match(requested) and built != requested:
                root.close()
                raise InvalidInputError(
                    f"{self.spec.uri}: this root holds Census {built}, not the requested "
                    f"census_version {requested}"
                )
            concrete = built if built is not None else str(requested)
        self.schema_version = _summary(root).get("census_schema_version")
        self.soma_uri = str(root.uri)
        self.census_version = concrete
        self._set_handles(root)
        return concrete

    def _resolve_online(self, requested: str) -> str:
        import cellxgene_census

        try:
            description = cellxgene_census.get_census_version_description(requested)
        except ValueError as exc:
            raise InvalidInputError(
                f"census_version {requested!r} is not a Census release ({_first_line(exc)}); "
                "list releases with cellxgene_census.get_census_version_directory()"
            ) from exc
        except Exception as exc:
            raise InvalidInputError(
                f"census_version {requested!r} cannot be resolved: the Census release directory "
                f"is unreachable ({_first_line(exc)}). Connect to the internet, or pass --uri "
                "with a local or s3:// copy of the Census and a concrete --census-version"
            ) from exc
        return str(description["release_build"])

    def _set_handles(self, root: Any) -> None:
        organism = self.spec.organism
        try:
            data = root["census_data"]
        except (KeyError, Exception) as exc:
            root.close()
            raise InvalidInputError(
                f"{self.soma_uri}: not a Census root (no census_data collection: {_first_line(exc)})"
            ) from exc
        if organism not in data:
            known = sorted(data.keys())
            root.close()
            raise InvalidInputError(
                f"{self.describe()}: unknown organism {organism!r}; this Census holds {known}"
            )
        exp = data[organism]
        if MEASUREMENT not in exp.ms or X_LAYER not in exp.ms[MEASUREMENT].X:
            root.close()
            raise InvalidInputError(
                f"{self.describe()}: experiment has no measurement {MEASUREMENT!r} with "
                f"X layer {X_LAYER!r}"
            )
        self._handles = _h.Handles(root, exp)
        self._handles.users.add(self)

    def _cache_key(self) -> tuple[Any, ...]:
        s = self.spec
        return (self.soma_uri, self.census_version, s.organism, s.obs_filter, s.var_filter,
                getattr(self, "obs_digest", None), getattr(self, "genes_digest", None))

    def experiment(self) -> Any:
        """The open SOMA Experiment, (re)opened in this process when needed (copies of one
        query unpickled in the same process share one handle and one set of joinids)."""
        handles = self._handles
        if handles is not None and handles.usable():
            return handles.exp
        if handles is not None and handles.pid != os.getpid():
            _h.set_aside(handles)  # inherited through fork: never touch, never free
        self._handles = None
        cached = _h.lookup(self._cache_key())
        if cached is not None and cached[0] is not None and cached[0].usable():
            self._handles = cached[0]
            self._handles.users.add(self)
        else:
            root = self._open_root(self.census_version)
            self._set_handles(root)
            _h.remember(self._cache_key(), self._handles, None)
        assert self._handles is not None
        return self._handles.exp

    def close(self) -> None:
        """Close the SOMA handles (reopened on the next read); handles shared with another
        live copy of this query in this process stay open until that copy is done too."""
        handles, self._handles = self._handles, None
        if handles is None:
            return
        if handles.pid != os.getpid():  # inherited through fork: never touch, never free
            _h.set_aside(handles)
            return
        handles.users.discard(self)
        if not handles.users:
            _h.release(self._cache_key(), handles)  # keep the joinids cached
            handles.close()

    # ---- the query -----------------------------------------------------------------------
    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        exp = self.experiment()
        try:
            obs = exp.obs.read(value_filter=self.spec.obs_filter, column_names=["soma_joinid"])
            obs_ids = np.sort(obs.concat().column("soma_joinid").to_numpy())
        except Exception as exc:
            raise InvalidInputError(
                f"{self.describe()}: malformed obs filter {self.spec.obs_filter!r} "
                f"({_first_line(exc)}); obs columns: {list(self.obs_columns_available)}"
            ) from exc
        var_df = exp.ms[MEASUREMENT].var
        if GENE_COLUMN not in var_df.schema.names:
            raise InvalidInputError(f"{self.describe()}: var has no {GENE_COLUMN!r} column")
        try:
            var = var_df.read(
                value_filter=self.spec.var_filter, column_names=["soma_joinid", GENE_COLUMN]
            ).concat()
        except Exception as exc:
            raise InvalidInputError(
                f"{self.describe()}: malformed var filter {self.spec.var_filter!r} "
                f"({_first_line(exc)}); var columns: {var_df.schema.names}"
            ) from exc
        var_ids = var.column("soma_joinid").to_numpy()
        order = np.argsort(var_ids, kind="stable")
        genes = [str(g) for g in np.asarray(var.column(GENE_COLUMN).to_pylist(), dtype=object)[order]]
        return np.asarray(obs_ids, dtype=np.int64), np.asarray(var_ids[order], dtype=np.int64), genes

    def _ensure_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self._arrays is None:
            cached = _h.lookup(self._cache_key())
            if cached is not None and cached[1] is not None:
                self._arrays = cached[1]
                return self._arrays
            obs, var, genes = self._load_arrays()
            if _digest(obs) != self.obs_digest or _genes_digest(genes) != self.genes_digest:
                raise InvalidInputError(
                    f"{self.describe()}: the query now selects different cells or genes than "
                    "when it was planned; the Census root changed under a pinned release"
                )
            self._arrays = (obs, var, genes)
            _h.remember(self._cache_key(), None, self._arrays)
        return self._arrays

    @property
    def obs_joinids(self) -> np.ndarray:
        """Sorted ``soma_joinid`` of the selected cells (int64)."""
        return self._ensure_arrays()[0]

    @property
    def var_joinids(self) -> np.ndarray:
        """Sorted ``soma_joinid`` of the selected genes (int64)."""
        return self._ensure_arrays()[1]

    @property
    def genes(self) -> list[str]:
        """Census ``feature_id`` (Ensembl id) of each selected gene, in var joinid order."""
        return self._ensure_arrays()[2]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = None
        if not self.pickle_arrays:
            state["_arrays"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("_pid", None)  # pickled by an earlier version
        self.__dict__.update(state)
        self._handles = None

    # ---- reads ---------------------------------------------------------------------------
    def read(self, joinids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw counts of the cells ``joinids`` (sorted, unique, all in the query) as CSR
        arrays ``(indptr int64, indices int32, data)``: rows in ``joinids`` order, columns
        the positions of the genes in :attr:`var_joinids` (sorted within each row)."""
        joinids = np.asarray(joinids, dtype=np.int64)
        if joinids.size > 1 and np.any(np.diff(joinids) <= 0):
            raise ValueError("joinids must be sorted and unique")
        x = self.experiment().ms[MEASUREMENT].X[X_LAYER]
        return read_csr(x, joinids, self.var_joinids, all_genes=self.spec.var_filter is None,
                        dtype=self.dtype)

    def library_sizes(self, joinids: np.ndarray) -> np.ndarray:
        """Each cell's total raw count over *all* genes of the experiment, whatever the var
        filter (float64, in ``joinids`` order; ``joinids`` sorted and unique): the Census obs
        column ``raw_sum`` when the root has it (complete for these cells), else the sums of
        whole rows of ``X["raw"]``."""
        joinids = np.asarray(joinids, dtype=np.int64)
        if joinids.size == 0:
            return np.zeros(0, dtype=np.float64)
        exp = self.experiment()
        if RAW_SUM in self.obs_columns_available:
            table = exp.obs.read(coords=(joinids,), column_names=["soma_joinid", RAW_SUM]).concat()
            ids = table.column("soma_joinid").to_numpy()
            sums = table.column(RAW_SUM).to_numpy()
            if ids.size == joinids.size and sums.dtype.kind in "iuf":
                out = np.empty(joinids.size, dtype=np.float64)
                out[np.searchsorted(joinids, ids)] = sums
                if not np.isnan(out).any():
                    return out
        return row_sums(exp.ms[MEASUREMENT].X[X_LAYER], joinids)

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """Raise if any requested obs column is missing from the Census obs."""
        missing = [c for c in columns if c not in self.obs_columns_available]
        if missing:
            raise InvalidInputError(
                f"{self.describe()}: obs has no column(s) {missing}; available: "
                f"{list(self.obs_columns_available)}"
            )

    def read_obs(self, joinids: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """Values of obs ``columns`` for ``joinids`` (sorted), as object arrays of ``str``
        (``None`` = NA), in ``joinids`` order."""
        joinids = np.asarray(joinids, dtype=np.int64)
        if not columns:
            return {}
        table = self.experiment().obs.read(
            coords=(joinids,), column_names=["soma_joinid", *columns]
        ).concat()
        where = np.searchsorted(joinids, table.column("soma_joinid").to_numpy())
        out: dict[str, np.ndarray] = {}
        for c in columns:
            values = stringify(table.column(c).to_pylist())
            placed = np.empty(joinids.size, dtype=object)
            placed[where] = values
            out[c] = placed
        return out

    def obs_values(self, column: str) -> np.ndarray:
        """All values of one obs column over the selected cells (strings, ``None`` = NA)."""
        self.check_obs_columns([column])
        table = self.experiment().obs.read(
            value_filter=self.spec.obs_filter, column_names=[column]
        ).concat()
        return stringify(table.column(column).to_pylist())


def _summary(root: Any) -> dict[str, str]:
    """``census_info/summary`` as label -> value (empty when absent)."""
    try:
        info = root["census_info"]
        if "summary" not in info:
            return {}
        table = info["summary"].read(column_names=["label", "value"]).concat()
    except Exception:
        return {}
    return {str(k): str(v) for k, v in zip(table.column("label").to_pylist(),
                                          table.column("value").to_pylist(), strict=True)}
