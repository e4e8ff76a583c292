"""Doses and times: ``0.1 uM``, ``1000nM``, ``10 nM`` → µM; ``24h``, ``3 d``, ``30 min`` → hours.

Pure functions over strings and numbers; ``None`` means "could not parse" (the caller counts
it as unknown, never drops it silently). A bare number has no unit: it is parsed only when a
unit comes from elsewhere (a ``dose_unit`` column, or a unit in the column's name such as
``dose_nM`` or ``time_days``).
"""

from __future__ import annotations

import math
import re

__all__ = [
    "CONCENTRATION_UNITS",
    "TIME_UNITS",
    "parse_dose",
    "parse_number",
    "parse_time",
    "split_dose_suffix",
    "to_hours",
    "to_um",
    "unit_in_name",
]

#: concentration units → factor to µM (molar units only: mass or % doses are not convertible)
CONCENTRATION_UNITS = {
    "pm": 1e-6, "picomolar": 1e-6,
    "nm": 1e-3, "nanomolar": 1e-3,
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micromolar": 1.0, "umol/l": 1.0, "µmol/l": 1.0,
    "mm": 1e3, "millimolar": 1e3,
    "m": 1e6, "molar": 1e6,
}
#: time units → factor to hours
TIME_UNITS = {
    "s": 1 / 3600, "sec": 1 / 3600, "secs": 1 / 3600, "second": 1 / 3600, "seconds": 1 / 3600,
    "m": 1 / 60, "min": 1 / 60, "mins": 1 / 60, "minute": 1 / 60, "minutes": 1 / 60,
    "h": 1.0, "hr": 1.0, "hrs": 1.0, "hour": 1.0, "hours": 1.0,
    "d": 24.0, "day": 24.0, "days": 24.0,
    "w": 168.0, "wk": 168.0, "week": 168.0, "weeks": 168.0,
}

_NUMBER = r"[+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_QUANTITY = re.compile(rf"^\s*({_NUMBER})\s*([A-Za-zµμ/]+)?\s*$")
# "<name> 10 nM", "<name>_10nM", "<name>@10uM": a dose at the end of a compound label
_DOSE_SUFFIX = re.compile(rf"^(.*?\S)[\s_@-]+({_NUMBER})\s*([A-Za-zµμ/]+)\s*$")


def parse_number(value: object) -> float | None:
    """A finite non-negative number from an int, float or numeric string; else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    else:
        m = _QUANTITY.match(str(value))
        if m is None or m.group(2):
            return None
        x = float(m.group(1))
    return x if math.isfinite(x) and x >= 0 else None


def to_um(value: float, unit: str) -> float | None:
    """``value`` in ``unit`` (case-insensitive; ``M`` is molar) as µM, or ``None``."""
    factor = CONCENTRATION_UNITS.get(unit.strip().lower())
    return None if factor is None else value * factor


def to_hours(value: float, unit: str) -> float | None:
    """``value`` in ``unit`` as hours, or ``None`` for an unknown unit."""
    factor = TIME_UNITS.get(unit.strip().lower())
    return None if factor is None else value * factor


def _quantity(value: object, default_unit: str | None, convert: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = parse_number(value)
        if x is None or default_unit is None:
            return 0.0 if x == 0 else None  # zero needs no unit
        return convert(x, default_unit)  # type: ignore[operator]
    m = _QUANTITY.match(str(value)) if value is not None else None
    if m is None:
        return None
    x = float(m.group(1))
    unit = m.group(2) or default_unit
    if not math.isfinite(x):
        return None
    if unit is None:
        return 0.0 if x == 0 else None  # zero needs no unit
    return convert(x, unit)  # type: ignore[operator]


def parse_dose(value: object, default_unit: str | None = None) -> float | None:
    """A concentration in µM: ``"0.1 uM"`` → 0.1, ``"1000nM"`` → 1.0, ``10`` with
    ``default_unit="nM"`` → 0.01. ``None`` when it does not parse (a bare non-zero number and no
    unit, a non-molar unit such as ``%`` or ``mg/ml``)."""
    return _quantity(value, default_unit, to_um)


def parse_time(value: object, default_unit: str | None = None) -> float | None:
    """A duration in hours: ``"24h"`` → 24, ``"3 d"`` → 72, ``"30 min"`` → 0.5, ``24`` with
    ``default_unit="h"`` → 24. ``None`` when it does not parse."""
    return _quantity(value, default_unit, to_hours)


def split_dose_suffix(label: str) -> tuple[str, float] | None:
    """``"Dexamethasone 10 nM"`` / ``"Dexamethasone_10nM"`` → ``("Dexamethasone", 0.01)``;
    ``None`` when the label does not end in a molar dose."""
    m = _DOSE_SUFFIX.match(label)
    if m is None:
        return None
    dose = to_um(float(m.group(2)), m.group(3))
    return None if dose is None else (m.group(1), dose)


_NAME_UNIT = re.compile(r"(?:^|[_\s(\[.-])(pm|nm|um|µm|μm|mm|m|s|sec|min|h|hr|hrs|hours?|d|days?|w|weeks?)[)\]]?$")


def unit_in_name(column: str, kind: str) -> str | None:
    """The unit a column's name states (``dose_nM`` → ``nM``; ``time_days`` → ``days``) for
    ``kind`` ``"dose"`` or ``"time"``, or ``None``."""
    m = _NAME_UNIT.search(column.strip().lower())
    if m is None:
        return None
    unit = m.group(1)
    table = CONCENTRATION_UNITS if kind == "dose" else TIME_UNITS
    return unit if unit in table else None
