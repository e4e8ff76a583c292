"""Inputs from fsspec URLs: several ``memory://`` inputs (CSR, CSC, dense) and ``file://``
convert to the same shards, bytes and ``dataset_id`` as the same files given as paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scmf_shards.convert import convert_h5ad

KW = {"shard_size": 500, "chunk_size": 200, "obs_columns": ("cell_type", "batch"), "quiet": True}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def memory_urls(three_sources: list[Path]) -> Iterator[list[str]]:
    """The three test inputs copied into fsspec's in-memory filesystem."""
    import fsspec

    fs = fsspec.filesystem("memory")
    urls = []
    for p in three_sources:
        fs.pipe(f"/scmf-test/{p.name}", p.read_bytes())
        urls.append(f"memory://scmf-test/{p.name}")
    try:
        yield urls
    finally:
        fs.rm("/scmf-test", recursive=True)


def test_several_memory_urls_csr_csc_dense(three_sources: list[Path], memory_urls: list[str], tmp_path: Path) -> None:
    by_path = convert_h5ad(three_sources, tmp_path / "path", **KW)
    by_url = convert_h5ad(memory_urls, tmp_path / "url", **KW)
    mixed = [memory_urls[0], f"file://{three_sources[1]}", three_sources[2]]
    by_mixed = convert_h5ad(mixed, tmp_path / "mixed", **KW)
    assert [s.extra["layout"] for s in by_url.sources] == ["csr", "csc", "dense"]
    assert [s.path for s in by_url.sources] == memory_urls
    assert by_url.dataset_id == by_path.dataset_id == by_mixed.dataset_id
    assert by_url.n_cells == 1450
    expected = tree_bytes(tmp_path / "path")
    expected.pop("manifest.json")  # records where the inputs came from
    for name in ("url", "mixed"):
        got = tree_bytes(tmp_path / name)
        got.pop("manifest.json")
        assert got == expected, name


def test_missing_memory_url_is_a_clear_error(tmp_path: Path) -> None:
    from scmf_loader.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"memory://scmf-test/nope\.h5ad: cannot open"):
        convert_h5ad(["memory://scmf-test/nope.h5ad"], tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "manifest.json").exists()
