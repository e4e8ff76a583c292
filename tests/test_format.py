"""The manifest schema: round trips, version checks and rejection of malformed manifests."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scmf_loader.errors import (
    FormatVersionError,
    ManifestError,
    ManifestNotFoundError,
    ShardCorruptError,
)
from scmf_loader.format import (
    FORMAT_VERSION,
    ArrayEntry,
    Manifest,
    ObsColumn,
    PreprocessingSection,
    ShardEntry,
    ShuffleSection,
    SourceEntry,
    VocabSection,
    check_format_version,
    compute_dataset_id,
    integrity,
    manifest_from_dict,
    read_manifest,
    write_manifest,
)
from scmf_loader.format.integrity import check_csr_structure
from scmf_loader.format.shard import ShardArrays


def _shard(i: int, n_cells: int, nnz: int) -> ShardEntry:
    arrays = {
        name: ArrayEntry(path=f"X/{name}/c/0", nbytes=nb, sha256="0" * 64, dtype=dt)
        for name, nb, dt in (("data", 4 * nnz, "float32"), ("indices", 4 * nnz, "int32"),
                             ("indptr", 8 * (n_cells + 1), "int64"))
    }
    return ShardEntry(path=f"shards/{i:06d}.zarr", n_cells=n_cells, nnz=nnz, arrays=arrays)


def _manifest(shards: list[tuple[int, int]]) -> Manifest:
    entries = [_shard(i, n, z) for i, (n, z) in enumerate(shards)]
    return Manifest(
        dataset_id="sha256:abc",
        n_cells=sum(n for n, _ in shards),
        n_genes=10,
        nnz=sum(z for _, z in shards),
        dtype="float32",
        vocab={"path": "vocab.json", "sha256": "x"},
        preprocessing={"normalize": None},
        sources=[SourceEntry(path="/data/a.h5ad", kind="h5ad", n_cells=1, n_genes=3,
                             genes_matched=2, genes_dropped=1, extra={"name": "a.h5ad"})],
        obs_columns=[ObsColumn(name="source", categories=("a.h5ad",))],
        shuffle={"enabled": True, "seed": 0},
        shards=entries,
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**12)), min_size=0, max_size=8))
def test_manifest_round_trips_through_json(shards: list[tuple[int, int]]) -> None:
    m = _manifest(shards)
    again = manifest_from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m


def test_write_and_read_manifest(tmp_path: Path) -> None:
    m = _manifest([(3, 5), (2, 0)])
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert not list(tmp_path.glob(".manifest*tmp*"))


def test_unknown_version_is_rejected_with_expected_and_found(tmp_path: Path) -> None:
    d = _manifest([(1, 1)]).to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(FormatVersionError, match=rf"format_version is {FORMAT_VERSION + 1}.*reads format_version 1, 2"):
        read_manifest(tmp_path)


def test_other_format_is_rejected(tmp_path: Path) -> None:
    d = _manifest([(1, 1)]).to_dict()
    d["format"] = "something-else"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(FormatVersionError, match="expected 'scmf-shards'"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.zarr", "shards/../../x", "C:\\x"])
def test_paths_must_stay_inside_the_dataset(bad: str) -> None:
    d = _manifest([(1, 1)]).to_dict()
    d["shards"][0]["path"] = bad
    with pytest.raises(ManifestError, match="relative"):
        manifest_from_dict(d)


def test_inconsistent_totals_are_rejected() -> None:
    d = _manifest([(4, 4)]).to_dict()
    d["n_cells"] = 5
    with pytest.raises(ManifestError, match="n_cells is 5 but its shards hold 4"):
        manifest_from_dict(d)


def test_missing_key_and_wrong_type_are_named() -> None:
    d = _manifest([(4, 4)]).to_dict()
    del d["shuffle"]
    with pytest.raises(ManifestError, match="missing required key 'shuffle'"):
        manifest_from_dict(d)
    d = _manifest([(4, 4)]).to_dict()
    d["n_genes"] = "10"
    with pytest.raises(ManifestError, match="'n_genes' must be int"):
        manifest_from_dict(d)


def test_missing_manifest_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(ManifestNotFoundError, match="no manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestNotFoundError, match="no such dataset directory"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_dataset_id_depends_on_content_only() -> None:
    a = compute_dataset_id({"sources": [{"sha256": "1"}], "options": {"seed": 0}})
    b = compute_dataset_id({"options": {"seed": 0}, "sources": [{"sha256": "1"}]})
    c = compute_dataset_id({"sources": [{"sha256": "1"}], "options": {"seed": 1}})
    assert a == b != c
    assert a.startswith("sha256:")


# ---- the package keeps the old module's names; typed sections; one version check -------------
OLD_NAMES = ["ARRAY_NAMES", "FORMAT_NAME", "FORMAT_VERSION", "INDEX_DTYPE", "INDPTR_DTYPE", "LAYOUT_RAW",
             "MANIFEST_NAME", "SHARDS_DIR", "SUPPORTED_FORMAT_VERSIONS", "VOCAB_NAME", "VALUE_DTYPES",
             "ArrayEntry", "Manifest", "ObsColumn", "OtherFiles", "ShardEntry", "SourceEntry",
             "compute_dataset_id", "manifest_bytes", "manifest_from_dict", "other_files_digest",
             "read_manifest", "sha256_bytes", "sha256_file", "shard_array_relpath", "shard_relpath",
             "write_manifest"]


def test_every_name_of_the_former_module_still_imports() -> None:
    import scmf_loader.format as fmt

    missing = [n for n in OLD_NAMES if not hasattr(fmt, n)]
    assert missing == []
    assert set(OLD_NAMES) <= set(fmt.__all__)


def test_sections_are_typed_and_keep_their_json() -> None:
    d = _manifest([(2, 3)]).to_dict()
    d["vocab"] = {"path": "vocab.json", "sha256": "ab", "name": "union", "n_tokens": 10, "future": [1]}
    d["shuffle"] = {"seed": 3, "enabled": True, "chunk_size": 10, "shard_size": 16}
    m = manifest_from_dict(d)
    assert isinstance(m.vocab, VocabSection)
    assert isinstance(m.shuffle, ShuffleSection)
    assert isinstance(m.preprocessing, PreprocessingSection)
    assert (m.vocab.path, m.vocab.sha256, m.vocab.name, m.vocab.n_tokens) == ("vocab.json", "ab", "union", 10)
    assert m.vocab.file_sha256 is None
    assert (m.shuffle.seed, m.shuffle.enabled, m.shuffle.shard_size) == (3, True, 16)
    assert m.preprocessing.baked is True  # not recorded: the stored values are final
    assert m.vocab["future"] == [1]  # unknown keys survive
    assert list(m.to_dict()["shuffle"]) == ["seed", "enabled", "chunk_size", "shard_size"]  # order kept
    assert m.to_dict() == d
    assert m.vocab == d["vocab"]


@pytest.mark.parametrize(("section", "value", "message"), [
    ("shuffle", {"seed": "0"}, "shuffle: 'seed' must be int, found str"),
    ("shuffle", {"enabled": 1}, "shuffle: 'enabled' must be bool"),
    ("vocab", {"sha256": "x"}, "vocab: missing required key 'path'"),
    ("vocab", {"path": "../vocab.json"}, "must be relative"),
    ("vocab", {"path": "vocab.json", "n_tokens": True}, "'n_tokens' must be int, found bool"),
    ("preprocessing", {"log1p": "yes"}, "preprocessing: 'log1p' must be bool"),
])
def test_sections_reject_wrong_types(section: str, value: dict, message: str) -> None:
    d = _manifest([(1, 1)]).to_dict()
    d[section] = value
    with pytest.raises(ManifestError, match=message):
        manifest_from_dict(d)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("format_version", 3, "format_version is 3; this scmf_loader reads format_version 1, 2"),
    ("format_version", True, "format_version is True"),
    ("format", "anndata", "format is 'anndata'; expected 'scmf-shards'"),
    ("layout", "zstd", "layout is 'zstd'; supported layouts"),
])
def test_one_version_check_for_json_and_for_code(key: str, value: object, message: str) -> None:
    d = _manifest([(1, 1)]).to_dict()
    d[key] = value
    del d["shards"]  # the version is checked before anything else
    with pytest.raises(FormatVersionError, match=message):
        manifest_from_dict(d)
    with pytest.raises(FormatVersionError, match=message):
        dataclasses.replace(_manifest([(1, 1)]), **{key: value})
    with pytest.raises(FormatVersionError, match=message):
        check_format_version(*(value if k == key else d0 for k, d0 in
                               (("format", "scmf-shards"), ("format_version", 1), ("layout", "raw"))))


# ---- structural checks of the CSR arrays -------------------------------------------------------
def _reference_problem(indptr: np.ndarray, indices: np.ndarray, n_genes: int) -> str | None:
    """An independent, loop-by-loop statement of the rules (docs/format.md section 3.2)."""
    if indptr[0] != 0:
        return "X/indptr[0]"
    for i in range(1, len(indptr)):
        if indptr[i] < indptr[i - 1]:
            return f"decreases at position {i}"
    for j, g in enumerate(indices):
        if not 0 <= g < n_genes:
            return f"X/indices[{j}] is {g}"
    for r in range(len(indptr) - 1):
        for j in range(indptr[r] + 1, indptr[r + 1]):
            if indices[j] <= indices[j - 1]:
                return f"row {r} at X/indices[{j}]"
    return None


def _arrays(indptr: np.ndarray, indices: np.ndarray) -> tuple[ShardEntry, ShardArrays]:
    entry = _shard(0, len(indptr) - 1, int(indptr[-1]))
    data = np.ones(len(indices), dtype=np.float32)
    return entry, ShardArrays(indptr=indptr, indices=indices, data=data)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["none", "swap", "dup", "range", "negative", "indptr"]))
def test_structure_check_agrees_with_a_loop_reference(seed: int, corruption: str) -> None:
    rng = np.random.default_rng(seed)
    n_cells, n_genes = int(rng.integers(1, 12)), int(rng.integers(2, 9))
    rows = [np.sort(rng.choice(n_genes, size=int(rng.integers(0, n_genes + 1)), replace=False))
            for _ in range(n_cells)]
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.concatenate(rows).astype(np.int32) if indptr[-1] else np.zeros(0, np.int32)
    full_rows = [r for r in range(n_cells) if indptr[r + 1] - indptr[r] >= 2]
    if corruption in ("swap", "dup") and full_rows:
        a = int(indptr[full_rows[int(rng.integers(len(full_rows)))]])
        indices[a + 1] = indices[a] if corruption == "dup" else indices[a + 1]
        if corruption == "swap":
            indices[a], indices[a + 1] = indices[a + 1], indices[a]
    elif corruption in ("range", "negative") and indices.size:
        indices[int(rng.integers(indices.size))] = n_genes if corruption == "range" else -1
    elif corruption == "indptr" and n_cells >= 2:
        indptr[1] = indptr[2] + 1  # decreases at position 2
        indptr[-1] = indptr[-1] if n_cells > 2 else indptr[1] - 1
    entry, arrays = _arrays(indptr, indices)
    entry = dataclasses.replace(entry, nnz=int(indptr[-1]))
    expected = _reference_problem(indptr, indices, n_genes)
    if expected is None:
        check_csr_structure("shard", entry, arrays, n_genes, full=True)
    else:
        with pytest.raises(ShardCorruptError, match=re.escape(expected)):
            check_csr_structure("shard", entry, arrays, n_genes, full=True)


def test_index_check_works_across_block_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows straddling the blocks the full check reads: a row restarting lower at a block
    boundary is fine, an unsorted pair at a boundary is found."""
    monkeypatch.setattr(integrity, "_BLOCK_NNZ", 3)
    indptr = np.array([0, 2, 7, 7, 9, 10], dtype=np.int64)
    indices = np.array([4, 8, 0, 1, 2, 3, 9, 1, 2, 0], dtype=np.int32)
    entry, arrays = _arrays(indptr, indices)
    check_csr_structure("s", entry, arrays, 10, full=True)
    indices[6] = 3  # row 1: ..., 3, 3
    with pytest.raises(ShardCorruptError, match=re.escape("row 1 at X/indices[6] (3 then 3)")):
        check_csr_structure("s", entry, arrays, 10, full=True)


@pytest.mark.parametrize(("indptr", "message"), [
    ([1, 2, 3], r"X/indptr\[0\] is 1; it must be 0"),
    ([0, 3, 2], r"decreases at position 2 \(3 then 2\)"),
    ([0, 1, 2], r"X/indptr ends at 2 \(position 2\); the manifest says nnz=3"),
])
def test_cheap_check_names_the_first_bad_position(indptr: list[int], message: str) -> None:
    entry = _shard(0, 2, 3)
    arrays = ShardArrays(indptr=np.array(indptr, dtype=np.int64), indices=np.array([1, 2, 3], np.int32),
                         data=np.ones(3, np.float32))
    with pytest.raises(ShardCorruptError, match=message):
        check_csr_structure("shard 7", entry, arrays, 10)
