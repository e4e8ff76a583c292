"""The normalised perturbation obs schema: column names, types and how values are stored.

Whatever a dataset calls its guide, target, compound, dose and time columns, conversion with
``--perturbation`` adds these six obs columns to every shard (pertpy's conventions: the
label column is ``perturbation``, control cells are labelled ``control``):

=====================  ========================================================================
column                 values
=====================  ========================================================================
``perturbation``       canonical label (categorical): ``CEBPA``, ``CEBPA+CEBPB`` (targets sorted),
                       ``Dexamethasone``, ``control``, or ``unknown`` for a label that did not parse
``perturbation_type``  ``genetic`` / ``chemical`` / ``control`` / ``combination`` (two or more
                       agents) / ``unknown``
``perturbation_targets`` target genes as vocabulary tokens, ``;``-joined (missing: none)
``dose_um``            float, µM (NaN when not given)
``time_h``             float, hours (NaN when not given)
``is_control``         bool
=====================  ========================================================================

Shards store every obs column as string categories (``str(value)``; NaN is missing), so a
float is stored as Python's shortest round-trip repr and a bool as ``True``/``False``;
:func:`decode_float` and :func:`decode_bool` read them back. The loader
(:mod:`scmf_loader.perturbation`) keeps its own copy of these names, which a test checks
against this module (the loader never imports the converter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "COLUMNS",
    "CONTROL_LABEL",
    "DOSE",
    "IS_CONTROL",
    "PERTURBATION",
    "PERTURBATION_TYPE",
    "PERTURBATION_TYPES",
    "TARGETS",
    "TARGET_SEPARATOR",
    "TIME",
    "UNKNOWN_LABEL",
    "ParsedLabel",
    "decode_bool",
    "decode_float",
]

PERTURBATION = "perturbation"
PERTURBATION_TYPE = "perturbation_type"
TARGETS = "perturbation_targets"
DOSE = "dose_um"
TIME = "time_h"
IS_CONTROL = "is_control"
#: the six normalised obs columns, in the order they are stored
COLUMNS = (PERTURBATION, PERTURBATION_TYPE, TARGETS, DOSE, TIME, IS_CONTROL)

CONTROL_LABEL = "control"
UNKNOWN_LABEL = "unknown"
TARGET_SEPARATOR = ";"
#: every value ``perturbation_type`` takes (its stored codes follow this order in the loader)
PERTURBATION_TYPES = ("control", "genetic", "chemical", "combination", "unknown")


@dataclass(frozen=True)
class ParsedLabel:
    """One label parsed into the schema: the canonical ``perturbation``, its ``kind`` (one of
    :data:`PERTURBATION_TYPES`), gene ``targets`` (symbols as written, or vocabulary tokens
    once resolved), ``dose_um`` and ``time_h`` (NaN when not given), and the ``agents``
    (canonical names of the perturbing agents, controls excluded)."""

    perturbation: str
    kind: str
    targets: tuple[str, ...] = ()
    dose_um: float = math.nan
    time_h: float = math.nan
    agents: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_control(self) -> bool:
        """Whether the label names control cells."""
        return self.kind == "control"


def decode_float(text: str | None) -> float:
    """A stored float category back to a float (``None`` = missing = NaN)."""
    return math.nan if text is None else float(text)


def decode_bool(text: str | None) -> bool:
    """A stored bool category back to a bool; anything but ``True``/``true``/``1`` is False."""
    return text is not None and text.strip().lower() in ("true", "1")
