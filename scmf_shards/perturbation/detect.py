"""Which obs columns hold perturbation metadata: recognised by name, confirmed by content.

``--perturbation auto`` takes one *label* column (the first name match in this priority,
whose content parses): ``perturbation`` / ``perturbation_name`` (pertpy's name) → guide /
sgRNA / gRNA / CRISPR → compound / drug / product_name / chemical → target / gene →
condition / treatment; plus the first ``dose`` / ``concentration`` column, its ``dose_unit``,
and the first ``time`` / ``timepoint`` / ``duration`` column. One label column only, because
datasets often carry several related ones (sci-Plex's ``target`` names the drug's protein
target, not a perturbed gene); name several explicitly (``--perturbation guide,compound``) to
combine them. A label column must hold strings, repeat its values (fewer distinct values
than cells, from 50 cells on) and have at least half of its distinct values parse in its role.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scmf_loader.errors import InvalidInputError
from scmf_shards.perturbation.labels import parse_label
from scmf_shards.perturbation.schema import IS_CONTROL, PERTURBATION_TYPE, TARGETS

__all__ = ["DetectedColumns", "assign_columns", "detect_columns", "label_role"]

# (pattern on the lower-cased column name, role), in auto's priority order
_LABEL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?:perturbation|perturbation[_ ]?name|pert|pert[_ ]?name)$"), "any"),
    (re.compile(r"guide|sgrna|grna|crispr"), "genetic"),
    (re.compile(r"compound|drug|product[_ ]?name|chemical|molecule"), "chemical"),
    (re.compile(r"target|gene"), "genetic"),
    (re.compile(r"perturbation|condition|treatment"), "any"),
)
_DOSE_UNIT = re.compile(r"(?:dose|conc(?:entration)?)[_ ]?units?$")
_TIME_UNIT = re.compile(r"time[_ ]?units?$")
_DOSE = re.compile(r"dose|conc(?:entration)?")
_TIME = re.compile(r"^time|time(?:[_ ]?point)?$|timepoint|duration")
# from this many cells on, a label column must repeat values (all distinct: ids, not labels)
_MIN_CELLS_FOR_REPEATS = 50
_QUANTITY_KINDS = ("dose", "dose_unit", "time", "time_unit")
# the schema's own derived columns are never inputs
_OUTPUTS = frozenset({PERTURBATION_TYPE, TARGETS, IS_CONTROL})


@dataclass(frozen=True)
class DetectedColumns:
    """The obs columns perturbation metadata is read from: ``labels`` as ``(column, role)``
    pairs (role ``genetic`` / ``chemical`` / ``any``), and optional ``dose``, ``dose_unit`` and
    ``time`` columns."""

    labels: tuple[tuple[str, str], ...]
    dose: str | None = None
    dose_unit: str | None = None
    time: str | None = None
    time_unit: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON form (for the manifest)."""
        return {"labels": [list(p) for p in self.labels], "dose": self.dose,
                "dose_unit": self.dose_unit, "time": self.time, "time_unit": self.time_unit}


def label_role(column: str) -> str | None:
    """The label role a column's name suggests, or ``None`` if it names no label column."""
    name = column.strip().lower()
    return next((role for pattern, role in _LABEL_PATTERNS if pattern.search(name)), None)


def _kind(column: str) -> str | None:
    name = column.strip().lower()
    if _DOSE_UNIT.search(name):
        return "dose_unit"
    if _TIME_UNIT.search(name):
        return "time_unit"
    if _DOSE.search(name):
        return "dose"
    if _TIME.search(name):
        return "time"
    return None


def _is_text(values: np.ndarray) -> bool:
    return any(isinstance(v, str) for v in values.tolist())


def _parses(values: np.ndarray, role: str) -> bool:
    """Content check of a label column (``values``: its distinct non-missing values)."""
    if len(values) == 0 or not _is_text(values):
        return False
    ok = sum(parse_label(str(v), role) is not None for v in values.tolist())
    return 2 * ok >= len(values)


def _distinct(obs: object, column: str) -> tuple[np.ndarray, int]:
    col = obs[column]  # type: ignore[index]
    values = col.dropna().unique()
    return np.asarray(values, dtype=object), len(col)


def detect_columns(obs: object, source: str = "obs") -> DetectedColumns:
    """The perturbation columns of a pandas ``obs`` frame (``--perturbation auto``).

    Raises :class:`~scmf_loader.errors.InvalidInputError` naming ``source`` when no label
    column is found."""
    names = [str(c) for c in obs.columns if str(c) not in _OUTPUTS]  # type: ignore[attr-defined]
    label = None
    for pattern, role in _LABEL_PATTERNS:
        for c in names:
            if _kind(c) is None and pattern.search(c.strip().lower()):
                values, n = _distinct(obs, c)
                if (n < _MIN_CELLS_FOR_REPEATS or len(values) < n) and _parses(values, role):
                    label = (c, role)
                    break
        if label is not None:
            break
    if label is None:
        raise InvalidInputError(
            f"{source}: no perturbation label column found among obs columns {names}; expected a "
            "guide, target, perturbation, compound/drug or condition column, or name the columns "
            "with --perturbation COLUMN[,COLUMN]"
        )
    kinds = {k: next((c for c in names if _kind(c) == k), None) for k in _QUANTITY_KINDS}
    return DetectedColumns((label,), **kinds)


def assign_columns(obs: object, columns: Sequence[str], source: str = "obs") -> DetectedColumns:
    """Roles of explicitly named columns (``--perturbation COLUMN[,COLUMN]``): dose, dose unit,
    time and time unit columns by name; every other one is a label column whose role its name
    suggests (``any`` when it suggests none)."""
    present = [str(c) for c in obs.columns]  # type: ignore[attr-defined]
    missing = [c for c in columns if c not in present]
    if missing:
        raise InvalidInputError(f"{source}: obs has no column(s) {missing} named by --perturbation; available: {present}")
    if len(set(columns)) != len(columns):
        raise InvalidInputError(f"{source}: --perturbation names a column twice: {list(columns)}")
    labels: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    for c in columns:
        kind = _kind(c)
        if kind is not None:
            if kind in found:
                raise InvalidInputError(f"{source}: --perturbation names two {kind} columns: {found[kind]!r}, {c!r}")
            found[kind] = c
        else:
            labels.append((c, label_role(c) or "any"))
    if not labels:
        raise InvalidInputError(f"{source}: --perturbation {','.join(columns)} names no label column")
    return DetectedColumns(tuple(labels), **found)
