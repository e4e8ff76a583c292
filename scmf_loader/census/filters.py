"""What a Census query selects, as text: organism names and SOMA value filters.

Pure string work (no SOMA, no numpy): the seed's ``filters`` mapping (a list becomes an
``in`` filter, a scalar ``==``) and/or a filter expression become one ``value_filter``; the
same mapping always gives the same string, since it is hashed into ``dataset_id``. Bad input
raises :class:`~scmf_loader.errors.InvalidInputError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from scmf_loader.errors import InvalidInputError

__all__ = ["DEFAULT_OBS_COLUMNS", "build_value_filter", "normalize_organism"]

#: obs columns kept when none are asked for
DEFAULT_OBS_COLUMNS = ("cell_type", "tissue", "assay", "disease", "donor_id", "dataset_id")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def normalize_organism(name: str) -> str:
    """``"Homo sapiens"`` / ``"homo-sapiens"`` → ``"homo_sapiens"`` (the Census key)."""
    return re.sub(r"[\s\-]+", "_", str(name).strip()).lower()


def _literal(key: str, value: Any) -> str:
    """One value of ``key`` as a SOMA filter literal."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int | float):
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


def _mapping_parts(filters: Mapping[str, Any]) -> list[str]:
    """One filter term per key of ``filters``, keys sorted."""
    if not isinstance(filters, Mapping):
        raise InvalidInputError(
            f"filters must be a mapping of obs column -> value(s), got {type(filters).__name__}"
        )
    parts: list[str] = []
    for key in sorted(filters):
        if not _COLUMN.fullmatch(str(key)):
            raise InvalidInputError(f"filters: {key!r} is not an obs column name")
        value = filters[key]
        if isinstance(value, list | tuple):
            if not value:
                raise InvalidInputError(f"filters: {key!r} lists no values")
            parts.append(f"{key} in [{', '.join(_literal(key, v) for v in value)}]")
        else:
            parts.append(f"{key} == {_literal(key, value)}")
    return parts


def build_value_filter(
    filters: Mapping[str, Any] | None = None, obs_filter: str | None = None
) -> str | None:
    """One SOMA ``value_filter`` from the seed's ``filters`` mapping (a list becomes an ``in``
    filter, a scalar ``==``) and/or a filter expression, joined with ``and``. Keys are sorted,
    so the same mapping always gives the same string; ``None`` when nothing is filtered."""
    parts = _mapping_parts(filters) if filters else []
    if obs_filter is not None and str(obs_filter).strip():
        parts.append(str(obs_filter).strip())
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return " and ".join(f"({p})" for p in parts)
