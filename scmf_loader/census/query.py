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
millions long). A copy in another process reopens the Census lazily, re-runs the query and
checks it against the recorded digests, so a Census that changed under a pinned release is an
error, never silently different cells. ``tiledbsoma`` and ``cellxgene_census`` are imported
only when a query is opened: this module imports with numpy alone.

Lifetimes of the TileDB objects (TileDB contexts own thread pools; an object must not outlive
its context, and none may be used or destroyed in a forked child):

- one ``SOMATileDBContext`` per process and TileDB configuration (:func:`_context`), shared by
  every root opened there and never destroyed, instead of a new context per opened root;
- handles are closed deterministically: a query whose construction fails closes what it
  opened before raising, :meth:`CensusQuery.close` closes handles no other live copy uses,
  and handles evicted from the per-process cache are closed once unused (the cache is closed
  at exit);
- in a forked child, every handle and context inherited from the parent is kept alive,
  untouched and never freed (``os.register_at_fork``), and the child opens its own.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scmf_loader.errors import InvalidInputError

__all__ = [
    "DEFAULT_OBS_COLUMNS",
    "CensusQuery",
    "CensusSpec",
    "build_value_filter",
    "normalize_organism",
]

#: obs columns kept when none are asked for
DEFAULT_OBS_COLUMNS = ("cell_type", "tissue", "assay", "disease", "donor_id", "dataset_id")
MEASUREMENT = "RNA"
X_LAYER = "raw"
GENE_COLUMN = "feature_id"
#: Census obs column: each cell's total of ``X["raw"]`` over all genes of the experiment
RAW_SUM = "raw_sum"
_READ_CELLS = 4096  # cells per SOMA read inside one call of CensusQuery.read
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def normalize_organism(name: str) -> str:
    """``"Homo sapiens"`` / ``"homo-sapiens"`` → ``"homo_sapiens"`` (the Census key)."""
    return re.sub(r"[\s\-]+", "_", str(name).strip()).lower()


def _literal(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        if "'" not in value:
            return f"'{value}'"
        if '"' not in value:
            return f'"{value}"'
        raise InvalidInputError(
            f"filters: value {value!r} of {key!r} holds both quote characters; use --obs-filter"
        )
    raise InvalidInputError(
        f"filters: value {value!r} of {key!r} is a {type(value).__name__}; expected a string, "
        "number, boolean or a list of them"
    )


def build_value_filter(
    filters: Mapping[str, Any] | None = None, obs_filter: str | None = None
) -> str | None:
    """One SOMA ``value_filter`` from the seed's ``filters`` mapping (a list becomes an ``in``
    filter, a scalar ``==``) and/or a filter expression, joined with ``and``. Keys are sorted,
    so the same mapping always gives the same string."""
    parts: list[str] = []
    if filters:
        if not isinstance(filters, Mapping):
            raise InvalidInputError(
                f"filters must be a mapping of obs column -> value(s), got {type(filters).__name__}"
            )
        for key in sorted(filters):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
                raise InvalidInputError(f"filters: {key!r} is not an obs column name")
            value = filters[key]
            if isinstance(value, list | tuple):
                if not value:
                    raise InvalidInputError(f"filters: {key!r} lists no values")
                parts.append(f"{key} in [{', '.join(_literal(key, v) for v in value)}]")
            else:
                parts.append(f"{key} == {_literal(key, value)}")
    if obs_filter is not None and str(obs_filter).strip():
        parts.append(str(obs_filter).strip())
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return " and ".join(f"({p})" for p in parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.removeprefix("SOMAError: ")


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i8").tobytes()).hexdigest()


def _genes_digest(genes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(genes).encode("utf-8")).hexdigest()


def stringify(values: Sequence[Any]) -> np.ndarray:
    """Values as an object array of ``str`` (``None`` for NA), the same way the h5ad source
    writes them (``True``/``False`` for booleans, ``str(x)`` otherwise)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            out[i] = None
        elif isinstance(v, bytes):
            out[i] = v.decode("utf-8")
        else:
            out[i] = str(v)
    return out


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
        self._handles: _Handles | None = None
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
            context = _context(self.spec.tiledb_config)
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
        self._handles = _Handles(root, exp)
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
            _INHERITED.append(handles)  # inherited through fork: never touch, never free
        self._handles = None
        cached = _PROCESS_CACHE.get(self._cache_key())
        if cached is not None and cached[0] is not None and cached[0].usable():
            self._handles = cached[0]
            self._handles.users.add(self)
        else:
            root = self._open_root(self.census_version)
            self._set_handles(root)
            _remember(self._cache_key(), self._handles, None)
        assert self._handles is not None
        return self._handles.exp

    def close(self) -> None:
        """Close the SOMA handles (reopened on the next read); handles shared with another
        live copy of this query in this process stay open until that copy is done too."""
        handles, self._handles = self._handles, None
        if handles is None:
            return
        if handles.pid != os.getpid():  # inherited through fork: never touch, never free
            _INHERITED.append(handles)
            return
        handles.users.discard(self)
        if not handles.users:
            entry = _PROCESS_CACHE.get(self._cache_key())
            if entry is not None and entry[0] is handles:
                _PROCESS_CACHE[self._cache_key()] = (None, entry[1])  # keep the joinids
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
            cached = _PROCESS_CACHE.get(self._cache_key())
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
            _remember(self._cache_key(), None, self._arrays)
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
        var = self.var_joinids
        x = self.experiment().ms[MEASUREMENT].X[X_LAYER]
        all_genes = self.spec.var_filter is None
        var_is_range = bool(var.size and var[0] == 0 and var[-1] == var.size - 1)
        counts = np.zeros(joinids.size, dtype=np.int64)
        cols_parts: list[np.ndarray] = []
        data_parts: list[np.ndarray] = []
        for lo in range(0, joinids.size, _READ_CELLS):
            part = joinids[lo : lo + _READ_CELLS]
            coords = (part,) if all_genes else (part, var)
            rows_p, cols_p, vals_p = [], [], []
            for table in x.read(coords=coords).tables():
                rows_p.append(table.column("soma_dim_0").to_numpy())
                cols_p.append(table.column("soma_dim_1").to_numpy())
                vals_p.append(table.column("soma_data").to_numpy())
            if not rows_p:
                continue
            rows = np.concatenate(rows_p)
            var_ids = np.concatenate(cols_p)
            vals = np.concatenate(vals_p)
            if var_is_range:  # var joinids 0..n-1: the joinid is the position
                cols = var_ids
            else:
                cols = np.searchsorted(var, var_ids)
                keep = cols < var.size
                keep[keep] = var[cols[keep]] == var_ids[keep]
                if not keep.all():
                    rows, cols, vals = rows[keep], cols[keep], vals[keep]
            pos = _positions(part, rows)
            key = pos * np.int64(var.size + 1) + cols
            if key.size > 1 and np.any(np.diff(key) <= 0):
                order = np.argsort(key, kind="stable")  # long sorted runs: fast
                pos, cols, vals = pos[order], cols[order], vals[order]
            counts[lo : lo + part.size] = np.bincount(pos, minlength=part.size)
            cols_parts.append(cols.astype(np.int32))
            data_parts.append(vals)
        indptr = np.zeros(joinids.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.concatenate(cols_parts) if cols_parts else np.zeros(0, np.int32)
        data = np.concatenate(data_parts) if data_parts else np.zeros(0, self.dtype)
        return indptr, indices, data.astype(self.dtype, copy=False)

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
        x = exp.ms[MEASUREMENT].X[X_LAYER]
        out = np.zeros(joinids.size, dtype=np.float64)
        for lo in range(0, joinids.size, _READ_CELLS):
            part = joinids[lo : lo + _READ_CELLS]
            for table in x.read(coords=(part,)).tables():
                rows = table.column("soma_dim_0").to_numpy()
                vals = table.column("soma_data").to_numpy().astype(np.float64)
                out[lo : lo + part.size] += np.bincount(
                    _positions(part, rows), weights=vals, minlength=part.size)
        return out

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


def _positions(part: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Position of each joinid of ``rows`` in the sorted ``part``: a lookup table when
    ``part`` spans a narrow range of joinids, a binary search otherwise."""
    lo, span = int(part[0]), int(part[-1] - part[0]) + 1
    if span == part.size:
        return rows - lo
    if span <= 16 * part.size:
        table = np.empty(span, dtype=np.int64)
        table[part - lo] = np.arange(part.size)
        return table[rows - lo]
    return np.searchsorted(part, rows)


class _Handles:
    """An open Census root and its experiment, owned by the process that opened them. Copies
    of one query in that process may share them (``users``: the live queries using them); they
    are closed when the last user closes, or when the cache drops them and no query uses them."""

    def __init__(self, root: Any, exp: Any) -> None:
        self.root: Any = root
        self.exp: Any = exp
        self.pid = os.getpid()
        self.users: weakref.WeakSet[CensusQuery] = weakref.WeakSet()
        self.cached = False

    def usable(self) -> bool:
        return self.pid == os.getpid() and self.root is not None

    def close(self) -> None:
        if self.pid != os.getpid() or self.root is None:
            return  # never touch a parent's handles in a forked child
        root, self.root, self.exp = self.root, None, None
        root.close()

    def drop(self) -> None:
        """No longer cached: close now unless a live query still uses the handles (then its
        close() does, or they are freed with it, their context alive)."""
        self.cached = False
        if not self.users:
            self.close()


#: per process: query key -> (shared SOMA handles or None, (obs joinids, var joinids, genes))
_PROCESS_CACHE: dict[tuple[Any, ...], tuple[_Handles | None, Any]] = {}
_CACHE_SIZE = 4
#: per process: TileDB configuration -> the one SOMATileDBContext of this process for it
_CONTEXTS: dict[tuple[tuple[str, str], ...], Any] = {}
#: TileDB objects a forked child inherited from its parent (handles, contexts). They must not
#: be used or destroyed in the child (their thread pools do not exist there: that crashes), so
#: they are kept here, unused, for the life of the process (see _after_fork_in_child).
_INHERITED: list[Any] = []


def _context(tiledb_config: Mapping[str, Any] | None) -> Any:
    """The ``SOMATileDBContext`` of this process for ``tiledb_config`` (the cellxgene_census
    defaults plus these settings), created once and shared by every root opened here: every
    context owns TileDB thread pools, and arrays must never outlive their context."""
    key = tuple(sorted((str(k), str(v)) for k, v in (tiledb_config or {}).items()))
    context = _CONTEXTS.get(key)
    if context is None:
        import cellxgene_census

        config = dict(tiledb_config) if tiledb_config else None
        context = cellxgene_census.get_default_soma_context(tiledb_config=config)
        _CONTEXTS[key] = context
    return context


def _remember(key: tuple[Any, ...], handles: _Handles | None, arrays: Any) -> None:
    old = _PROCESS_CACHE.pop(key, None)
    if old is not None:
        if handles is None:
            handles = old[0]
        elif old[0] is not None and old[0] is not handles:
            old[0].drop()
        arrays = arrays if arrays is not None else old[1]
    if handles is not None and not handles.usable():
        handles = None
    while len(_PROCESS_CACHE) >= _CACHE_SIZE:
        evicted = _PROCESS_CACHE.pop(next(iter(_PROCESS_CACHE)))[0]
        if evicted is not None and evicted is not handles:
            evicted.drop()
    if handles is not None:
        handles.cached = True
    _PROCESS_CACHE[key] = (handles, arrays)


def _after_fork_in_child() -> None:
    """In a forked child: set the parent's cached handles and contexts aside, alive and
    untouched, so that the child opens its own (queries holding a parent's handles notice the
    pid on their next use)."""
    if _PROCESS_CACHE or _CONTEXTS:
        _INHERITED.append((dict(_PROCESS_CACHE), dict(_CONTEXTS)))
        _PROCESS_CACHE.clear()
        _CONTEXTS.clear()


def _pin(obj: Any) -> None:
    """One extra reference to ``obj`` that is never released: not even the interpreter
    shutdown of a forked child that exits normally frees what ``_INHERITED`` holds."""
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    except Exception:  # pragma: no cover - not CPython
        pass


def _close_cache_at_exit() -> None:
    """Close this process's cached handles before interpreter shutdown tears modules down in
    an arbitrary order (forked children leave with ``os._exit`` and never get here)."""
    entries = list(_PROCESS_CACHE.values())
    _PROCESS_CACHE.clear()
    for handles, _ in entries:
        if handles is not None:
            handles.drop()


_pin(_INHERITED)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_cache_at_exit)


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
