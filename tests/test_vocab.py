"""GeneVocab: special tokens, encode/decode, aliases, files, unions, the shipped table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scmf_loader.errors import VocabularyError
from scmf_loader.vocab import CLS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, GeneVocab


def test_special_tokens_come_first() -> None:
    v = GeneVocab.from_genes(["A", "B"])
    assert v.decode([PAD_ID, UNK_ID, MASK_ID, CLS_ID]) == list(SPECIAL_TOKENS)
    assert (PAD_ID, UNK_ID, MASK_ID, CLS_ID) == (0, 1, 2, 3)
    assert len(v) == 6
    assert v.encode(["A", "B"]).tolist() == [4, 5]


def test_unknown_genes_map_to_unk_and_contains() -> None:
    v = GeneVocab.from_genes(["A", "B"])
    assert v.encode(["B", "nope", "A"]).tolist() == [5, UNK_ID, 4]
    assert "A" in v
    assert "nope" not in v
    assert 3 not in v


def test_ensembl_version_suffix_is_stripped() -> None:
    v = GeneVocab.from_genes(["ENSG00000141510", "ENSMUSG00000059552.4"])
    assert v.encode(["ENSG00000141510.18", "ENSMUSG00000059552"]).tolist() == [4, 5]
    assert v.genes == ["ENSG00000141510", "ENSMUSG00000059552"]
    assert v.encode(["ENSG00000141510.x"]).tolist() == [UNK_ID]


def test_duplicates_and_reserved_tokens_are_errors() -> None:
    with pytest.raises(VocabularyError, match="duplicate gene 'A'"):
        GeneVocab.from_genes(["A", "B", "A"])
    with pytest.raises(VocabularyError, match="duplicate gene 'ENSG00000141510'"):
        GeneVocab.from_genes(["ENSG00000141510.1", "ENSG00000141510.2"])
    with pytest.raises(VocabularyError, match="reserved"):
        GeneVocab.from_genes(["<pad>", "A"])
    with pytest.raises(VocabularyError, match="out of range"):
        GeneVocab.from_genes(["A"]).decode([5])


def test_human_protein_coding_accepts_ids_and_symbols() -> None:
    v = GeneVocab.human_protein_coding()
    assert 19_000 < len(v) - 4 < 20_000
    assert len(set(v.genes)) == len(v.genes)
    tp53 = v.lookup("ENSG00000141510")
    assert tp53 >= 4
    assert v.encode(["TP53", "ENSG00000141510.18", "ENSG00000141510"]).tolist() == [tp53] * 3
    assert "ENSA" in v  # a real symbol that looks like an Ensembl prefix
    symbols = [s for s in (v.symbols or []) if s]
    assert len(symbols) == len(set(symbols)) == len(v) - 4
    assert v.name == "human_protein_coding"
    assert v.species == "homo_sapiens"


@pytest.mark.parametrize("suffix", [".json", ".tsv"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    v = GeneVocab.human_protein_coding()
    path = tmp_path / f"vocab{suffix}"
    v.save(path)
    again = GeneVocab.from_file(path)
    assert again == v
    assert again.encode(["TP53", "BRCA1", "zzz"]).tolist() == v.encode(["TP53", "BRCA1", "zzz"]).tolist()
    assert again.sha256() == v.sha256()


def test_plain_gene_list_file(tmp_path: Path) -> None:
    p = tmp_path / "genes.txt"
    p.write_text("GENE1\nGENE2\n\nGENE3\n")
    v = GeneVocab.from_file(p)
    assert v.tokens == [*SPECIAL_TOKENS, "GENE1", "GENE2", "GENE3"]


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="missing.json: vocabulary file not found"):
        GeneVocab.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(VocabularyError, match="bad.json: not valid JSON"):
        GeneVocab.from_file(bad)
    other = tmp_path / "other.json"
    other.write_text('{"format": "x"}')
    with pytest.raises(VocabularyError, match="other.json: not a scmf-vocab"):
        GeneVocab.from_file(other)


def test_union_keeps_first_seen_order() -> None:
    u = GeneVocab.union([["A", "B"], GeneVocab.from_genes(["C", "A"]), ["ENSG00000000003.2", "B"]])
    assert u.genes == ["A", "B", "C", "ENSG00000000003"]


def test_from_adata_uses_var_names_or_a_column() -> None:
    import anndata as ad
    import pandas as pd

    a = ad.AnnData(
        X=np.zeros((2, 3), dtype=np.float32),
        var=pd.DataFrame({"ensembl": ["E1", "E2", "E3"]}, index=["g1", "g2", "g3"]),
    )
    assert GeneVocab.from_adata(a).genes == ["g1", "g2", "g3"]
    assert GeneVocab.from_adata(a, key="ensembl").genes == ["E1", "E2", "E3"]
    with pytest.raises(VocabularyError, match="no column 'nope'"):
        GeneVocab.from_adata(a, key="nope")


_gene = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="\t\n\r<>"),
                min_size=1, max_size=12)


@settings(max_examples=50, deadline=None)
@given(st.lists(_gene, unique=True, max_size=30))
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, genes: list[str]) -> None:
    from scmf_loader.vocab import normalize_gene_id

    if len({normalize_gene_id(g) for g in genes}) != len(genes) or any(g.strip() != g for g in genes):
        return
    v = GeneVocab.from_genes(genes)
    d = tmp_path_factory.mktemp("v")
    for name in ("v.json", "v.tsv"):
        v.save(d / name)
        again = GeneVocab.from_file(d / name)
        assert again.tokens == v.tokens
        assert again.decode(again.encode(genes)) == [normalize_gene_id(g) for g in genes]
