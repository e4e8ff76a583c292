"""Gene vocabularies: the mapping between gene identifiers and integer ids.

Ids 0–3 are the special tokens ``<pad>``, ``<unk>``, ``<mask>``, ``<cls>``; genes follow.
A gene's token is its primary identifier (an Ensembl id for the shipped tables); an optional
symbol per token is accepted as an alias by :meth:`GeneVocab.encode`. Ensembl ids are matched
without their version suffix (``ENSG00000141510.18`` → ``ENSG00000141510``).

A multi-species vocabulary (:meth:`GeneVocab.multi_species`) also records each token's
organism of origin and, per organism, extra names that land on a token of another organism:
a mouse gene with a one-to-one human ortholog is an alias of the human gene's token. Lookups
can be restricted to one organism's names (``encode(genes, organism="mouse")``).
numpy only: the loader imports this module on training nodes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import VocabularyError
from scmf_loader.organisms import (
    ORTHOLOG_SOURCE,
    TABLE_SOURCE,
    canonical_organism,
    gene_table,
    human_mouse_layout,
)

__all__ = ["BUILTIN_VOCABS", "CLS_ID", "MASK_ID", "PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "GeneVocab",
           "normalize_gene_id", "resolve_vocab"]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<cls>")
PAD_ID, UNK_ID, MASK_ID, CLS_ID = 0, 1, 2, 3
VOCAB_FORMAT = "scmf-vocab"
VOCAB_FORMAT_VERSION = 1
_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$")
#: Names :meth:`GeneVocab.from_name` resolves to a shipped vocabulary.
BUILTIN_VOCABS = (
    "human_protein_coding", "mouse_protein_coding", "human+mouse", "human+mouse:mouse_only=token",
)


def normalize_gene_id(gene: str) -> str:
    """Strip an Ensembl version suffix (``ENSG….12`` → ``ENSG…``); other names unchanged."""
    m = _ENSEMBL_VERSIONED.match(gene)
    return m.group(1) if m else gene


class GeneVocab:
    """A gene vocabulary with the four special tokens at ids 0–3.

    Build one with :meth:`from_genes`, :meth:`from_adata`, :meth:`from_file`,
    :meth:`from_name`, :meth:`human_protein_coding`, :meth:`mouse_protein_coding`,
    :meth:`multi_species` or :meth:`union`; :meth:`encode` maps names to ids (unknown →
    ``<unk>``), :meth:`decode` maps ids back to tokens. ``origins`` (one organism or ``None``
    per token) and ``aliases`` (organism → {name: id}) make a multi-species vocabulary.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        symbols: Sequence[str | None] | None = None,
        *,
        name: str = "custom",
        species: str | None = None,
        source: str | None = None,
        origins: Sequence[str | None] | None = None,
        aliases: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise VocabularyError(f"vocabulary must start with the special tokens "
                                  f"{list(SPECIAL_TOKENS)}, found {tokens[:4]}")
        if symbols is not None and len(symbols) != len(tokens):
            raise VocabularyError(f"symbols has {len(symbols)} entries but the vocabulary has "
                                  f"{len(tokens)} tokens")
        index: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str) or not tok:
                raise VocabularyError(f"token {i} is {tok!r}; tokens must be non-empty strings")
            tok = normalize_gene_id(tok) if i >= 4 else tok
            if tok in index:
                raise VocabularyError(f"duplicate gene {tok!r} at ids {index[tok]} and {i}; "
                                      "genes must be unique")
            index[tok] = i
            tokens[i] = tok
        self._tokens = tokens
        self._symbols = list(symbols) if symbols is not None else None
        self._index = index
        self.name = name
        self.species = species
        self.source = source
        self._origins = self._check_origins(origins) if origins is not None else None
        self._extra = self._check_aliases(aliases or {})
        seen = [o for o in (self._origins or []) if o is not None]
        self._organisms = tuple(dict.fromkeys([*seen, *self._extra]))
        self._any = self._names(None)
        self._by_organism: dict[str, dict[str, int]] = {}

    def _check_origins(self, origins: Sequence[str | None]) -> list[str | None]:
        if len(origins) != len(self._tokens):
            raise VocabularyError(f"origins has {len(origins)} entries but the vocabulary has "
                                  f"{len(self._tokens)} tokens")
        if any(o is not None for o in origins[:4]):
            raise VocabularyError("the special tokens have no organism: their origins must be null")
        return [None if o is None else canonical_organism(o) for o in origins]

    def _check_aliases(self, aliases: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        n = len(self._tokens)
        for org, names in aliases.items():
            table = out.setdefault(canonical_organism(org), {})
            for alias, i in names.items():
                if not isinstance(i, int) or not 4 <= i < n:
                    raise VocabularyError(f"alias {alias!r} ({org}) points to id {i!r}; "
                                          f"expected a gene id in 4..{n - 1}")
                table[normalize_gene_id(str(alias))] = i
        return out

    def _names(self, organism: str | None) -> dict[str, int]:
        """The name → id table of one organism (``None``: every organism, in order)."""
        origin = self._origins or [None if i < 4 else self.species for i in range(len(self))]
        groups: dict[str | None, dict[str, int]] = {}
        for i, sym in enumerate(self._symbols or []):
            if i < 4 or not sym or sym in self._index:
                continue
            group = groups.setdefault(origin[i], {})
            # A symbol shared by two tokens of one organism is ambiguous: it maps to neither.
            group[sym] = -1 if sym in group else i
        orgs = [organism] if organism else [*self._organisms, *(g for g in groups if g not in self._organisms)]
        table = {t: i for t, i in self._index.items() if not organism or i < 4 or origin[i] == organism}
        for org in orgs:
            for key, i in [*groups.get(org, {}).items(), *self._extra.get(org, {}).items()]:
                if i >= 0:
                    table.setdefault(key, i)
        return table

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_genes(cls, genes: Iterable[str], **kwargs: Any) -> GeneVocab:
        """A vocabulary of the special tokens followed by ``genes`` in the given order."""
        genes = [str(g) for g in genes]
        specials = [g for g in genes if g in SPECIAL_TOKENS]
        if specials:
            raise VocabularyError(f"gene list contains reserved special tokens {specials}")
        return cls([*SPECIAL_TOKENS, *genes], **kwargs)

    @classmethod
    def from_adata(cls, adata: Any, key: str = "var_names") -> GeneVocab:
        """Vocabulary of an AnnData's genes: ``var_names`` or the ``var`` column ``key``."""
        if key == "var_names":
            genes = [str(g) for g in adata.var_names]
        else:
            if key not in adata.var.columns:
                raise VocabularyError(f"var has no column {key!r}; available: {list(adata.var.columns)}")
            genes = [str(g) for g in adata.var[key]]
        return cls.from_genes(genes, name="from_adata", source=key)

    @classmethod
    def _shipped(cls, organism: str, name: str) -> GeneVocab:
        ids, syms = zip(*gene_table(organism), strict=True)
        return cls([*SPECIAL_TOKENS, *ids], [*([None] * 4), *syms], name=name, species=organism,
                   source=TABLE_SOURCE[organism])

    @classmethod
    def human_protein_coding(cls) -> GeneVocab:
        """The shipped default: GENCODE v48 human protein-coding genes (19,449), tokens are
        Ensembl ids, symbols accepted as aliases."""
        return cls._shipped("homo_sapiens", "human_protein_coding")

    @classmethod
    def mouse_protein_coding(cls) -> GeneVocab:
        """GENCODE vM37 mouse protein-coding genes (21,637) from the same source as the human
        table; tokens are mouse Ensembl ids (``ENSMUSG…``), symbols (``Cd3e``) aliases."""
        return cls._shipped("mus_musculus", "mouse_protein_coding")

    @classmethod
    def multi_species(
        cls,
        organisms: Sequence[str] = ("human", "mouse"),
        mouse_only: str = "drop",
        orthologs: str = "one2one",
    ) -> GeneVocab:
        """One vocabulary for human and mouse: the human protein-coding tokens, onto which
        every mouse gene with a one-to-one human ortholog (Ensembl BioMart) is mapped.

        ``encode`` then accepts the mouse gene's Ensembl id (versioned or not) and symbol and
        returns the human gene's id. Mouse genes whose orthology is one-to-many or
        many-to-many are left out (they encode to ``<unk>``). Mouse genes with no human
        ortholog in the tables are dropped (``mouse_only="drop"``) or get tokens of their own
        after the human ones (``mouse_only="token"``). ``orthologs`` must be ``"one2one"``.
        See ``docs/species.md`` for the counts.
        """
        orgs = list(dict.fromkeys(canonical_organism(o) for o in organisms))
        if orgs == ["homo_sapiens"]:
            return cls.human_protein_coding()
        if orgs == ["mus_musculus"]:
            return cls.mouse_protein_coding()
        if sorted(orgs) != ["homo_sapiens", "mus_musculus"]:
            raise VocabularyError(
                f"multi_species supports human and mouse; got organisms {list(organisms)!r}"
            )
        if mouse_only not in ("drop", "token"):
            raise VocabularyError(f"mouse_only must be 'drop' or 'token', got {mouse_only!r}")
        if orthologs != "one2one":
            raise VocabularyError(
                f"orthologs must be 'one2one' (the only mapping that keeps one value per "
                f"token), got {orthologs!r}"
            )
        genes, aliases = human_mouse_layout(mouse_only == "token", offset=len(SPECIAL_TOKENS))
        tokens, symbols, origins = (list(col) for col in zip(*genes, strict=True))
        return cls(
            [*SPECIAL_TOKENS, *tokens], [None] * 4 + symbols,
            name="human+mouse" if mouse_only == "drop" else "human+mouse:mouse_only=token",
            species="homo_sapiens+mus_musculus",
            source=f"{TABLE_SOURCE['homo_sapiens']}; {TABLE_SOURCE['mus_musculus']}; "
            f"{ORTHOLOG_SOURCE}",
            origins=[None] * 4 + origins, aliases={"mus_musculus": aliases},
        )

    @classmethod
    def from_name(cls, name: str) -> GeneVocab:
        """A shipped vocabulary by name (one of :data:`BUILTIN_VOCABS`): ``"human_protein_coding"``,
        ``"mouse_protein_coding"``, ``"human+mouse"`` (= :meth:`multi_species`) or
        ``"human+mouse:mouse_only=token"``. What ``scmf-convert --vocab NAME`` resolves."""
        if name == "human_protein_coding":
            return cls.human_protein_coding()
        if name == "mouse_protein_coding":
            return cls.mouse_protein_coding()
        if name in ("human+mouse", "human+mouse:mouse_only=token"):
            return cls.multi_species(["human", "mouse"], mouse_only=name.partition("=")[2] or "drop")
        raise VocabularyError(f"unknown vocabulary name {name!r}; shipped: {list(BUILTIN_VOCABS)}")

    @classmethod
    def union(cls, inputs: Iterable[GeneVocab | Iterable[str]], name: str = "union") -> GeneVocab:
        """The union of several vocabularies or gene lists, in first-seen order (single-organism
        vocabularies only: the union of multi-species ones is refused)."""
        seen: dict[str, str | None] = {}
        for item in inputs:
            if isinstance(item, GeneVocab):
                if item._origins is not None or item._extra:
                    raise VocabularyError(
                        f"cannot take the union of the multi-species vocabulary {item.name!r}"
                    )
                syms = item._symbols or [None] * len(item)
                pairs = list(zip(item._tokens[4:], syms[4:], strict=True))
            else:
                pairs = [(normalize_gene_id(str(g)), None) for g in item]
            for tok, sym in pairs:
                if tok not in seen or seen[tok] is None:
                    seen[tok] = sym
        symbols = list(seen.values())
        has_symbols = any(s is not None for s in symbols)
        return cls(
            [*SPECIAL_TOKENS, *seen],
            [*([None] * 4), *symbols] if has_symbols else None,
            name=name,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GeneVocab:
        """Load a vocabulary saved by :meth:`save` (``.json``), a TSV with a ``token`` (and
        optional ``symbol``, ``origin``, ``aliases:<organism>``) header, or a plain
        one-gene-per-line text file."""
        p = Path(path)
        if not p.is_file():
            raise VocabularyError(f"{p}: vocabulary file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise VocabularyError(f"{p}: not a UTF-8 text file ({exc})") from exc
        try:
            if p.suffix == ".json":
                return cls._from_json(json.loads(text))
            return cls._from_tsv(text)
        except json.JSONDecodeError as exc:
            raise VocabularyError(f"{p}: not valid JSON ({exc})") from exc
        except VocabularyError as exc:
            raise VocabularyError(f"{p}: {exc}") from None

    @classmethod
    def _from_json(cls, d: Any) -> GeneVocab:
        if not isinstance(d, dict) or d.get("format") != VOCAB_FORMAT:
            raise VocabularyError(f"not a {VOCAB_FORMAT} JSON file")
        if d.get("format_version") != VOCAB_FORMAT_VERSION:
            raise VocabularyError(
                f"vocab format_version is {d.get('format_version')!r}; expected {VOCAB_FORMAT_VERSION}"
            )
        origins = [org for org, count in d.get("origins") or [] for _ in range(int(count))]
        return cls(
            d["tokens"], d.get("symbols"), name=d.get("name", "custom"),
            species=d.get("species"), source=d.get("source"),
            origins=origins or None, aliases=d.get("aliases"),
        )

    @classmethod
    def _from_tsv(cls, text: str) -> GeneVocab:
        lines = [ln.rstrip("\r") for ln in text.split("\n")]
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise VocabularyError("empty vocabulary file")
        header = lines[0].split("\t")
        if header[0] != "token":
            tokens = [ln.split("\t")[0] for ln in lines]
            return cls(tokens if tuple(tokens[:4]) == SPECIAL_TOKENS else [*SPECIAL_TOKENS, *tokens])
        rows = [ln.split("\t") + [""] * (len(header) - 1) for ln in lines[1:]]
        col = {h: k for k, h in enumerate(header)}
        tokens = [r[0] for r in rows]
        symbols = [r[col["symbol"]] or None for r in rows] if "symbol" in col else None
        origins = [r[col["origin"]] or None for r in rows] if "origin" in col else None
        aliases = {
            h.partition(":")[2]: {a: i for i, r in enumerate(rows) for a in r[k].split(",") if a}
            for h, k in col.items() if h.startswith("aliases:")
        }
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            if origins is not None or aliases:
                raise VocabularyError("a TSV with origins or aliases must list the special tokens")
            tokens = [*SPECIAL_TOKENS, *tokens]
            symbols = [*([None] * 4), *symbols] if symbols is not None else None
        return cls(tokens, symbols, origins=origins, aliases=aliases or None)

    # ---- persistence --------------------------------------------------------------------
    @property
    def is_multi_species(self) -> bool:
        """True for a vocabulary with per-token origins or per-organism aliases."""
        return self._origins is not None or bool(self._extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes for a ``.json`` path. A multi-species
        vocabulary adds ``organisms``, ``origins`` (run-length ``[[organism, count], ...]``,
        ``null`` for the special tokens) and ``aliases`` (organism → {name: id})."""
        d: dict[str, Any] = {
            "format": VOCAB_FORMAT,
            "format_version": VOCAB_FORMAT_VERSION,
            "name": self.name,
            "species": self.species,
            "source": self.source,
            "special_tokens": list(SPECIAL_TOKENS),
            "tokens": list(self._tokens),
            "symbols": list(self._symbols) if self._symbols is not None else None,
        }
        if self.is_multi_species:
            d["organisms"] = list(self._organisms)
            d["origins"] = [[k, len(list(g))] for k, g in itertools.groupby(self._origins or [])] or None
            d["aliases"] = {org: dict(sorted(a.items())) for org, a in self._extra.items()}
        return d

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as JSON (``.json``) or TSV (any other suffix); both load with :meth:`from_file`."""
        p = Path(path)
        if p.suffix == ".json":
            p.write_text(json.dumps(self.to_dict(), indent=0) + "\n", encoding="utf-8")
            return
        n = len(self._tokens)
        cols: dict[str, list[str]] = {"token": self._tokens}
        if self._symbols is not None:
            cols["symbol"] = [s or "" for s in self._symbols]
        if self._origins is not None:
            cols["origin"] = [o or "" for o in self._origins]
        for org, table in self._extra.items():
            per_token: list[list[str]] = [[] for _ in range(n)]
            for alias, i in sorted(table.items()):
                if "," in alias:
                    raise VocabularyError(f"{p}: alias {alias!r} has a comma; save as .json")
                per_token[i].append(alias)
            cols[f"aliases:{org}"] = [",".join(a) for a in per_token]
        body = "\t".join(cols) + "\n"
        body += "".join("\t".join(row) + "\n" for row in zip(*cols.values(), strict=True))
        p.write_text(body, encoding="utf-8")

    def sha256(self) -> str:
        """Content hash of tokens and symbols, plus origins and aliases for a multi-species
        vocabulary (name and provenance excluded)."""
        content: list[Any] = [self._tokens, self._symbols]
        if self.is_multi_species:
            d = self.to_dict()
            content += [d["organisms"], d["origins"], d["aliases"]]
        blob = json.dumps(content, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # ---- lookup -------------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        """All tokens in id order (a copy)."""
        return list(self._tokens)

    @property
    def symbols(self) -> list[str | None] | None:
        """Per-token symbols in id order (a copy), or ``None``."""
        return list(self._symbols) if self._symbols is not None else None

    @property
    def genes(self) -> list[str]:
        """Gene tokens only (ids 4 and up)."""
        return self._tokens[4:]

    @property
    def organisms(self) -> list[str]:
        """The organisms whose genes this vocabulary maps (canonical names such as
        ``"homo_sapiens"``); ``[species]`` for a single-organism one, ``[]`` if unknown."""
        if self.is_multi_species:
            return list(self._organisms)
        return [self.species] if self.species else []

    @property
    def origins(self) -> list[str | None]:
        """Per-token organism of origin in id order (``None`` for the special tokens)."""
        return [self.origin(i) for i in range(len(self._tokens))]

    def origin(self, token_id: int) -> str | None:
        """Organism of the gene behind token ``token_id`` (``None`` for a special token or a
        vocabulary without species). A human token that mouse orthologs map onto is human."""
        if not 0 <= int(token_id) < len(self._tokens):
            raise VocabularyError(f"id {token_id} is out of range for a vocabulary of "
                                  f"{len(self._tokens)} tokens")
        if self._origins is not None:
            return self._origins[int(token_id)]
        return None if int(token_id) < 4 or self.is_multi_species else self.species

    def aliases(self, organism: str) -> dict[str, int]:
        """Extra names of ``organism`` that map onto tokens (a copy), e.g. the mouse Ensembl
        ids and symbols of one-to-one orthologs → the human token id."""
        return dict(self._extra.get(canonical_organism(organism), {}))

    def _table(self, organism: str | None) -> dict[str, int]:
        if organism is None:
            return self._any
        org = canonical_organism(organism)
        known = self.organisms
        if known and org not in known:
            hint = " (use the human+mouse vocabulary)" if org == "mus_musculus" else ""
            raise VocabularyError(f"vocabulary {self.name!r} covers {known}, not {org}{hint}")
        if not self.is_multi_species:
            return self._any
        if org not in self._by_organism:
            self._by_organism[org] = self._names(org)
        return self._by_organism[org]

    def lookup(self, gene: str, organism: str | None = None) -> int:
        """Id of one gene name (token, versioned Ensembl id, symbol or alias), or ``UNK_ID``.
        With ``organism``, only that organism's names are matched."""
        table = self._table(organism)
        i = table.get(gene)
        return table.get(normalize_gene_id(gene), UNK_ID) if i is None else i

    def encode(self, genes: Iterable[str], organism: str | None = None) -> np.ndarray:
        """Ids (int64) of gene names; unknown names map to the ``<unk>`` id (1). With
        ``organism`` (e.g. ``"mouse"``), only that organism's names are matched."""
        table = self._table(organism)

        def one(g: str) -> int:
            i = table.get(g)
            return table.get(normalize_gene_id(g), UNK_ID) if i is None else i

        return np.fromiter((one(str(g)) for g in genes), dtype=np.int64)

    def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
        """Tokens of ids; an id out of range is an error."""
        n, flat = len(self._tokens), np.asarray(ids, dtype=np.int64).ravel().tolist()
        bad = [i for i in flat if not 0 <= i < n]
        if bad:
            raise VocabularyError(f"id {bad[0]} is out of range for a vocabulary of {n} tokens")
        return [self._tokens[i] for i in flat]

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, gene: object) -> bool:
        return isinstance(gene, str) and self.lookup(gene) != UNK_ID or gene == "<unk>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self.sha256() == other.sha256()

    def __hash__(self) -> int:
        return hash(self.sha256())

    def __repr__(self) -> str:
        return f"GeneVocab(name={self.name!r}, n_tokens={len(self)})"


def resolve_vocab(spec: GeneVocab | str, gene_lists: Sequence[Sequence[str]] = ()) -> GeneVocab:
    """The vocabulary ``spec`` names, as ``--vocab`` is resolved everywhere: a :class:`GeneVocab`
    as is, a shipped one by name (:data:`BUILTIN_VOCABS`: ``"human_protein_coding"``,
    ``"human+mouse"`` ...), ``"union"`` (of ``gene_lists``, Ensembl versions stripped) or a
    vocabulary file (``.json``/``.tsv``, see :meth:`GeneVocab.from_file`)."""
    if isinstance(spec, GeneVocab):
        return spec
    if spec == "union":
        return GeneVocab.union([[normalize_gene_id(str(g)) for g in genes] for genes in gene_lists])
    return GeneVocab.from_name(spec) if spec in BUILTIN_VOCABS else GeneVocab.from_file(spec)
