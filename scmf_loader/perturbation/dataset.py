"""Perturbation datasets: batches with perturbation fields and a matched control per cell.

:class:`PerturbationDataset` reads the normalised perturbation obs columns a conversion with
``--perturbation`` stores (``perturbation``, ``perturbation_type``, ``perturbation_targets``,
``dose_um``, ``time_h``, ``is_control``; see ``docs/perturbation.md``). Each batch is a
:class:`PerturbationBatch`: the cells, and for every cell a *matched control* — a control cell
with the same values of the ``match_on`` obs columns (default: whichever of ``batch``,
``gem_group``, ``plate``, ``cell_line`` the dataset keeps) — plus perturbation ids, padded
target-gene tokens, ``dose_um`` and ``time_h``.

The control of cell ``i`` is drawn from ``(seed, epoch, i)`` by a counter-based hash, so it
does not depend on which batch, rank or worker reads the cell: two runs with one seed give
the same pairs, and a resumed run the same pairs as an uninterrupted one.
:class:`~scmf_loader.perturbation.sampler.PerturbationSampler` balances perturbations within
batches (at most ``k`` cells of one perturbation per batch).

numpy and torch only; the converter's parsing lives in ``scmf_shards.perturbation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from scmf_loader.batch import CSRBatch
from scmf_loader.dataset import CellDataset
from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.vocab import PAD_ID

__all__ = [
    "COLUMNS",
    "DEFAULT_MATCH_ON",
    "PERTURBATION_TYPES",
    "MissingControlError",
    "PerturbationBatch",
    "PerturbationDataset",
    "PerturbationSchemaError",
]

# the normalised obs schema (written by scmf_shards.perturbation.schema; a test keeps the two equal)
PERTURBATION, PERTURBATION_TYPE, TARGETS = "perturbation", "perturbation_type", "perturbation_targets"
DOSE, TIME, IS_CONTROL = "dose_um", "time_h", "is_control"
COLUMNS = (PERTURBATION, PERTURBATION_TYPE, TARGETS, DOSE, TIME, IS_CONTROL)
PERTURBATION_TYPES = ("control", "genetic", "chemical", "combination", "unknown")
TARGET_SEPARATOR = ";"
#: obs columns matched between a perturbed cell and its control, when present
DEFAULT_MATCH_ON = ("batch", "gem_group", "plate", "cell_line")


class PerturbationSchemaError(ScmfError):
    """A dataset lacks the normalised perturbation obs columns, or holds values they cannot
    take (converted without ``--perturbation``, or by another tool)."""


class MissingControlError(ScmfError):
    """A ``match_on`` group holds perturbed cells but no control cell to pair them with."""


def _rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *keys]))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _floats(categories: Sequence[str], where: str) -> np.ndarray:
    """Float value per category, plus NaN for code -1 (the table's last entry)."""
    try:
        return np.array([float(c) for c in categories] + [math.nan], dtype=np.float32)
    except ValueError as e:
        raise PerturbationSchemaError(f"{where}: not a number ({e})") from None


class PerturbationBatch(dict):
    """One batch of a :class:`PerturbationDataset`, a dict of:

    ``cells`` and ``controls`` (:class:`~scmf_loader.batch.CSRBatch`, row ``i`` of
    ``controls`` is the matched control of row ``i`` of ``cells``), ``control_ids`` (int64
    global ids), ``perturbation`` (int64 ids into ``dataset.perturbations``),
    ``perturbation_type`` (int64 index into :data:`PERTURBATION_TYPES`), ``targets`` (int64
    vocabulary ids, ``(cells, max_targets)``, padded with ``<pad>`` = 0), ``dose_um`` and
    ``time_h`` (float32, NaN when not given) and ``is_control`` (bool). Control cells get a
    matched control too (another control of their group when there is one).

    Through :class:`~scmf_loader.dataloader.CellDataLoader` ``output="csr"`` yields this dict
    and ``output="padded"`` / ``"rank"`` / ``"binned"`` the dict of :meth:`to_padded` /
    :meth:`to_rank` / :meth:`to_binned` (plus ``cell_ids`` and ``obs``); ``"dense"`` is not
    supported (use :meth:`dense`).
    """

    FIELDS = ("control_ids", "perturbation", "perturbation_type", "targets", "dose_um", "time_h", "is_control")

    @property
    def cell_ids(self) -> torch.Tensor:
        """Global ids of the batch's cells."""
        return self["cells"].cell_ids

    @property
    def obs(self) -> dict[str, torch.Tensor]:
        """Obs codes of the batch's cells."""
        return self["cells"].obs

    @property
    def n_cells(self) -> int:
        """Cells in the batch."""
        return len(self["cells"])

    def _fields(self) -> dict[str, torch.Tensor]:
        return {k: self[k] for k in self.FIELDS}

    def _both(self, method: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``CSRBatch.<method>`` of cells and controls (the controls' keys prefixed
        ``control_``) with the perturbation fields."""
        cells = getattr(self["cells"], method)(*args, **kwargs)
        controls = getattr(self["controls"], method)(*args, **kwargs)
        return {**cells, **{f"control_{k}": v for k, v in controls.items()}, **self._fields()}

    def to_padded(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Padded token batches of cells and controls (``CSRBatch.to_padded``'s arguments;
        the controls' keys prefixed ``control_``) with the perturbation fields."""
        return self._both("to_padded", *args, **kwargs)

    def to_rank(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``CSRBatch.to_rank`` of cells and controls, as :meth:`to_padded`."""
        return self._both("to_rank", *args, **kwargs)

    def to_binned(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``CSRBatch.to_binned`` of cells and controls, as :meth:`to_padded`."""
        return self._both("to_binned", *args, **kwargs)

    def to_dense(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Not available: a loader's ``output="dense"`` would drop the controls."""
        raise ConfigurationError("a PerturbationBatch has no single dense form: use output='csr' and batch.dense()")

    def dense(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Dense ``expression`` and ``control_expression`` with the perturbation fields."""
        return {"expression": self["cells"].to_dense(dtype), "control_expression": self["controls"].to_dense(dtype),
                **self._fields()}

    def to(self, device: str | torch.device, non_blocking: bool = False) -> PerturbationBatch:
        """The batch with every tensor moved to ``device``."""
        return PerturbationBatch({k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})

    def pin_memory(self) -> PerturbationBatch:
        """The batch in page-locked memory (unchanged without CUDA)."""
        if not torch.cuda.is_available():
            return self
        return PerturbationBatch({k: v.pin_memory() for k, v in self.items()})


class PerturbationDataset(CellDataset):
    """A :class:`~scmf_loader.dataset.CellDataset` whose batches are
    :class:`PerturbationBatch` es: each cell with its perturbation fields and a matched control.

    ``match_on``: obs columns a control must share with its perturbed cell (default: those of
    :data:`DEFAULT_MATCH_ON` the dataset keeps; ``()`` matches any control). ``seed``: the seed
    controls are drawn with (give the loader's); :meth:`set_epoch` (called by
    :class:`PerturbationSampler`) draws new pairs each epoch. Other arguments as for
    ``CellDataset``; ``obs_columns`` always includes the schema and ``match_on`` columns.

    Opening scans the control and ``match_on`` columns of every shard once (O(cells) time,
    O(controls) memory) and raises :class:`MissingControlError` naming every group that holds
    perturbed cells but no control, :class:`PerturbationSchemaError` when the schema columns
    are missing, and ``ConfigurationError`` for a ``match_on`` column the dataset does not keep.
    """

    def __init__(self, source: Any, gene_vocab: Any = None, preprocessing: Any = None, max_genes: int | None = None,
                 *, match_on: Sequence[str] | None = None, seed: int = 0, obs_columns: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(source, gene_vocab, preprocessing, max_genes, **kwargs)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"seed must be an integer >= 0, got {seed!r}")
        where = str(self.store.path) if self.store is not None else "AnnData"
        kept = tuple(self.categories)
        missing = [c for c in COLUMNS if c not in kept]
        if missing:
            raise PerturbationSchemaError(
                f"{where}: obs lacks the perturbation column(s) {missing}; convert with --perturbation auto "
                f"(or COLUMNS) to add them; kept obs columns: {list(kept)}"
            )
        if match_on is None:
            match_on = tuple(c for c in DEFAULT_MATCH_ON if c in kept)
        elif isinstance(match_on, str):
            match_on = (match_on,)
        absent = [c for c in match_on if c not in kept]
        if absent:
            raise ConfigurationError(f"{where}: match_on column(s) {absent} not kept in this dataset; kept: {list(kept)}")
        self.match_on = tuple(match_on)
        self.seed = seed
        self.epoch = 0
        if obs_columns is not None:
            unknown = [c for c in obs_columns if c not in kept]
            if unknown:
                raise ConfigurationError(f"obs column(s) {unknown} not kept in this dataset; kept: {list(kept)}")
            wanted = dict.fromkeys([*obs_columns, *COLUMNS, *self.match_on])
            self.obs_columns = tuple(wanted)
            self.categories = {c: self.categories[c] for c in self.obs_columns}
        self._tables(where)
        self._index_controls(where)

    # ---- decoding ------------------------------------------------------------------------
    @property
    def perturbations(self) -> list[str]:
        """Perturbation names by id (the ``perturbation`` ids of a batch index this list)."""
        return list(self.categories[PERTURBATION])

    def _tables(self, where: str) -> None:
        """Per-category lookup tables of the schema columns (code -1 → the last row)."""
        cats = self.categories
        bad = [t for t in cats[PERTURBATION_TYPE] if t not in PERTURBATION_TYPES]
        flags = {"True": True, "False": False, "true": True, "false": False, "1": True, "0": False}
        odd = [c for c in cats[IS_CONTROL] if c not in flags]
        if bad or odd:
            raise PerturbationSchemaError(
                f"{where}: perturbation_type values {bad} not in {PERTURBATION_TYPES}" if bad
                else f"{where}: is_control values {odd} are not booleans"
            )
        self._type_table = np.array([PERTURBATION_TYPES.index(t) for t in cats[PERTURBATION_TYPE]] + [4], dtype=np.int64)
        self._control_table = np.array([flags[c] for c in cats[IS_CONTROL]] + [False], dtype=bool)
        self._dose_table = _floats(cats[DOSE], f"{where}: obs column {DOSE!r}")
        self._time_table = _floats(cats[TIME], f"{where}: obs column {TIME!r}")
        split = [[t for t in c.split(TARGET_SEPARATOR) if t] for c in cats[TARGETS]]
        width = max([1, *map(len, split)])
        table = np.full((len(split) + 1, width), PAD_ID, dtype=np.int64)
        for i, tokens in enumerate(split):
            table[i, : len(tokens)] = self.vocab.encode(tokens)
        self._target_table = table

    def _group_keys(self, codes: Mapping[str, Any]) -> np.ndarray:
        """One int64 key per cell from its ``match_on`` codes (mixed radix; -1 is a value)."""
        first = codes[IS_CONTROL]
        keys = np.zeros(len(first), dtype=np.int64)
        for c, radix in zip(self.match_on, self._radix, strict=True):
            keys = keys * radix + (np.asarray(codes[c], dtype=np.int64) + 1)
        return keys

    # ---- controls ------------------------------------------------------------------------
    def _index_controls(self, where: str) -> None:
        """Global ids of every control cell sorted by group, and each group's range."""
        self._radix = [len(self.categories[c]) + 1 for c in self.match_on]
        if math.prod(self._radix) >= 2**62:
            raise ConfigurationError(f"{where}: match_on {list(self.match_on)} has too many value combinations")
        ctrl_ids, ctrl_keys, pert_keys = [], [], []
        for s in range(self.n_shards):
            codes = {c: self.obs_codes(s, c) for c in (IS_CONTROL, *self.match_on)}
            is_ctrl = self._control_table[np.asarray(codes[IS_CONTROL], dtype=np.int64)]
            keys = self._group_keys(codes)
            ctrl_ids.append(np.flatnonzero(is_ctrl).astype(np.int64) + int(self.shard_offsets[s]))
            ctrl_keys.append(keys[is_ctrl])
            pert_keys.append(np.unique(keys[~is_ctrl], return_counts=True))
        ids = np.concatenate([np.zeros(0, np.int64), *ctrl_ids])
        keys = np.concatenate([np.zeros(0, np.int64), *ctrl_keys])
        order = np.lexsort((ids, keys))
        self._control_ids, sorted_keys = ids[order], keys[order]
        self._groups, first = np.unique(sorted_keys, return_index=True)
        self._group_ptr = np.append(first, len(sorted_keys)).astype(np.int64)
        perturbed = np.concatenate([np.zeros(0, np.int64), *(k for k, _ in pert_keys)])
        counts = np.concatenate([np.zeros(0, np.int64), *(n for _, n in pert_keys)])
        lonely = ~np.isin(perturbed, self._groups)
        if lonely.any():
            totals: dict[int, int] = {}
            for k, n in zip(perturbed[lonely].tolist(), counts[lonely].tolist(), strict=True):
                totals[k] = totals.get(k, 0) + n
            raise MissingControlError(f"{where}: no control cell to match " + "; ".join(
                f"{self._describe(k)} ({n} perturbed cells)" for k, n in sorted(totals.items())[:10]
            ) + (f"; ... {len(totals) - 10} more groups" if len(totals) > 10 else "")
                + "; choose other match_on columns or add control cells")

    def _describe(self, key: int) -> str:
        """``plate='P3', cell_line='K562'`` of a group key."""
        if not self.match_on:
            return "the whole dataset"
        parts = []
        for c, radix in reversed(list(zip(self.match_on, self._radix, strict=True))):
            key, code = divmod(key, radix)
            parts.append(f"{c}={self.categories[c][code - 1] if code else None!r}")
        return "match group " + ", ".join(reversed(parts))

    def set_epoch(self, epoch: int) -> None:
        """Draw matched controls for ``epoch`` (pairs are a function of seed, epoch and cell)."""
        if epoch < 0:
            raise ConfigurationError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def matched_controls(self, ids: Any, codes: Mapping[str, Any] | None = None) -> np.ndarray:
        """Global ids of the matched controls of cells ``ids`` in the current epoch.
        ``codes``: the cells' obs codes when already read (else read here)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if codes is None:
            codes = CellDataset.__getitems__(self, ids).obs
        codes = {k: np.asarray(v) for k, v in codes.items()}
        g = np.searchsorted(self._groups, self._group_keys(codes))
        lo, hi = self._group_ptr[g], self._group_ptr[g + 1]  # every cell's group has controls
        n = (hi - lo).astype(np.uint64)
        base = np.random.SeedSequence([self.seed, self.epoch, 0x70657274]).generate_state(1, np.uint64)[0]
        h = _mix(ids.astype(np.uint64) ^ base)
        pick = lo + (h % n).astype(np.int64)
        # a control cell drew itself: move it to a uniformly drawn other control of its group
        selfish = (self._control_ids[pick] == ids) & (n > 1)
        if selfish.any():
            step = 1 + (_mix(h[selfish]) % (n[selfish] - np.uint64(1))).astype(np.int64)
            pick[selfish] = lo[selfish] + (pick[selfish] - lo[selfish] + step) % (hi - lo)[selfish]
        return self._control_ids[pick]

    # ---- batches -------------------------------------------------------------------------
    def _collate(self, cells: CSRBatch) -> PerturbationBatch:
        ids = cells.cell_ids.numpy()
        codes = {k: v.numpy() for k, v in cells.obs.items()}
        control_ids = self.matched_controls(ids, codes)
        pert = codes[PERTURBATION].astype(np.int64)

        def row(table: np.ndarray, column: str) -> torch.Tensor:
            return torch.from_numpy(table[codes[column].astype(np.int64)])  # -1 → the last row

        return PerturbationBatch(
            cells=cells, controls=self._rows(control_ids),
            control_ids=torch.from_numpy(control_ids), perturbation=torch.from_numpy(pert),
            perturbation_type=row(self._type_table, PERTURBATION_TYPE), targets=row(self._target_table, TARGETS),
            dose_um=row(self._dose_table, DOSE), time_h=row(self._time_table, TIME),
            is_control=row(self._control_table, IS_CONTROL),
        )

    def _rows(self, ids: np.ndarray) -> CSRBatch:
        """The batch of cells ``ids`` (random, repeating): read once each in id order (one
        run list per shard), then put in ``ids``' order by one vectorised row gather."""
        unique, inverse = np.unique(ids, return_inverse=True)
        return _take_rows(CellDataset.__getitems__(self, unique), inverse.reshape(-1))

    def __getitems__(self, ids: Any) -> PerturbationBatch:  # type: ignore[override]
        """The :class:`PerturbationBatch` of cells ``ids`` (zero copy for the cells when they
        are one range of one shard; the controls are gathered)."""
        return self._collate(CellDataset.__getitems__(self, ids))

    def get_range(self, start: int, stop: int) -> PerturbationBatch:  # type: ignore[override]
        """The batch of cells ``[start, stop)``."""
        return self.__getitems__(np.arange(start, stop, dtype=np.int64))

    def __getitem__(self, index: Any) -> Any:
        """``ds[i]``: the ``CellDataset`` dict of cell ``i`` plus ``perturbation`` (id),
        ``perturbation_name``, ``perturbation_type``, ``targets``, ``dose_um``, ``time_h``,
        ``is_control`` and ``control_id``; ``ds[ids]``: a :class:`PerturbationBatch`."""
        if not isinstance(index, (int, np.integer)):
            return super().__getitem__(index)
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"cell {index} out of range for {len(self)} cells")
        batch = self.__getitems__([i])
        out = self._cell(batch["cells"])
        pert = int(batch["perturbation"][0])
        out.update(
            perturbation=pert, perturbation_name=self.perturbations[pert] if pert >= 0 else None,
            perturbation_type=PERTURBATION_TYPES[int(batch["perturbation_type"][0])],
            targets=batch["targets"][0][batch["targets"][0] != PAD_ID], dose_um=float(batch["dose_um"][0]),
            time_h=float(batch["time_h"][0]), is_control=bool(batch["is_control"][0]),
            control_id=int(batch["control_ids"][0]),
        )
        return out

    def __repr__(self) -> str:
        return (f"PerturbationDataset(n_cells={len(self)}, perturbations={len(self.perturbations)}, "
                f"match_on={list(self.match_on)}, controls={len(self._control_ids)})")


def _take_rows(batch: CSRBatch, rows: np.ndarray) -> CSRBatch:
    """Rows ``rows`` of ``batch`` (any order, repeats allowed) as a new batch; obs and stats
    follow lazily."""
    ip = batch.indptr.numpy()
    lengths = ip[rows + 1] - ip[rows]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    at = np.repeat(ip[rows] - indptr[:-1], lengths) + np.arange(int(indptr[-1]), dtype=np.int64)
    pick = torch.from_numpy(rows)

    def obs() -> dict[str, torch.Tensor]:
        return {k: v[pick] for k, v in batch.obs.items()}

    def stats() -> dict[str, torch.Tensor]:
        return {k: v[pick] for k, v in batch.stats.items()}

    indices, values = batch.indices.numpy().take(at), batch.values.numpy().take(at)
    return CSRBatch(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values),
                    batch.cell_ids[pick], batch.n_genes, obs, stats)
