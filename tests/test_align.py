"""Gene alignment: ``build_alignment`` (the one gene → token map of loader and converter)
against a plain-dictionary reference, and the alignment kernel against an independent scipy
reference (COO → CSR, scipy's sort)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import scmf_shards.align as shards_align
from scmf_loader.align import build_alignment, column_map
from scmf_loader.errors import InvalidInputError, VocabularyError
from scmf_loader.vocab import SPECIAL_TOKENS, GeneVocab
from scmf_shards.align import GeneAlignment, align_rows, align_rows_with_totals
from scmf_shards.kernels import align_csr


def _reference(m: sp.csr_matrix, cmap: np.ndarray) -> sp.csr_matrix:
    coo = m.tocoo()
    keep = (cmap[coo.col] >= 0) & (coo.data != 0)
    n_cols = int(cmap.max()) + 1
    out = sp.csr_matrix((coo.data[keep], (coo.row[keep], cmap[coo.col[keep]])), shape=(m.shape[0], n_cols))
    out.sort_indices()
    return out


def _random_case(rng: np.random.Generator, n_rows: int, n_genes: int, density: float,
                 vocab_size: int, dtype: str) -> tuple[sp.csr_matrix, np.ndarray]:
    m = sp.random(n_rows, n_genes, density=density, format="csr", random_state=rng, dtype=np.float64)
    m.data = np.ceil(m.data * 20).astype(dtype)
    m.data[::5] = 0  # explicit zeros are dropped
    n_keep = int(rng.integers(1, n_genes + 1))
    cmap = np.full(n_genes, -1, dtype=np.int32)
    cols = rng.choice(n_genes, n_keep, replace=False)
    cmap[cols] = rng.choice(np.arange(4, vocab_size), n_keep, replace=False)
    return m, cmap


@pytest.mark.parametrize("vocab_size", [40, 300, 20_000, 70_000, 3_000_000])  # 1, 2, 3, 3 radix passes
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "uint16"])
def test_align_csr_matches_scipy(vocab_size: int, dtype: str) -> None:
    rng = np.random.default_rng(vocab_size)
    n_genes = min(vocab_size - 4, 3000)
    m, cmap = _random_case(rng, 200, n_genes, 0.3, vocab_size, dtype)
    m = sp.vstack([m[:50], sp.csr_matrix((10, n_genes), dtype=m.dtype), m[60:]], format="csr")
    m.sort_indices()  # a run of empty rows in the middle
    indptr, indices, data, totals = align_csr(m.indptr, m.indices, m.data, cmap, presorted=False)
    ref = _reference(m, cmap)
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)
    assert data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(totals, np.asarray(m.sum(axis=1, dtype=np.float64)).ravel())


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(0, 30),
    n_genes=st.integers(1, 80),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_align_rows_property(n_rows: int, n_genes: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, cmap = _random_case(rng, n_rows, n_genes, density, 600, "float32")
    keep = np.flatnonzero(cmap >= 0)
    order = np.argsort(cmap[keep])
    alignment = GeneAlignment(keep[order].astype(np.int64), cmap[keep][order], n_genes)
    got, totals = align_rows_with_totals(m, alignment, dtype="float64")
    ref = _reference(m, cmap)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)
    assert got.data.dtype == np.float64
    np.testing.assert_allclose(totals, np.asarray(m.sum(axis=1)).ravel(), rtol=1e-6)


def test_presorted_map_and_uncanonical_input() -> None:
    """An increasing map needs no sort; duplicate entries of the source are summed first."""
    m = sp.csr_matrix(
        (np.array([1.0, 2.0, 3.0, 0.0, 5.0], np.float32), np.array([2, 0, 2, 1, 3]), np.array([0, 3, 5])),
        shape=(2, 4),
    )
    alignment = GeneAlignment(np.array([0, 2, 3]), np.array([4, 6, 9], np.int32), 4)
    assert alignment.is_identity_order
    got = align_rows(m, alignment)
    np.testing.assert_array_equal(got.toarray()[:, [4, 6, 9]], [[2.0, 4.0, 0.0], [0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(got.indices, [4, 6, 9])


def test_align_rows_in_a_given_order() -> None:
    rng = np.random.default_rng(7)
    m, cmap = _random_case(rng, 50, 40, 0.4, 100, "float32")
    order = rng.permutation(50)
    indptr, indices, data, totals = align_csr(m.indptr, m.indices, m.data, cmap, False, row_order=order)
    ref = _reference(m, cmap)[order]
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)
    np.testing.assert_array_equal(totals, np.asarray(m.sum(axis=1, dtype=np.float64)).ravel()[order])
    with pytest.raises(InvalidInputError, match="row_order"):
        align_csr(m.indptr, m.indices, m.data, cmap, False, row_order=order[:-1])


# ---- build_alignment ------------------------------------------------------------------------
def _reference_alignment(genes: list[str], vocab_tokens: list[str]) -> tuple[list[int], list[int]]:
    """(kept columns, vocabulary ids) from a dict of the vocabulary, versions stripped."""
    index = {t: i + 4 for i, t in enumerate(vocab_tokens)}
    pairs = sorted((index[g.split(".")[0]], col) for col, g in enumerate(genes) if g.split(".")[0] in index)
    return [c for _, c in pairs], [i for i, _ in pairs]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_vocab=st.integers(1, 60), n_extra=st.integers(0, 30))
def test_build_alignment_matches_dict_reference(seed: int, n_vocab: int, n_extra: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = [f"ENSG{i:011d}" for i in rng.choice(10**6, n_vocab, replace=False)]
    vocab = GeneVocab.from_genes(tokens)
    n_in = int(rng.integers(1, n_vocab + 1))
    genes = [t + (f".{rng.integers(1, 20)}" if rng.random() < 0.5 else "")
             for t in rng.choice(tokens, n_in, replace=False)]
    genes += [f"OTHER{i}" for i in range(n_extra)]
    genes = [genes[i] for i in rng.permutation(len(genes))]
    a = build_alignment(genes, vocab, "src.h5ad")
    keep, ids = _reference_alignment(genes, tokens)
    np.testing.assert_array_equal(a.keep_columns, keep)
    np.testing.assert_array_equal(a.vocab_ids, ids)
    assert a.keep_columns.dtype == np.int64
    assert a.vocab_ids.dtype == np.int32
    assert (a.n_source_genes, a.n_matched, a.n_dropped) == (len(genes), len(keep), n_extra)
    assert a.is_identity_order == bool(np.all(np.diff(keep) > 0))
    expected_map = np.full(len(genes), -1)
    expected_map[keep] = ids
    np.testing.assert_array_equal(column_map(a), expected_map)


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_build_alignment_rejects_every_special_token(token: str) -> None:
    vocab = GeneVocab.from_genes(["A", "B", "C"])
    with pytest.raises(InvalidInputError, match=rf"in\.h5ad: gene '{token}' \(column 1\) is a reserved special token"):
        build_alignment(["A", token, "B"], vocab, "in.h5ad")


def test_build_alignment_rejects_duplicates_and_empty_overlap() -> None:
    vocab = GeneVocab.from_genes(["ENSG00000000001", "ENSG00000000002"])
    with pytest.raises(InvalidInputError, match=r"in\.h5ad: duplicate gene ids: columns 0 "
                       r"\('ENSG00000000002\.1'\) and 2 \('ENSG00000000002\.7'\)"):
        build_alignment(["ENSG00000000002.1", "ENSG00000000001", "ENSG00000000002.7"], vocab, "in.h5ad")
    with pytest.raises(VocabularyError, match=r"in\.h5ad: none of its 2 genes"):
        build_alignment(["X", "Y"], vocab, "in.h5ad")


def test_converter_and_loader_share_one_alignment() -> None:
    """The converter re-exports the loader's alignment: one implementation, not three."""
    assert shards_align.build_alignment is build_alignment
    assert shards_align.GeneAlignment is GeneAlignment
    assert shards_align.column_map is column_map


def test_quick_path_rejects_special_tokens_like_the_converter() -> None:
    import anndata as ad

    from scmf_loader import AnnDataStore, CellDataset

    x = np.ones((3, 3), dtype=np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(x))
    adata.var_names = ["A", "<mask>", "B"]
    vocab = GeneVocab.from_genes(["A", "B"])
    with pytest.raises(InvalidInputError, match="reserved special token"):
        CellDataset(adata, gene_vocab=vocab)
    with pytest.raises(InvalidInputError, match="reserved special token"):
        AnnDataStore(adata, gene_vocab=vocab)


def test_loader_never_imports_the_converter() -> None:
    """No module of scmf_loader imports scmf_shards, even lazily inside a function."""
    import ast
    from pathlib import Path

    import scmf_loader

    root = Path(scmf_loader.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}:{node.lineno}" for n in names
                          if n.split(".")[0] == "scmf_shards"]
    assert not offenders, offenders
