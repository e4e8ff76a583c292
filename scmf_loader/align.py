"""Gene alignment: map a source's gene columns onto vocabulary ids (numpy only).

The one gene → token alignment of the project. The converter (``scmf-convert``), the quick
``.h5ad`` path (:class:`scmf_loader.adata.AnnDataStore`) and the Census path all build their
column → vocabulary-id map here, so they accept and reject the same gene lists: a gene that
resolves to a special token (``<pad>``, ``<unk>``, ``<mask>``, ``<cls>``) is an error, two
genes that resolve to the same token are an error, and a source with no gene in the
vocabulary is an error. Genes outside the vocabulary are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scmf_loader.errors import InvalidInputError, VocabularyError
from scmf_loader.vocab import SPECIAL_TOKENS, UNK_ID, GeneVocab

__all__ = ["GeneAlignment", "build_alignment", "column_map"]

_N_SPECIAL = len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class GeneAlignment:
    """How one source's columns map onto a vocabulary.

    ``keep_columns``: source column numbers kept, ordered by their vocabulary id (int64);
    ``vocab_ids``: the vocabulary id of each kept column (strictly increasing, int32);
    ``n_source_genes``: the source's column count.
    """

    keep_columns: np.ndarray
    vocab_ids: np.ndarray
    n_source_genes: int

    @property
    def n_matched(self) -> int:
        """Number of source genes found in the vocabulary."""
        return int(self.keep_columns.size)

    @property
    def n_dropped(self) -> int:
        """Number of source genes outside the vocabulary (dropped)."""
        return self.n_source_genes - self.n_matched

    @property
    def is_identity_order(self) -> bool:
        """True when kept columns already appear in vocabulary order (no re-sort needed)."""
        return bool(np.all(np.diff(self.keep_columns) > 0))


def build_alignment(
    genes: Sequence[str], vocab: GeneVocab, source: str, organism: str | None = None
) -> GeneAlignment:
    """Align gene names to ``vocab`` (names may be tokens, versioned Ensembl ids or symbols).

    With ``organism`` (e.g. ``"mouse"`` under a ``human+mouse`` vocabulary), only that
    organism's names match, so a mouse gene never lands on a human gene of the same symbol.

    Raises :class:`~scmf_loader.errors.InvalidInputError` when a gene is a reserved special
    token or two genes map to the same vocabulary token, and
    :class:`~scmf_loader.errors.VocabularyError` when no gene is in the vocabulary; ``source``
    names the input in those messages.
    """
    names = [str(g) for g in genes]
    ids = vocab.encode(names, organism=organism)
    special = (ids < _N_SPECIAL) & (ids != UNK_ID)
    special |= np.fromiter((n in SPECIAL_TOKENS for n in names), dtype=bool, count=len(names))
    if special.any():
        col = int(np.flatnonzero(special)[0])
        raise InvalidInputError(
            f"{source}: gene {names[col]!r} (column {col}) is a reserved special token "
            f"{list(SPECIAL_TOKENS)}"
        )
    cols = np.flatnonzero(ids != UNK_ID)
    if cols.size == 0:
        raise VocabularyError(
            f"{source}: none of its {len(names)} genes is in the vocabulary {vocab.name!r} "
            f"(first genes: {names[:3]}); check the gene column and the vocabulary"
        )
    order = np.argsort(ids[cols], kind="stable")
    keep, kept_ids = cols[order], ids[cols][order]
    dup = np.flatnonzero(kept_ids[1:] == kept_ids[:-1])
    if dup.size:
        a, b = int(keep[dup[0]]), int(keep[dup[0] + 1])
        raise InvalidInputError(
            f"{source}: duplicate gene ids: columns {a} ({names[a]!r}) and {b} ({names[b]!r}) "
            f"both map to vocabulary token {vocab.decode([int(kept_ids[dup[0]])])[0]!r}"
        )
    return GeneAlignment(
        keep_columns=keep.astype(np.int64),
        vocab_ids=kept_ids.astype(np.int32),
        n_source_genes=len(names),
    )


def column_map(alignment: GeneAlignment) -> np.ndarray:
    """Source column -> vocabulary id (int32), ``-1`` for columns outside the vocabulary."""
    cmap = np.full(alignment.n_source_genes, -1, dtype=np.int32)
    cmap[alignment.keep_columns] = alignment.vocab_ids
    return cmap
