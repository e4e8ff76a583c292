"""The manifest schema: round trips, version checks and rejection of malformed manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scmf_loader.errors import FormatVersionError, ManifestError, ManifestNotFoundError
from scmf_loader.format import (
    FORMAT_VERSION,
    ArrayEntry,
    Manifest,
    ObsColumn,
    ShardEntry,
    SourceEntry,
    compute_dataset_id,
    manifest_from_dict,
    read_manifest,
    write_manifest,
)


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
    with pytest.raises(FormatVersionError, match=r"format_version is 2.*reads format_version 1"):
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
