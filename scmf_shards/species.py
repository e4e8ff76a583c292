"""Organisms of the converter's sources, and how their genes land on a multi-species vocabulary.

Pure functions, no I/O: the converter hands in what it read (obs columns, ``uns``, gene names).

- :func:`parse_organisms` reads ``--organism homo_sapiens,mus_musculus`` (any accepted name);
- :func:`detect_organism` tells a source's organism from obs ``organism_ontology_term_id`` /
  ``organism``, ``uns``, or the Ensembl gene-id prefix (``ENSG`` human, ``ENSMUSG`` mouse), and
  refuses a source that cannot be told or whose evidence disagrees;
- :func:`check_vocab_covers` refuses a source whose organism the vocabulary does not map;
- :func:`mapping_counts` counts, per source, genes on their own organism's tokens, genes mapped
  through a one-to-one ortholog, genes dropped for non-one-to-one orthology, and unmapped ones;
- :func:`check_one_gene_per_token` refuses two source genes that land on one token (never
  summed), naming both.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from scmf_loader.errors import ConfigurationError, InvalidInputError, VocabularyError
from scmf_loader.organisms import ORGANISMS, canonical_organism, gene_table, ortholog_table
from scmf_loader.vocab import UNK_ID, GeneVocab, normalize_gene_id

__all__ = [
    "OBS_KEYS",
    "MappingCounts",
    "check_one_gene_per_token",
    "check_vocab_covers",
    "detect_organism",
    "mapping_counts",
    "parse_organisms",
]

#: obs / uns keys read for the organism, most specific first.
OBS_KEYS = ("organism_ontology_term_id", "organism")
_PREFIX = {"homo_sapiens": re.compile(r"^ENSG\d{11}"), "mus_musculus": re.compile(r"^ENSMUSG\d{11}")}
_HINT = "pass --organism " + " or --organism ".join(ORGANISMS)


def parse_organisms(value: str | Sequence[str]) -> list[str]:
    """Canonical organisms of an ``--organism`` value: ``"homo_sapiens,mus_musculus"``, a list,
    or any accepted name (``human``, ``Mus musculus``, ``NCBITaxon:10090``). Raises
    :class:`~scmf_loader.errors.ConfigurationError` for an unknown or empty value."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip()]
    if not items:
        raise ConfigurationError(f"--organism is empty; {_HINT}")
    out = []
    for item in items:
        try:
            out.append(canonical_organism(item))
        except VocabularyError as exc:
            raise ConfigurationError(f"--organism: {exc}") from None
    return list(dict.fromkeys(out))


def _values(where: str, raw: Any, source: str) -> set[str]:
    """Canonical organisms named by one obs column or uns entry (missing values ignored)."""
    if isinstance(raw, str) or not isinstance(raw, Iterable):
        raw = [raw]
    elif hasattr(raw, "unique"):  # a pandas Series: one pass in C, not a Python set of 10M cells
        raw = list(raw.unique())
    found = set()
    for v in set(raw):
        if v is None or (isinstance(v, float) and v != v) or not str(v).strip():
            continue
        try:
            found.add(canonical_organism(str(v)))
        except VocabularyError:
            raise InvalidInputError(
                f"{source}: {where} names organism {str(v)!r}, which no shipped vocabulary "
                f"covers (supported: {', '.join(ORGANISMS)})"
            ) from None
    return found


def _from_genes(genes: Sequence[str]) -> set[str]:
    return {org for org, pat in _PREFIX.items() if any(pat.match(str(g)) for g in genes)}


def detect_organism(
    source: str,
    *,
    obs: Mapping[str, Any] | None = None,
    uns: Mapping[str, Any] | None = None,
    genes: Sequence[str] = (),
) -> str:
    """The organism of one source, told from its metadata and genes.

    Evidence, all of it read: obs ``organism_ontology_term_id`` and ``organism`` columns
    (``obs`` maps a column name to its values: a DataFrame works), the same keys in ``uns``,
    and the Ensembl prefix of the gene ids (``ENSG`` → human, ``ENSMUSG`` → mouse). Every piece
    must name the same single organism. Raises :class:`~scmf_loader.errors.InvalidInputError`
    naming ``source`` when there is no evidence, when the evidence names two organisms (a mixed
    file, or metadata that disagrees with the genes), or an unsupported organism; the message
    says to pass ``--organism``.
    """
    evidence: dict[str, set[str]] = {}
    for kind, table in (("obs", obs), ("uns", uns)):
        for key in OBS_KEYS:
            if table is not None and key in table:
                found = _values(f"{kind}[{key!r}]", table[key], source)
                if found:
                    evidence[f"{kind}[{key!r}]"] = found
    from_genes = _from_genes(genes)
    if from_genes:
        evidence["gene ids"] = from_genes
    named = set().union(*evidence.values()) if evidence else set()
    if not named:
        first = [str(g) for g in list(genes)[:3]]
        raise InvalidInputError(
            f"{source}: cannot tell the organism: no obs/uns {' or '.join(OBS_KEYS)} and the "
            f"genes are not Ensembl ids (first: {first}); {_HINT}"
        )
    if len(named) > 1:
        said = "; ".join(f"{where}: {', '.join(sorted(orgs))}" for where, orgs in evidence.items())
        raise InvalidInputError(
            f"{source}: ambiguous organism ({said}); convert one organism per source and "
            f"{_HINT}"
        )
    return named.pop()


def check_vocab_covers(vocab: GeneVocab, organism: str, source: str) -> None:
    """Refuse a source of ``organism`` that ``vocab`` does not map (e.g. a mouse file under the
    human-only default), naming the source and the vocabulary to use instead."""
    org = canonical_organism(organism)
    known = vocab.organisms
    if known and org not in known:
        raise VocabularyError(
            f"{source}: its genes are {org} but the vocabulary {vocab.name!r} covers "
            f"{', '.join(known)} only; convert with --vocab human+mouse"
        )


@dataclass(frozen=True)
class MappingCounts:
    """How one source's genes land on a vocabulary (the manifest records one per source).

    ``direct``: genes on a token of their own organism (a human gene on its human token, a
    mouse-only gene on its own token); ``one2one``: genes mapped through a one-to-one ortholog
    onto another organism's token; ``non_one2one``: genes dropped because their orthologs are
    one-to-many or many-to-many; ``unmapped``: every other gene (dropped).
    """

    organism: str
    n_genes: int
    direct: int
    one2one: int
    non_one2one: int
    unmapped: int

    def to_dict(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict."""
        return asdict(self)


@functools.lru_cache(maxsize=2)
def _non_one2one_names(organism: str) -> frozenset[str]:
    """Ids and symbols of ``organism`` genes whose every ortholog is non-one-to-one."""
    if organism != "mus_musculus":
        return frozenset()
    types: dict[str, set[str]] = {}
    for _h, m, t in ortholog_table():
        types.setdefault(m, set()).add(t)
    ids = {m for m, ts in types.items() if "one2one" not in ts}
    return frozenset(ids | {sym for gid, sym in gene_table(organism) if gid in ids})


def mapping_counts(genes: Sequence[str], vocab: GeneVocab, organism: str) -> MappingCounts:
    """Count how the genes of one source of ``organism`` map onto ``vocab`` (see
    :class:`MappingCounts`); the ids are ``vocab.encode(genes, organism=organism)``."""
    org = canonical_organism(organism)
    names = [str(g) for g in genes]
    ids = vocab.encode(names, organism=org)
    hit = ids >= 4
    if vocab.is_multi_species:
        origins = np.array([vocab.origin(int(i)) == org for i in ids[hit]], dtype=bool)
    else:
        origins = np.ones(int(hit.sum()), dtype=bool)
    non = _non_one2one_names(org) if vocab.is_multi_species else frozenset()
    dropped = sum(
        1 for n, i in zip(names, ids.tolist(), strict=True)
        if i < 4 and (n in non or normalize_gene_id(n) in non)
    )
    direct = int(origins.sum())
    return MappingCounts(
        organism=org, n_genes=len(names), direct=direct, one2one=int(hit.sum()) - direct,
        non_one2one=dropped, unmapped=len(names) - int(hit.sum()) - dropped,
    )


def check_one_gene_per_token(
    genes: Sequence[str], vocab: GeneVocab, organism: str, source: str
) -> np.ndarray:
    """The ids of ``genes`` (``vocab.encode(genes, organism=organism)``), after checking that no
    two genes land on one token: two such genes are refused with both names and the token
    (their values are never summed). Raises :class:`~scmf_loader.errors.InvalidInputError`."""
    org = canonical_organism(organism)
    names = [str(g) for g in genes]
    ids = vocab.encode(names, organism=org)
    first: dict[int, int] = {}
    for col, i in enumerate(ids.tolist()):
        if i == UNK_ID or i < 4:
            continue
        if i in first:
            a = first[i]
            symbols = vocab.symbols
            token = vocab.decode([i])[0] + (f" ({symbols[i]})" if symbols and symbols[i] else "")
            raise InvalidInputError(
                f"{source}: {org} genes {names[a]!r} (column {a}) and {names[col]!r} (column "
                f"{col}) both map to token {token}; refusing to sum them: keep one of the two"
            )
        first[i] = col
    return ids
