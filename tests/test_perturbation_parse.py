"""Perturbation metadata parsing (scmf_shards.perturbation): every format of issue 15 with its
expected schema values written out; detection by name and content; unknowns counted, never
dropped; strict mode refuses them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from scmf_loader.errors import InvalidInputError, ScmfError
from scmf_loader.vocab import GeneVocab
from scmf_shards.perturbation import (
    COLUMNS,
    PerturbationLabelError,
    detect_columns,
    parse_dose,
    parse_label,
    parse_perturbations,
    parse_time,
)
from scmf_shards.perturbation.schema import decode_bool, decode_float

NAN = math.nan


@pytest.fixture(scope="module")
def vocab() -> GeneVocab:
    return GeneVocab.human_protein_coding()


def token(vocab: GeneVocab, symbol: str) -> str:
    return vocab.tokens[vocab.lookup(symbol)]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)


# label, role → (perturbation, type, targets as symbols, dose µM, time h)
CRISPR = {
    "CEBPA+CEBPB": ("CEBPA+CEBPB", "combination", ("CEBPA", "CEBPB"), NAN, NAN),
    "CEBPB+CEBPA": ("CEBPA+CEBPB", "combination", ("CEBPA", "CEBPB"), NAN, NAN),
    "CEBPA_only": ("CEBPA", "genetic", ("CEBPA",), NAN, NAN),
    "sgCEBPA_2": ("CEBPA", "genetic", ("CEBPA",), NAN, NAN),
    "p-sgCREB1-2": ("CREB1", "genetic", ("CREB1",), NAN, NAN),
    "CEBPA+ctrl": ("CEBPA", "genetic", ("CEBPA",), NAN, NAN),
    "CEBPA_CEBPB__CEBPA_CEBPB": ("CEBPA+CEBPB", "combination", ("CEBPA", "CEBPB"), NAN, NAN),
    "NKX2-1": ("NKX2-1", "genetic", ("NKX2-1",), NAN, NAN),
    "ctrl": ("control", "control", (), NAN, NAN),
    "non-targeting": ("control", "control", (), NAN, NAN),
    "non-targeting_00042": ("control", "control", (), NAN, NAN),
    "NT": ("control", "control", (), NAN, NAN),
    "sgNT-2": ("control", "control", (), NAN, NAN),
    "safe-targeting": ("control", "control", (), NAN, NAN),
    "NegCtrl0_NegCtrl0__NegCtrl0_NegCtrl0": ("control", "control", (), NAN, NAN),
}
COMPOUNDS = {
    "Dexamethasone (10 nM)": ("Dexamethasone", "chemical", (), 0.01, NAN),
    "Dexamethasone (10 nM, 24h)": ("Dexamethasone", "chemical", (), 0.01, 24.0),
    "Dexamethasone_10nM": ("Dexamethasone", "chemical", (), 0.01, NAN),
    "Nutlin-3a (1000nM)": ("Nutlin-3a", "chemical", (), 1.0, NAN),
    "(+)-JQ1 (0.1 uM)": ("(+)-JQ1", "chemical", (), 0.1, NAN),
    "Dexamethasone (1 mM)+Nutlin-3a (1 mM)": ("Dexamethasone+Nutlin-3a", "combination", (), 1000.0, NAN),
    "vehicle": ("control", "control", (), NAN, NAN),
    "Vehicle": ("control", "control", (), NAN, NAN),
    "DMSO": ("control", "control", (), NAN, NAN),
    "DMSO (0.1%)": ("control", "control", (), NAN, NAN),
}


def check(parsed: object, expected: tuple) -> None:
    assert parsed is not None
    perturbation, kind, targets, dose, time = expected
    assert parsed.perturbation == perturbation
    assert parsed.kind == kind
    assert parsed.targets == targets
    assert same(parsed.dose_um, dose)
    assert same(parsed.time_h, time)
    assert parsed.is_control == (kind == "control")


@pytest.mark.parametrize("label", list(CRISPR))
@pytest.mark.parametrize("role", ["genetic", "any"])
def test_crispr_labels(label: str, role: str, vocab: GeneVocab) -> None:
    check(parse_label(label, role), CRISPR[label])
    resolve = lambda s: token(vocab, s) if s in vocab else None  # noqa: E731
    check(parse_label(label, role, resolve), CRISPR[label])


@pytest.mark.parametrize("label", list(COMPOUNDS))
@pytest.mark.parametrize("role", ["chemical", "any"])
def test_compound_labels(label: str, role: str) -> None:
    check(parse_label(label, role), COMPOUNDS[label])


@pytest.mark.parametrize(("label", "role"), [
    ("???", "any"), ("", "any"), (None, "genetic"), ("0.1 uM", "any"), ("2", "any"),
    ("Dexamethasone (10 foo)", "chemical"), ("Dexamethasone (0.1%)", "any"), ("CEBPA (2)", "any"),
    ("Dexamethasone (10 nM)", "genetic"), ("CEBPA + ", "genetic"),
])
def test_unparseable_labels(label: str | None, role: str) -> None:
    assert parse_label(label, role) is None


def test_vocabulary_decides_in_generic_columns(vocab: GeneVocab) -> None:
    resolve = lambda s: token(vocab, s) if s in vocab else None  # noqa: E731
    # an upper-case compound name is a gene by shape alone, a compound once the vocabulary says no
    assert parse_label("JQ1", "any").kind == "genetic"
    assert parse_label("JQ1", "any", resolve).kind == "chemical"
    # a guide-marked gene outside the vocabulary stays genetic (its target is reported later)
    assert parse_label("sgFOO_1", "any", resolve).targets == ("FOO",)
    # the vocabulary keeps a hyphenated symbol whole even when guide-marked
    assert parse_label("sgNKX2-1", "genetic", resolve).targets == ("NKX2-1",)
    assert parse_label("sgNKX2-1", "genetic").targets == ("NKX2",)  # without it, the guide number goes


@pytest.mark.parametrize(("text", "unit", "expected"), [
    ("0.1 uM", None, 0.1), ("1000nM", None, 1.0), ("10 nM", None, 0.01), ("5 µM", None, 5.0),
    ("5μM", None, 5.0), ("1 mM", None, 1000.0), ("100 pM", None, 1e-4), ("1e-3 mM", None, 1.0),
    (10, "nM", 0.01), ("10", "uM", 10.0), (0, None, 0.0), ("0", None, 0.0),
    ("10", None, None), (10, None, None), ("0.1%", None, None), ("1 mg/ml", None, None), ("x", "uM", None),
    (True, "nM", None), (-1, "nM", None), (float("nan"), "nM", None),
])
def test_doses(text: object, unit: str | None, expected: float | None) -> None:
    got = parse_dose(text, unit)
    assert got == (pytest.approx(expected, rel=1e-12) if expected is not None else None)


@pytest.mark.parametrize(("text", "unit", "expected"), [
    ("24h", None, 24.0), ("3 d", None, 72.0), ("30 min", None, 0.5), ("24 hrs", None, 24.0),
    ("2 days", None, 48.0), ("1 week", None, 168.0), (24, "h", 24.0), ("6", "h", 6.0), (3, "d", 72.0),
    ("24", None, None), ("soon", None, None), ("24 parsecs", None, None),
])
def test_times(text: object, unit: str | None, expected: float | None) -> None:
    assert parse_time(text, unit) == expected


def norman_obs(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Norman-2019-style obs: guide identities, a gem group, cells with 0/1/2 guides."""
    rng = np.random.default_rng(seed)
    labels = ["CEBPA+CEBPB", "CEBPA_only", "sgCEBPA_2", "ctrl", "non-targeting", "NT",
              "safe-targeting", "KLF1+ctrl", "NegCtrl0_NegCtrl0__NegCtrl0_NegCtrl0"]
    return pd.DataFrame({
        "guide_identity": pd.Categorical(rng.choice(labels, n)),
        "gem_group": pd.Categorical(rng.choice(["1", "2"], n)),
        "n_genes": rng.integers(500, 3000, n),
        "UMI_count": rng.integers(1000, 9000, n).astype(float),
    }, index=[f"c{i}" for i in range(n)])


NORMAN_EXPECTED = {  # label → (perturbation, type, target symbols, is_control)
    "CEBPA+CEBPB": ("CEBPA+CEBPB", "combination", ("CEBPA", "CEBPB"), False),
    "CEBPA_only": ("CEBPA", "genetic", ("CEBPA",), False),
    "sgCEBPA_2": ("CEBPA", "genetic", ("CEBPA",), False),
    "ctrl": ("control", "control", (), True),
    "non-targeting": ("control", "control", (), True),
    "NT": ("control", "control", (), True),
    "safe-targeting": ("control", "control", (), True),
    "KLF1+ctrl": ("KLF1", "genetic", ("KLF1",), False),
    "NegCtrl0_NegCtrl0__NegCtrl0_NegCtrl0": ("control", "control", (), True),
}


def test_norman_style_table(vocab: GeneVocab) -> None:
    obs = norman_obs()
    table = parse_perturbations(obs, "auto", vocab=vocab)
    assert table.columns.labels == (("guide_identity", "genetic"),)
    assert (table.columns.dose, table.columns.time) == (None, None)
    f = table.frame
    assert list(f.columns) == list(COLUMNS)
    assert f.index.equals(obs.index)
    for i, label in enumerate(obs["guide_identity"].astype(str)):
        perturbation, kind, targets, is_control = NORMAN_EXPECTED[label]
        assert f[COLUMNS[0]].iloc[i] == perturbation
        assert f[COLUMNS[1]].iloc[i] == kind
        stored = f[COLUMNS[2]].iloc[i]
        want = ";".join(token(vocab, t) for t in targets)
        assert (stored if isinstance(stored, str) else "") == want
        assert math.isnan(f["dose_um"].iloc[i])
        assert math.isnan(f["time_h"].iloc[i])
        assert bool(f["is_control"].iloc[i]) is is_control
    assert table.unknown == {}
    assert table.unknown_targets == {}
    assert table.frame["is_control"].dtype == bool
    assert str(f["perturbation"].dtype) == "category"
    # the CEBPA target is the vocabulary's token (an Ensembl id), not the symbol
    assert token(vocab, "CEBPA").startswith("ENSG")


def sciplex_obs() -> pd.DataFrame:
    """sci-Plex-style obs: product name, separate dose value/unit columns, time in hours, and
    a drug-target column that must not be taken for a perturbed gene."""
    rows = [
        ("Dexamethasone", 10, "nM", 24, "NR3C1", "A549"),
        ("Dexamethasone", 100, "nM", 24, "NR3C1", "A549"),
        ("Dexamethasone", 1000, "nM", 72, "NR3C1", "MCF7"),
        ("Nutlin-3a", 0.1, "uM", 24, "MDM2", "MCF7"),
        ("Vehicle", 0, "nM", 24, None, "A549"),
        ("DMSO", 0, "nM", 72, None, "MCF7"),
    ]
    frame = pd.DataFrame(rows * 5, columns=["product_name", "dose_value", "dose_unit", "time", "target", "cell_line"])
    frame.index = [f"s{i}" for i in range(len(frame))]
    return frame


SCIPLEX_EXPECTED = [  # (perturbation, type, dose µM, time h, is_control)
    ("Dexamethasone", "chemical", 0.01, 24.0, False),
    ("Dexamethasone", "chemical", 0.1, 24.0, False),
    ("Dexamethasone", "chemical", 1.0, 72.0, False),
    ("Nutlin-3a", "chemical", 0.1, 24.0, False),
    ("control", "control", 0.0, 24.0, True),
    ("control", "control", 0.0, 72.0, True),
]


def test_sciplex_style_table(vocab: GeneVocab) -> None:
    table = parse_perturbations(sciplex_obs(), "auto", vocab=vocab)
    assert table.columns.labels == (("product_name", "chemical"),)
    assert (table.columns.dose, table.columns.dose_unit, table.columns.time) == ("dose_value", "dose_unit", "time")
    f = table.frame
    for i in range(len(f)):
        perturbation, kind, dose, time, is_control = SCIPLEX_EXPECTED[i % 6]
        assert f["perturbation"].iloc[i] == perturbation
        assert f["perturbation_type"].iloc[i] == kind
        assert pd.isna(f["perturbation_targets"].iloc[i])
        assert f["dose_um"].iloc[i] == pytest.approx(dose, rel=1e-12)
        assert f["time_h"].iloc[i] == time
        assert bool(f["is_control"].iloc[i]) is is_control
    assert table.unknown == {}
    assert table.counts() == {"control": 10, "genetic": 0, "chemical": 20, "combination": 0, "unknown": 0}


def test_labels_with_doses_and_times_in_one_column(vocab: GeneVocab) -> None:
    obs = pd.DataFrame({
        "condition": ["Dexamethasone (10 nM)", "Nutlin-3a (1000nM)", "vehicle", "DMSO", "CEBPA", "0.1 uM"],
        "timepoint": ["24h", "3 d", "24h", None, "3 d", "24h"],
        "concentration_nM": [np.nan, np.nan, 0, 0, np.nan, 5],
    })
    table = parse_perturbations(obs, vocab=vocab)
    assert table.columns.labels == (("condition", "any"),)
    assert (table.columns.time, table.columns.dose) == ("timepoint", "concentration_nM")
    f = table.frame
    assert f["perturbation"].tolist() == ["Dexamethasone", "Nutlin-3a", "control", "control", "CEBPA", "unknown"]
    assert f["perturbation_type"].tolist() == ["chemical", "chemical", "control", "control", "genetic", "unknown"]
    np.testing.assert_allclose(f["dose_um"], [0.01, 1.0, 0.0, 0.0, NAN, 0.005])  # the column's nM unit
    np.testing.assert_array_equal(f["time_h"], [24.0, 72.0, 24.0, NAN, 72.0, 24.0])
    assert table.unknown == {"condition": {"0.1 uM": 1}}


def test_unknowns_kept_and_counted(vocab: GeneVocab) -> None:
    obs = pd.DataFrame({
        "perturbation": ["CEBPA", "???", "???", None, "sgFOO_1", "ctrl", "CEBPB"],
        "dose": ["1 uM", "2 uM", "3 furlongs", None, "x", None, "1 uM"],
    })
    table = parse_perturbations(obs, vocab=vocab)
    f = table.frame
    assert len(f) == len(obs)  # nothing dropped
    assert f["perturbation"].tolist() == ["CEBPA", "unknown", "unknown", "unknown", "FOO", "control", "CEBPB"]
    assert f["perturbation_targets"].tolist()[4] == "FOO"  # kept as written
    assert table.unknown == {"perturbation": {"???": 2, "<missing>": 1}, "dose": {"3 furlongs": 1, "x": 1}}
    assert table.unknown_targets == {"FOO": 1}
    assert table.n_unknown == 5
    np.testing.assert_array_equal(f["dose_um"], [1.0, 2.0, NAN, NAN, NAN, NAN, 1.0])
    lines = "\n".join(table.report())
    assert "'???' (2 cells)" in lines
    assert "'FOO' (1 cells)" in lines
    manifest = table.to_manifest()
    assert manifest["unknown"]["perturbation"] == {"???": 2, "<missing>": 1}
    assert manifest["counts"]["unknown"] == 3
    import json

    json.dumps(manifest)  # JSON-able
    with pytest.raises(PerturbationLabelError, match=r"screen\.h5ad: .*'\?\?\?' \(2 cells\).*FOO") as err:
        parse_perturbations(obs, vocab=vocab, strict=True, source="screen.h5ad")
    assert isinstance(err.value, InvalidInputError)
    assert isinstance(err.value, ScmfError)


def test_strict_passes_clean_input(vocab: GeneVocab) -> None:
    table = parse_perturbations(norman_obs(50), strict=True, vocab=vocab)
    assert table.unknown == {}


def test_explicit_columns_combine_genetic_and_chemical(vocab: GeneVocab) -> None:
    obs = pd.DataFrame({
        "guide": ["sgCEBPA_1", "NT", "NT", "sgKLF1_2", None],
        "drug": ["DMSO", "Dexamethasone", "DMSO", "Dexamethasone", "Dexamethasone"],
        "dose": ["0 nM", "10 nM", "0 nM", "10 nM", "1 uM"],
    })
    table = parse_perturbations(obs, "guide, drug,dose", vocab=vocab)
    assert table.columns.labels == (("guide", "genetic"), ("drug", "chemical"))
    f = table.frame
    assert f["perturbation"].tolist() == ["CEBPA", "Dexamethasone", "control", "Dexamethasone+KLF1", "Dexamethasone"]
    assert f["perturbation_type"].tolist() == ["genetic", "chemical", "control", "combination", "chemical"]
    assert f["perturbation_targets"].tolist()[3] == token(vocab, "KLF1")
    np.testing.assert_allclose(f["dose_um"], [0.0, 0.01, 0.0, 0.01, 1.0])


def test_detection_by_name_and_content() -> None:
    obs = pd.DataFrame({
        "cell_type": ["T"] * 60, "n_genes": np.arange(60), "gene_count": np.arange(60),
        "target_gene": ["CEBPA", "NT"] * 30, "perturbation_name": ["CEBPA", "control"] * 30,
        "time_point": ["24h"] * 60, "dose_uM": [1.0] * 60, "barcode_guide": [f"g{i}" for i in range(60)],
    })
    cols = detect_columns(obs)
    assert cols.labels == (("perturbation_name", "any"),)  # pertpy's name comes first
    assert (cols.time, cols.dose) == ("time_point", "dose_uM")
    cols = detect_columns(obs.drop(columns=["perturbation_name"]))
    assert cols.labels == (("target_gene", "genetic"),)  # numeric gene counts and per-cell ids skipped
    with pytest.raises(InvalidInputError, match=r"data\.h5ad: no perturbation label column"):
        detect_columns(obs[["cell_type", "n_genes", "barcode_guide"]], "data.h5ad")


def test_explicit_column_errors() -> None:
    obs = sciplex_obs()
    with pytest.raises(InvalidInputError, match=r"x\.h5ad: obs has no column\(s\) \['drug'\]"):
        parse_perturbations(obs, "drug", source="x.h5ad")
    with pytest.raises(InvalidInputError, match="names no label column"):
        parse_perturbations(obs, "dose_value,time")
    with pytest.raises(InvalidInputError, match="twice"):
        parse_perturbations(obs, "product_name,product_name")


def test_stored_values_round_trip() -> None:
    # shards store obs values as str(value); the schema's decoders read them back exactly
    for x in (0.01, 1e-4, 1000.0, 0.1 + 0.2, 24.0):
        assert decode_float(str(x)) == x
    assert math.isnan(decode_float(None))
    assert decode_bool(str(True)) is True
    assert decode_bool(str(False)) is False


def test_empty_frame() -> None:
    obs = pd.DataFrame({"perturbation": pd.Series([], dtype=object)})
    table = parse_perturbations(obs, "perturbation")
    assert len(table.frame) == 0
    assert list(table.frame.columns) == list(COLUMNS)
