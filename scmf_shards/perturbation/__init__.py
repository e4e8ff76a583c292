"""Perturbation metadata at conversion: detect the columns, parse the labels, normalise.

:func:`parse_perturbations` turns an obs frame into the six schema columns of
:mod:`~scmf_shards.perturbation.schema` (``perturbation``, ``perturbation_type``,
``perturbation_targets``, ``dose_um``, ``time_h``, ``is_control``) plus counts of what did not
parse. Column detection lives in :mod:`.detect`, guide/target/compound/control labels in
:mod:`.labels`, doses and times in :mod:`.doses`. Pure functions over pandas and numpy:
no pertpy (its conventions are followed: the ``perturbation`` column, the ``control`` label).
"""

from __future__ import annotations

from scmf_shards.perturbation.detect import DetectedColumns, assign_columns, detect_columns
from scmf_shards.perturbation.doses import parse_dose, parse_time
from scmf_shards.perturbation.labels import parse_label
from scmf_shards.perturbation.schema import COLUMNS, ParsedLabel
from scmf_shards.perturbation.table import (
    PerturbationLabelError,
    PerturbationTable,
    parse_perturbations,
)

__all__ = [
    "COLUMNS",
    "DetectedColumns",
    "ParsedLabel",
    "PerturbationLabelError",
    "PerturbationTable",
    "assign_columns",
    "detect_columns",
    "parse_dose",
    "parse_label",
    "parse_perturbations",
    "parse_time",
]
