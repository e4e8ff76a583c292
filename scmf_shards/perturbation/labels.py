"""Perturbation labels → the schema: CRISPR guides and targets, compounds, controls.

:func:`parse_label` reads one label the way a column of a given *role* means it:

* ``"genetic"`` (guide / target columns): every part names a gene. ``sgCEBPA_2`` → ``CEBPA``
  (``sg``/``sgRNA``/``p-sg`` prefixes and guide numbers dropped), ``CEBPA_only`` → ``CEBPA``,
  ``CEBPA+CEBPB`` and ``CEBPA_CEBPB`` → the combination ``CEBPA+CEBPB``, ``CEBPA+ctrl`` (GEARS)
  → ``CEBPA``.
* ``"chemical"`` (compound / drug columns): every part names a compound, with an optional dose
  (and time) in trailing parentheses or after the name: ``Dexamethasone (10 nM)``,
  ``Dexamethasone (10 nM, 24h)``, ``Dexamethasone_10nM``.
* ``"any"`` (``perturbation`` / ``condition`` / ``treatment``): each part is decided on its
  own: a control word, else a dosed compound, else a gene (in the vocabulary when one is
  given; without one, a guide marker or an upper-case gene-symbol shape), else a compound.

Controls (pertpy's label ``control``): ``ctrl``, ``control``, ``NT``, ``NTC``,
``non-targeting``, ``safe-targeting``, ``NegCtrl0``, ``scrambled``, ``intergenic``,
``vehicle``, ``DMSO``, ``PBS``, ``untreated``, ``mock``, ``none`` — case-insensitive, with
guide prefixes and numbers allowed (``non-targeting_0042``, ``sgNT-2``).

A label that fits none of this returns ``None``: the caller keeps the cell as ``unknown`` and
counts the label, never drops it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from scmf_shards.perturbation.doses import parse_dose, parse_time, split_dose_suffix
from scmf_shards.perturbation.schema import CONTROL_LABEL, ParsedLabel

__all__ = ["CONTROL_WORDS", "ROLES", "is_control_word", "parse_label", "split_parts"]

ROLES = ("genetic", "chemical", "any")

#: control labels after lower-casing and removing ``-``, ``_``, spaces and trailing numbers
CONTROL_WORDS = frozenset({
    "ctrl", "control", "ctl", "nt", "ntc", "nontargeting", "nontarget", "nontargetingcontrol",
    "safetargeting", "safe", "negctrl", "negcontrol", "negativecontrol", "neg", "scramble",
    "scrambled", "intergenic", "vehicle", "dmso", "pbs", "h2o", "water", "untreated", "mock",
    "none", "notreatment", "nodrug", "unperturbed",
})
_GUIDE_PREFIX = re.compile(r"^(?:p-)?(?:sgRNA|sg|gRNA|guide)[-_]?(?=[A-Za-z0-9])")
_DECORATION = re.compile(r"^(?:\d+|only|sg\d*|g\d+|guide\d*)$", re.IGNORECASE)
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9.\-]{0,29}$")
_UPPER_SYMBOL = re.compile(r"^(?:[A-Z][A-Z0-9.\-]*|C\d+orf\d+|ENS[A-Z]*G\d+(?:\.\d+)?)$")
_COMPOUND = re.compile(r"^(?=.*[A-Za-z])[\w(\[][\w\s()\[\],.'+\-:/#]*$")
_TRAILING_PARENS = re.compile(r"^(.*?\S)\s*[(\[]([^()\[\]]*)[)\]]\s*$")
_STARTS_NUMERIC = re.compile(r"^\s*[+]?(?:\d|\.\d)")

Resolve = Callable[[str], str | None]
_Agent = tuple[str, list[str], float, float]


def is_control_word(text: str) -> bool:
    """Whether ``text`` is a control label (see :data:`CONTROL_WORDS`)."""
    t = _GUIDE_PREFIX.sub("", text.strip())
    t = re.sub(r"[-_\s]*\d+$", "", t.lower())
    return re.sub(r"[-_\s]", "", t) in CONTROL_WORDS


def split_parts(label: str, separators: str = "+|;") -> list[str]:
    """``label`` split at ``separators`` outside parentheses (``(+)-JQ1`` stays whole).
    Empty parts make the split fail: the whole label is then one part."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(label):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(depth - 1, 0)
        elif depth == 0 and ch in separators:
            parts.append(label[start:i].strip())
            start = i + 1
    parts.append(label[start:].strip())
    return parts if all(parts) else [label.strip()]


def _genetic(part: str, resolve: Resolve | None, need_vocab: bool, upper_shape: bool) -> _Agent | None:
    """One guide/target part (``sgCEBPA_2``, ``CEBPA_only``, ``A_B``, ``NegCtrl0_NegCtrl0``)
    as genes, as a control (only control tokens), or ``None`` when it does not read as genes.

    A token is a gene when ``resolve`` knows it (as written, else without a trailing guide
    number); failing that, for a guide-marked part or when ``need_vocab`` is off, when it has
    a gene symbol's shape (upper-case only with ``upper_shape``, unless guide-marked)."""
    marked = bool(_GUIDE_PREFIX.match(part))
    tokens = [t for t in _GUIDE_PREFIX.sub("", part).split("_") if t]
    marked = marked or any(_DECORATION.match(t) for t in tokens)
    genes: list[str] = []
    controls = 0
    for token in tokens:
        if _DECORATION.match(token):
            continue
        if is_control_word(token):
            controls += 1
            continue
        gene = _gene(token, resolve, marked, need_vocab and not marked, upper_shape and not marked)
        if gene is None:
            return None
        genes.append(gene)
    if genes:
        return "genetic", genes, math.nan, math.nan
    return ("control", [], math.nan, math.nan) if controls else None


def _gene(token: str, resolve: Resolve | None, marked: bool, need_vocab: bool, upper_shape: bool) -> str | None:
    """One gene symbol from a token: as written, else without a guide number (``CREB1-2``,
    ``CEBPA.1``). The vocabulary decides between the two when it knows either; otherwise a
    guide-marked label drops the number and an unmarked one keeps it (``NKX2-1``)."""
    candidates = [token]
    stripped = re.sub(r"[-.]\d+$", "", token)
    if stripped != token and _SYMBOL.match(stripped):
        candidates = [token, stripped]
    if resolve is not None:
        known = next((c for c in candidates if resolve(c) is not None), None)
        if known is not None or need_vocab:
            return known
    c = candidates[-1] if marked else candidates[0]
    if not _SYMBOL.match(c) or (upper_shape and not _UPPER_SYMBOL.match(c)):
        return None
    return c


def _dose_in(part: str) -> tuple[str, float, float] | None | bool:
    """``(name, dose µM, time h)`` of a dosed compound part; ``False`` when the part carries no
    dose; ``None`` when it carries one that does not parse (``Dex (10 foo)``, ``Dex (0.1%)``)."""
    m = _TRAILING_PARENS.match(part)
    if m is not None and _STARTS_NUMERIC.match(m.group(2)):
        dose, time = math.nan, math.nan
        for item in (s.strip() for s in re.split(r"[,;]", m.group(2))):
            d, t = parse_dose(item), parse_time(item)
            if d is not None and math.isnan(dose):
                dose = d
            elif t is not None and math.isnan(time):
                time = t
            else:
                return None
        return m.group(1), dose, time
    suffix = split_dose_suffix(part)
    if suffix is not None:
        return suffix[0], suffix[1], math.nan
    return False


def _agent(part: str, role: str, resolve: Resolve | None) -> _Agent | None:
    """``(kind, agents, dose, time)`` of one part; ``None`` if it does not parse."""
    if role == "genetic":
        return _genetic(part, resolve, need_vocab=False, upper_shape=False)
    if role == "any" and resolve is not None:
        found = _genetic(part, resolve, need_vocab=True, upper_shape=False)
        if found is not None:
            return found
    dosed = _dose_in(part)
    if dosed is None or parse_dose(part) is not None or parse_time(part) is not None:
        return None  # a bad dose, or a bare quantity (``0.1 uM``) naming no agent
    if dosed:
        name, dose, time = dosed
        return ("chemical", [name], dose, time) if _COMPOUND.match(name) else None
    if role == "any" and resolve is None:
        found = _genetic(part, None, need_vocab=False, upper_shape=True)
        if found is not None:
            return found
    return ("chemical", [part], math.nan, math.nan) if _COMPOUND.match(part) else None


def parse_label(label: str | None, role: str = "any", resolve: Resolve | None = None) -> ParsedLabel | None:
    """One label → :class:`ParsedLabel`, or ``None`` if it does not parse.

    ``resolve(symbol)`` returns the vocabulary token of a gene or ``None``; with it, a part
    of an ``"any"`` column is a gene only if the vocabulary knows it, and a ``"genetic"``
    part whose gene is not in the vocabulary still parses (the target keeps its symbol; the
    caller reports it). ``targets`` hold the symbols as written.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if label is None or not str(label).strip():
        return None
    text = str(label).strip()
    if is_control_word(_strip_parens(text)):
        return ParsedLabel(CONTROL_LABEL, "control")
    kinds: set[str] = set()
    agents: dict[str, None] = {}
    genes: dict[str, None] = {}
    doses, times = [], []
    for part in split_parts(text):
        if is_control_word(_strip_parens(part)):
            continue
        found = _agent(part, role, resolve)
        if found is None:
            return None
        kind, names, dose, time = found
        if kind == "control":
            continue
        kinds.add(kind)
        agents.update(dict.fromkeys(names))
        if kind == "genetic":
            genes.update(dict.fromkeys(names))
        doses.append(dose)
        times.append(time)
    if not agents:
        return ParsedLabel(CONTROL_LABEL, "control")
    order = sorted(agents, key=lambda a: (a.casefold(), a))
    kind = "combination" if len(order) > 1 else kinds.pop()
    return ParsedLabel(
        "+".join(order), kind, tuple(g for g in order if g in genes),
        _one(doses), _one(times), tuple(order),
    )


def _strip_parens(text: str) -> str:
    """``DMSO (0.1%)`` → ``DMSO``: a control keeps its name whatever its parenthetical says."""
    m = _TRAILING_PARENS.match(text)
    return m.group(1) if m else text


def _one(values: list[float]) -> float:
    """The single dose (or time) given among a label's parts; NaN for none or several."""
    given = {v for v in values if not math.isnan(v)}
    return given.pop() if len(given) == 1 else math.nan
