"""``parse_perturbations``: an obs frame → the normalised perturbation columns + unknown counts.

The one function the converter calls (``--perturbation auto|COLUMNS``,
``--strict-perturbation``). Every distinct value (or combination of values across label
columns) is parsed once, then broadcast to the cells, so the cost is O(cells) numpy work plus
O(distinct labels) Python. Nothing is dropped: a label, dose or time that does not parse is
kept as ``unknown`` / NaN and counted in :attr:`PerturbationTable.unknown`; a target gene the
vocabulary does not know keeps its symbol and is counted in
:attr:`PerturbationTable.unknown_targets`. ``strict=True`` refuses both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scmf_loader.errors import InvalidInputError
from scmf_shards.perturbation.detect import DetectedColumns, assign_columns, detect_columns
from scmf_shards.perturbation.doses import parse_dose, parse_time, unit_in_name
from scmf_shards.perturbation.labels import parse_label
from scmf_shards.perturbation.schema import (
    COLUMNS,
    CONTROL_LABEL,
    DOSE,
    IS_CONTROL,
    PERTURBATION,
    PERTURBATION_TYPE,
    PERTURBATION_TYPES,
    TARGET_SEPARATOR,
    TARGETS,
    TIME,
    UNKNOWN_LABEL,
    ParsedLabel,
)

__all__ = ["PerturbationLabelError", "PerturbationTable", "parse_perturbations"]

MISSING = "<missing>"


class PerturbationLabelError(InvalidInputError):
    """Perturbation labels, doses, times or target genes that do not parse, under
    ``--strict-perturbation``."""


@dataclass(frozen=True)
class PerturbationTable:
    """The parsed perturbation metadata of one obs frame.

    ``frame``: the six schema columns (:data:`~scmf_shards.perturbation.schema.COLUMNS`), on
    the obs index; ``columns``: where they were read from; ``unknown``: per source column (or
    ``a+b`` for combined label columns), each value that did not parse → number of cells;
    ``unknown_targets``: target symbols not in the vocabulary → number of cells.
    """

    frame: Any
    columns: DetectedColumns
    unknown: dict[str, dict[str, int]] = field(default_factory=dict)
    unknown_targets: dict[str, int] = field(default_factory=dict)

    @property
    def n_unknown(self) -> int:
        """Values that did not parse, counted per cell (a cell with an unknown label and an
        unknown dose counts twice)."""
        return sum(sum(v.values()) for v in self.unknown.values())

    def counts(self) -> dict[str, int]:
        """Cells per ``perturbation_type``."""
        values = self.frame[PERTURBATION_TYPE].astype(str).value_counts()
        return {k: int(values.get(k, 0)) for k in PERTURBATION_TYPES}

    def report(self) -> list[str]:
        """Human-readable lines for stderr: the columns used, cells per type, and every
        unknown value with its count."""
        lines = [f"perturbation columns: {self.columns.to_dict()}",
                 "perturbation types: " + ", ".join(f"{k}={v}" for k, v in self.counts().items())]
        for column, values in self.unknown.items():
            lines.append(f"unparsed values in {column!r} (kept as {UNKNOWN_LABEL}/NaN): " + _top(values))
        if self.unknown_targets:
            lines.append("target genes not in the vocabulary (kept as written): " + _top(self.unknown_targets))
        return lines

    def to_manifest(self) -> dict[str, Any]:
        """JSON-able summary for the manifest: columns, cells per type, unknown counts."""
        return {"columns": self.columns.to_dict(), "counts": self.counts(),
                "unknown": {k: dict(v) for k, v in self.unknown.items()},
                "unknown_targets": dict(self.unknown_targets)}


def _top(values: dict[str, int], n: int = 10) -> str:
    items = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k!r} ({v} cells)" for k, v in items[:n])
    return text + (f", ... {len(items) - n} more" if len(items) > n else "")


def _objects(column: Any) -> np.ndarray:
    """A pandas column as an object array with ``None`` for missing values."""
    values = np.asarray(column.astype(object), dtype=object)
    missing = np.asarray(column.isna(), dtype=bool)
    values[missing] = None
    return values


def _factorize(*arrays: np.ndarray) -> tuple[np.ndarray, list[tuple[Any, ...]]]:
    """Per-row codes of the distinct value tuples of ``arrays`` (``None`` for missing), and
    those tuples."""
    import pandas as pd

    codes, uniques = [], []
    for a in arrays:
        c, u = pd.factorize(a, use_na_sentinel=True)
        codes.append(c.astype(np.int64))
        uniques.append(list(u))
    keys, inverse = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
    tuples = [tuple(None if k < 0 else uniques[j][k] for j, k in enumerate(row)) for row in keys.tolist()]
    return inverse.reshape(-1), tuples


def _merge(parts: list[ParsedLabel]) -> ParsedLabel:
    """Labels of several label columns of one cell as one: agents joined, controls ignored."""
    if len(parts) == 1:
        return parts[0]
    agents: dict[str, None] = {}
    targets: dict[str, None] = {}
    kinds = set()
    for p in parts:
        if not p.is_control:
            agents.update(dict.fromkeys(p.agents))
            targets.update(dict.fromkeys(p.targets))
            kinds.add(p.kind)
    if not agents:
        return ParsedLabel(CONTROL_LABEL, "control")
    order = sorted(agents, key=lambda a: (a.casefold(), a))
    kind = "combination" if len(order) > 1 else kinds.pop()
    doses = {p.dose_um for p in parts if not math.isnan(p.dose_um)}
    times = {p.time_h for p in parts if not math.isnan(p.time_h)}
    return ParsedLabel(
        "+".join(order), kind, tuple(t for t in order if t in targets),
        doses.pop() if len(doses) == 1 else math.nan, times.pop() if len(times) == 1 else math.nan, tuple(order),
    )


def _labels(obs: Any, cols: DetectedColumns, resolve: Any) -> tuple[np.ndarray, list[ParsedLabel | None], dict[str, dict[str, int]]]:
    """Per-row index into the parsed distinct label combinations (``None`` = unknown)."""
    names = [c for c, _ in cols.labels]
    inverse, combos = _factorize(*(_objects(obs[c]) for c in names))
    counts = np.bincount(inverse, minlength=len(combos))
    parsed: list[ParsedLabel | None] = []
    unknown: dict[str, dict[str, int]] = {}
    key = "+".join(names)
    for combo, n in zip(combos, counts.tolist(), strict=True):
        given = [(v, role) for v, (_, role) in zip(combo, cols.labels, strict=True) if v is not None and str(v).strip()]
        results = [parse_label(str(v), role, resolve) for v, role in given]
        if not given or any(r is None for r in results):
            bad = " | ".join(str(v) for v in combo if v is not None) or MISSING
            unknown.setdefault(key, {})[bad] = unknown.get(key, {}).get(bad, 0) + n
            parsed.append(None)
        else:
            parsed.append(_merge([r for r in results if r is not None]))
    return inverse, parsed, unknown


def _quantities(obs: Any, column: str | None, unit_column: str | None, kind: str, unknown: dict[str, dict[str, int]]) -> np.ndarray:
    """Per-row doses (µM) or times (h) of a column; NaN where missing or unparsed."""
    n = len(obs)
    if column is None:
        return np.full(n, np.nan)
    values = _objects(obs[column])
    units = _objects(obs[unit_column]) if unit_column is not None else np.full(n, None, dtype=object)
    default = unit_in_name(column, kind) or ("h" if kind == "time" else None)
    parse = parse_dose if kind == "dose" else parse_time
    inverse, combos = _factorize(values, units)
    out = np.full(len(combos), np.nan)
    counts = np.bincount(inverse, minlength=len(combos))
    for i, (value, unit) in enumerate(combos):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        x = parse(value, str(unit) if unit is not None else default)
        if x is None:
            bad = f"{value} {unit}" if unit is not None else str(value)
            unknown.setdefault(column, {})[bad] = unknown.get(column, {}).get(bad, 0) + int(counts[i])
        else:
            out[i] = x
    return out[inverse]


def _resolver(vocab: Any) -> Any:
    if vocab is None:
        return None
    from scmf_loader.vocab import UNK_ID

    tokens = vocab.tokens

    def resolve(symbol: str) -> str | None:
        i = vocab.lookup(symbol)
        return None if i == UNK_ID else tokens[i]

    return resolve


def parse_perturbations(
    obs: Any,
    columns: str | Sequence[str] = "auto",
    vocab: Any = None,
    strict: bool = False,
    source: str = "obs",
) -> PerturbationTable:
    """Parse the perturbation metadata of a pandas ``obs`` frame into the normalised schema.

    ``columns``: ``"auto"`` (detect by name and content, see
    :mod:`~scmf_shards.perturbation.detect`), or the columns to read (a comma-separated string
    or a sequence). ``vocab``: a :class:`~scmf_loader.vocab.GeneVocab`; targets are stored as
    its tokens, and in ``perturbation``/``condition`` columns a gene must be in it. ``strict``:
    raise :class:`PerturbationLabelError` (naming ``source``) for any value that does not
    parse or target gene not in ``vocab`` instead of keeping it as ``unknown``.
    """
    if isinstance(columns, str) and columns != "auto":
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    cols = detect_columns(obs, source) if isinstance(columns, str) else assign_columns(obs, list(columns), source)
    resolve = _resolver(vocab)
    inverse, parsed, unknown = _labels(obs, cols, resolve)
    dose = _quantities(obs, cols.dose, cols.dose_unit, "dose", unknown)
    time = _quantities(obs, cols.time, cols.time_unit, "time", unknown)
    counts = np.bincount(inverse, minlength=len(parsed))
    missing_targets: Counter[str] = Counter()
    rows = []
    for p, n in zip(parsed, counts.tolist(), strict=True):
        if p is None:
            rows.append((UNKNOWN_LABEL, UNKNOWN_LABEL, None, math.nan, math.nan))
            continue
        tokens = []
        for symbol in p.targets:
            token = resolve(symbol) if resolve is not None else symbol
            if token is None:
                missing_targets[symbol] += n
            tokens.append(token or symbol)
        rows.append((p.perturbation, p.kind, TARGET_SEPARATOR.join(tokens) or None, p.dose_um, p.time_h))
    if strict and (unknown or missing_targets):
        raise PerturbationLabelError(_strict_message(source, unknown, dict(missing_targets)))
    return PerturbationTable(_frame(obs, rows, inverse, dose, time), cols, unknown, dict(missing_targets))


def _frame(obs: Any, rows: list[tuple[Any, ...]], inverse: np.ndarray, dose: np.ndarray, time: np.ndarray) -> Any:
    import pandas as pd

    per = list(zip(*rows, strict=True)) if rows else [()] * 5
    label_dose = np.asarray(per[3], dtype=np.float64)[inverse] if rows else np.zeros(0)
    label_time = np.asarray(per[4], dtype=np.float64)[inverse] if rows else np.zeros(0)
    kind = np.asarray(per[1], dtype=object)[inverse] if rows else np.zeros(0, dtype=object)

    def categorical(values: tuple[Any, ...], categories: Sequence[str] | None = None) -> Any:
        codes = pd.Categorical(list(values), categories=categories)
        return pd.Categorical.from_codes(np.asarray(codes.codes)[inverse], categories=codes.categories)

    return pd.DataFrame({
        PERTURBATION: categorical(per[0]),
        PERTURBATION_TYPE: categorical(per[1], PERTURBATION_TYPES),
        TARGETS: categorical(per[2]),
        DOSE: np.where(np.isnan(dose), label_dose, dose),
        TIME: np.where(np.isnan(time), label_time, time),
        IS_CONTROL: kind == "control",
    }, index=obs.index)[list(COLUMNS)]


def _strict_message(source: str, unknown: dict[str, dict[str, int]], targets: dict[str, int]) -> str:
    parts = [f"obs column {column!r}: {_top(values, 5)}" for column, values in unknown.items()]
    if targets:
        parts.append(f"target genes not in the vocabulary: {_top(targets, 5)}")
    return (f"{source}: perturbation metadata that does not parse (--strict-perturbation): "
            + "; ".join(parts) + "; fix the labels, name other columns, or drop --strict-perturbation")
