"""scmf_shards.species: organism detection, vocabulary coverage, mapping counts, one gene per token."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scmf_loader.align import build_alignment
from scmf_loader.errors import ConfigurationError, InvalidInputError, VocabularyError
from scmf_loader.vocab import UNK_ID, GeneVocab
from scmf_shards.species import (
    check_one_gene_per_token,
    check_vocab_covers,
    detect_organism,
    mapping_counts,
    parse_organisms,
)

DATA = Path(__file__).resolve().parents[1] / "scmf_loader" / "data"


def _tsv(name: str) -> list[list[str]]:
    lines = gzip.decompress((DATA / name).read_bytes()).decode().splitlines()
    return [ln.split("\t") for ln in lines[1:]]


@pytest.fixture(scope="module")
def hm() -> GeneVocab:
    return GeneVocab.from_name("human+mouse")


@pytest.fixture(scope="module")
def categories() -> dict[str, list[str]]:
    """Mouse genes by category, from the shipped tables read independently."""
    mouse = _tsv("mouse_protein_coding.tsv.gz")
    pairs = _tsv("human_mouse_orthologs.tsv.gz")
    one2one = sorted({m for _h, m, t in pairs if t == "one2one"})
    paired = {m for _h, m, _t in pairs}
    return {
        "one2one": one2one,
        "non_one2one": sorted(paired - set(one2one)),
        "mouse_only": sorted(g for g, _s in mouse if g not in paired),
        "symbol": dict(mouse),  # type: ignore[dict-item]
    }


def test_parse_organisms() -> None:
    assert parse_organisms("homo_sapiens,mus_musculus") == ["homo_sapiens", "mus_musculus"]
    assert parse_organisms(["mouse", "Mus musculus", "NCBITaxon:10090"]) == ["mus_musculus"]
    assert parse_organisms(" human ") == ["homo_sapiens"]
    with pytest.raises(ConfigurationError, match="--organism: unknown organism 'rat'"):
        parse_organisms("human,rat")
    with pytest.raises(ConfigurationError, match="--organism is empty"):
        parse_organisms(",")


def test_detect_from_obs_uns_and_gene_prefix() -> None:
    mouse_obs = pd.DataFrame({"organism_ontology_term_id": pd.Categorical(["NCBITaxon:10090"] * 3)})
    assert detect_organism("m.h5ad", obs=mouse_obs) == "mus_musculus"
    assert detect_organism("h.h5ad", obs={"organism": ["Homo sapiens", None, np.nan]}) == "homo_sapiens"
    assert detect_organism("h.h5ad", uns={"organism": "Homo sapiens"}) == "homo_sapiens"
    assert detect_organism("m.h5ad", uns={"organism_ontology_term_id": ["NCBITaxon:10090"]}) == "mus_musculus"
    assert detect_organism("m.h5ad", genes=["ENSMUSG00000032093.5", "Cd3e"]) == "mus_musculus"
    assert detect_organism("h.h5ad", genes=["ENSG00000141510", "TP53"]) == "homo_sapiens"
    # agreeing evidence is fine
    assert detect_organism(
        "m.h5ad", obs=mouse_obs, uns={"organism": "Mus musculus"}, genes=["ENSMUSG00000032093"]
    ) == "mus_musculus"


def test_detect_refuses_what_it_cannot_tell() -> None:
    with pytest.raises(InvalidInputError, match=r"s\.h5ad: cannot tell the organism.*--organism homo_sapiens or --organism mus_musculus"):
        detect_organism("s.h5ad", obs={"cell_type": ["T"]}, genes=["Cd3e", "CD3E"])
    with pytest.raises(InvalidInputError, match=r"x\.h5ad: ambiguous organism.*homo_sapiens, mus_musculus.*--organism"):
        detect_organism("x.h5ad", obs={"organism": ["Homo sapiens", "Mus musculus"]})
    with pytest.raises(InvalidInputError, match=r"y\.h5ad: ambiguous organism \(obs\['organism'\]: homo_sapiens; gene ids: mus_musculus\)"):
        detect_organism("y.h5ad", obs={"organism": ["Homo sapiens"]}, genes=["ENSMUSG00000032093"])
    with pytest.raises(InvalidInputError, match="ambiguous organism"):
        detect_organism("barnyard.h5ad", genes=["ENSG00000141510", "ENSMUSG00000032093"])
    with pytest.raises(InvalidInputError, match=r"z\.h5ad: obs\['organism'\] names organism 'Danio rerio'"):
        detect_organism("z.h5ad", obs={"organism": ["Danio rerio"]})


def test_check_vocab_covers() -> None:
    human = GeneVocab.human_protein_coding()
    check_vocab_covers(human, "human", "h.h5ad")
    check_vocab_covers(GeneVocab.from_genes(["A"]), "mouse", "m.h5ad")  # organism unknown: no claim
    check_vocab_covers(GeneVocab.multi_species(), "mus_musculus", "m.h5ad")
    with pytest.raises(VocabularyError, match=r"m\.h5ad: its genes are mus_musculus.*'human_protein_coding'.*--vocab human\+mouse"):
        check_vocab_covers(human, "mouse", "m.h5ad")


def test_mapping_counts_match_the_tables(hm: GeneVocab, categories: dict) -> None:
    rng = np.random.default_rng(0)
    picks = {k: list(rng.choice(categories[k], size=n, replace=False))
             for k, n in (("one2one", 40), ("non_one2one", 7), ("mouse_only", 5))}
    sym = categories["symbol"]
    genes = (
        [f"{g}.3" for g in picks["one2one"][:20]] + [sym[g] for g in picks["one2one"][20:]]
        + picks["non_one2one"][:4] + [sym[g] for g in picks["non_one2one"][4:]]
        + picks["mouse_only"] + ["Xist-like", "ENSMUSG99999999999", "CD3E"]
    )
    c = mapping_counts(genes, hm, "mouse")
    assert c.to_dict() == {"organism": "mus_musculus", "n_genes": len(genes), "direct": 0,
                           "one2one": 40, "non_one2one": 7, "unmapped": 5 + 3}
    tok = GeneVocab.multi_species(mouse_only="token")
    c = mapping_counts(genes, tok, "mouse")
    assert (c.direct, c.one2one, c.non_one2one, c.unmapped) == (5, 40, 7, 3)
    human = mapping_counts(["TP53", "ENSG00000198851.2", "Cd3e", "nope"], hm, "human")
    assert (human.direct, human.one2one, human.non_one2one, human.unmapped) == (2, 0, 0, 2)
    mouse_only_vocab = mapping_counts(genes, GeneVocab.mouse_protein_coding(), "mouse")
    assert mouse_only_vocab.direct == 40 + 7 + 5
    assert mouse_only_vocab.unmapped == 3


def test_two_mouse_genes_on_one_token_are_refused(hm: GeneVocab) -> None:
    with pytest.raises(InvalidInputError, match=(
        r"m\.h5ad: mus_musculus genes 'Cd3e' \(column 1\) and 'ENSMUSG00000032093\.4' \(column 3\) "
        r"both map to token ENSG00000198851 \(CD3E\)")):
        check_one_gene_per_token(["Trp53", "Cd3e", "nope", "ENSMUSG00000032093.4"], hm, "mouse", "m.h5ad")
    ids = check_one_gene_per_token(["Trp53", "Cd3e", "nope", "Cd8a"], hm, "mouse", "m.h5ad")
    assert ids.tolist() == hm.encode(["Trp53", "Cd3e", "nope", "Cd8a"], organism="mouse").tolist()
    assert ids[2] == UNK_ID
    assert hm.decode([ids[0], ids[1]]) == ["ENSG00000141510", "ENSG00000198851"]


def test_loader_alignment_puts_mouse_columns_on_human_tokens(hm: GeneVocab, categories: dict) -> None:
    """The loader's gene alignment (what the converter uses) with the human+mouse vocabulary."""
    pairs = {m: h for h, m, t in _tsv("human_mouse_orthologs.tsv.gz") if t == "one2one"}
    genes = [*categories["one2one"][:30], *categories["non_one2one"][:5], *categories["mouse_only"][:5]]
    al = build_alignment(genes, hm, "m.h5ad")
    assert al.n_matched == 30
    assert hm.decode(al.vocab_ids) == [pairs[genes[c]] for c in al.keep_columns]
