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


# ---- multi-species: human + mouse through one-to-one orthologs -------------------------------
DATA = Path(__file__).resolve().parents[1] / "scmf_loader" / "data"


def _tsv(name: str) -> list[list[str]]:
    """A shipped table read with plain gzip (an independent reader of the same bytes)."""
    import gzip

    lines = gzip.decompress((DATA / name).read_bytes()).decode().splitlines()
    return [ln.split("\t") for ln in lines[1:]]


@pytest.fixture(scope="module")
def tables() -> dict[str, object]:
    human = _tsv("human_protein_coding.tsv.gz")
    mouse = _tsv("mouse_protein_coding.tsv.gz")
    pairs = _tsv("human_mouse_orthologs.tsv.gz")
    one2one = {m: h for h, m, t in pairs if t == "one2one"}
    paired = {m for _h, m, _t in pairs}
    return {
        "human": human, "mouse": mouse, "mouse_symbol": dict(mouse), "one2one": one2one,
        "non_one2one": sorted(paired - set(one2one)),
        "mouse_only": [g for g, _s in mouse if g not in paired],
    }


@pytest.fixture(scope="module")
def hm() -> GeneVocab:
    return GeneVocab.multi_species(["human", "mouse"])


def test_shipped_tables_are_consistent(tables: dict) -> None:
    human_ids = {g for g, _s in tables["human"]}
    mouse_ids = {g for g, _s in tables["mouse"]}
    pairs = _tsv("human_mouse_orthologs.tsv.gz")
    assert len(tables["mouse"]) == len(mouse_ids) == len(set(tables["mouse_symbol"].values())) == 21_637
    assert all(g.startswith("ENSMUSG") for g in mouse_ids)
    assert {h for h, _m, _t in pairs} <= human_ids
    assert {m for _h, m, _t in pairs} <= mouse_ids
    assert {t for _h, _m, t in pairs} == {"one2one", "one2many", "many2many"}
    # one2one means one partner on each side; the counts measured in docs/species.md
    one = [(h, m) for h, m, t in pairs if t == "one2one"]
    assert len({h for h, _ in one}) == len({m for _, m in one}) == len(one) == 16_266
    assert len(tables["non_one2one"]) == 2_302
    assert len(tables["mouse_only"]) == 3_069
    for _h, m, t in pairs:  # a one2one gene never has a second partner
        if t != "one2one":
            assert tables["one2one"].get(m) is None


def test_mouse_genes_land_on_their_human_orthologs_token(hm: GeneVocab, tables: dict) -> None:
    one2one, symbol = tables["one2one"], tables["mouse_symbol"]
    mouse_ids = sorted(one2one)
    expected = [hm.lookup(one2one[m]) for m in mouse_ids]
    assert min(expected) >= 4
    assert hm.decode(expected) == [one2one[m] for m in mouse_ids]
    for organism in ("mouse", None):
        assert hm.encode(mouse_ids, organism=organism).tolist() == expected
        assert hm.encode([f"{m}.7" for m in mouse_ids], organism=organism).tolist() == expected
    assert hm.encode([symbol[m] for m in mouse_ids], organism="mouse").tolist() == expected
    # named examples
    cd3e, tp53 = hm.lookup("ENSG00000198851"), hm.lookup("ENSG00000141510")
    assert hm.encode(["Cd3e", "ENSMUSG00000032093.5", "Trp53"], organism="mouse").tolist() == [cd3e, cd3e, tp53]
    assert hm.encode(["CD3E", "TP53"], organism="human").tolist() == [cd3e, tp53]


def test_non_one2one_and_mouse_only_genes(tables: dict, hm: GeneVocab) -> None:
    symbol = tables["mouse_symbol"]
    for genes in (tables["non_one2one"], tables["mouse_only"]):
        assert set(hm.encode(genes, organism="mouse").tolist()) == {UNK_ID}
        assert set(hm.encode([symbol[g] for g in genes], organism="mouse").tolist()) == {UNK_ID}
    tok = GeneVocab.multi_species(["human", "mouse"], mouse_only="token")
    n_human = len(tables["human"]) + 4
    assert len(tok) == n_human + len(tables["mouse_only"])
    assert tok.genes[n_human - 4:] == tables["mouse_only"]  # after the human tokens, by id
    ids = tok.encode(tables["mouse_only"], organism="mouse")
    assert ids.tolist() == list(range(n_human, len(tok)))
    assert tok.encode([symbol[g] for g in tables["mouse_only"]], organism="mouse").tolist() == ids.tolist()
    assert {tok.origin(int(i)) for i in ids} == {"mus_musculus"}
    assert set(tok.encode(tables["non_one2one"], organism="mouse").tolist()) == {UNK_ID}
    # mouse-only tokens are not human names
    assert set(tok.encode(tables["mouse_only"][:50], organism="human").tolist()) == {UNK_ID}


def test_human_part_is_the_default_vocabulary(hm: GeneVocab) -> None:
    h = GeneVocab.human_protein_coding()
    assert hm.tokens == h.tokens
    assert hm.symbols == h.symbols
    assert hm.encode(["TP53", "ENSG00000141510.3", "BRCA1"]).tolist() == h.encode(["TP53", "ENSG00000141510.3", "BRCA1"]).tolist()
    assert hm.organisms == ["homo_sapiens", "mus_musculus"]
    assert hm.origins == [None] * 4 + ["homo_sapiens"] * (len(h) - 4)
    assert hm.origin(0) is None
    assert h.organisms == ["homo_sapiens"]
    assert h.origin(10) == "homo_sapiens"
    assert not h.is_multi_species
    assert hm.is_multi_species
    assert GeneVocab.from_genes(["A"]).organisms == []
    assert GeneVocab.from_genes(["A"]).origin(4) is None
    assert hm.name == "human+mouse"
    # the default vocabulary's hash did not move (datasets written before record it)
    assert h.sha256() == "21e1732e777a9b814fa2d6e09916b077fe3f844c3abd42755225ff790c703521"


def test_lookups_can_be_restricted_to_one_organism(hm: GeneVocab, tables: dict) -> None:
    assert hm.lookup("CD3E", "mouse") == UNK_ID
    assert hm.lookup("ENSG00000198851", "mouse") == UNK_ID
    assert hm.lookup("Cd3e", "human") == UNK_ID
    assert hm.lookup("ENSMUSG00000032093", "Homo sapiens") == UNK_ID
    assert hm.lookup("<pad>", "mouse") == PAD_ID  # special tokens stay visible (alignment refuses them)
    # a mouse symbol spelled like a human symbol: its mouse meaning under organism="mouse",
    # the human one without an organism
    h = GeneVocab.human_protein_coding()
    human_symbols = {s for s in h.symbols or [] if s}
    clashes = [s for s in tables["mouse_symbol"].values() if s in human_symbols]
    assert clashes  # C3, F10, ...
    tok = GeneVocab.multi_species(["human", "mouse"], mouse_only="token")
    for s in clashes:
        assert tok.lookup(s) == h.lookup(s)
        m = tok.lookup(s, "mouse")
        assert m == UNK_ID or tok.decode([m])[0] in (tables["one2one"].get(g) or g
                                                     for g, sym in tables["mouse"] if sym == s)


def test_multi_species_round_trips(tmp_path: Path, hm: GeneVocab) -> None:
    tok = GeneVocab.multi_species(["mouse", "human"], mouse_only="token")
    assert tok.sha256() != hm.sha256()
    assert hm.sha256() == GeneVocab.multi_species().sha256()  # stable
    probe = ["Cd3e", "ENSMUSG00000032093.2", "Xkr4", "TP53", "zzz"]
    for v in (hm, tok):
        d = v.to_dict()
        assert d["organisms"] == ["homo_sapiens", "mus_musculus"]
        assert d["origins"][0] == [None, 4]
        for suffix in (".json", ".tsv"):
            path = tmp_path / f"{v.name.replace(':', '_')}{suffix}"
            v.save(path)
            again = GeneVocab.from_file(path)
            assert again == v
            assert again.sha256() == v.sha256()
            assert again.organisms == v.organisms
            assert again.origins == v.origins
            assert again.aliases("mouse") == v.aliases("mouse")
            for org in ("mouse", "human", None):
                assert again.encode(probe, organism=org).tolist() == v.encode(probe, organism=org).tolist()
        assert GeneVocab.from_file(tmp_path / f"{v.name.replace(':', '_')}.json").name == v.name


def test_from_name_resolves_the_shipped_vocabularies() -> None:
    from scmf_loader.vocab import BUILTIN_VOCABS

    for name in BUILTIN_VOCABS:
        assert GeneVocab.from_name(name).name == name
    assert GeneVocab.from_name("human+mouse") == GeneVocab.multi_species()
    mouse = GeneVocab.from_name("mouse_protein_coding")
    assert mouse.organisms == ["mus_musculus"]
    assert mouse.encode(["Cd3e"]).tolist() == [mouse.lookup("ENSMUSG00000032093")]
    assert GeneVocab.multi_species(["human"]) == GeneVocab.human_protein_coding()
    with pytest.raises(VocabularyError, match="unknown vocabulary name 'human\\+rat'"):
        GeneVocab.from_name("human+rat")


def test_multi_species_bad_input() -> None:
    with pytest.raises(VocabularyError, match="unknown organism 'rat'"):
        GeneVocab.multi_species(["human", "rat"])
    with pytest.raises(VocabularyError, match="mouse_only must be"):
        GeneVocab.multi_species(mouse_only="keep")
    with pytest.raises(VocabularyError, match="orthologs must be 'one2one'"):
        GeneVocab.multi_species(orthologs="one2many")
    with pytest.raises(VocabularyError, match="unknown organism 'zebrafish'"):
        GeneVocab.multi_species().encode(["A"], organism="zebrafish")
    with pytest.raises(VocabularyError, match="covers \\['homo_sapiens'\\], not mus_musculus.*human\\+mouse"):
        GeneVocab.human_protein_coding().encode(["Cd3e"], organism="mouse")
    with pytest.raises(VocabularyError, match="union of the multi-species"):
        GeneVocab.union([GeneVocab.multi_species(), ["A"]])
    with pytest.raises(VocabularyError, match="points to id 99"):
        GeneVocab.from_genes(["A"], aliases={"mouse": {"a": 99}})
    with pytest.raises(VocabularyError, match="origins must be null"):
        GeneVocab([*SPECIAL_TOKENS, "A"], origins=["human"] * 5)


_name = st.text(alphabet="ABCDEFGHabcdefgh0123456789-", min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(_name, unique=True, min_size=1, max_size=12),
    st.lists(st.sampled_from(["homo_sapiens", "mus_musculus"]), min_size=12, max_size=12),
    st.dictionaries(_name.map(lambda s: "m" + s), st.integers(0, 11), max_size=8),
)
def test_multi_species_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, genes: list[str], orgs: list[str], aliases: dict[str, int]
) -> None:
    origins = [None] * 4 + orgs[: len(genes)]
    alias_ids = {a: 4 + i % len(genes) for a, i in aliases.items() if a not in genes}
    v = GeneVocab([*SPECIAL_TOKENS, *genes], origins=origins, aliases={"mouse": alias_ids})
    d = tmp_path_factory.mktemp("mv")
    for name in ("v.json", "v.tsv"):
        v.save(d / name)
        again = GeneVocab.from_file(d / name)
        assert again == v
        assert again.origins == origins
        assert again.aliases("mus_musculus") == alias_ids
        assert again.encode(list(alias_ids), organism="mouse").tolist() == list(alias_ids.values())
