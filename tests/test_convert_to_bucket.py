"""Converting straight to a bucket (issue 12, deliverable 3) against a real S3 API on loopback
(moto, ``tests/s3_fixtures.py``) and fsspec's ``memory://``: the stored dataset is byte for byte
the local conversion of the same inputs, read back through ``CellDataset(url)`` and
``StreamingCellDataset``; the manifest is put last; a conversion SIGKILLed after some shards
(``scmf_shards.faults``, forked by ``tests/fault_harness.py``) resumes against the bucket and
uploads only the missing shards; ``verify URL`` passes and catches a flipped byte; URLs the
tool cannot honour are refused with one line naming the option and the URL."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hpc_genes, write_counts_h5ad
from fault_harness import ForkServer

from scmf_loader.dataset import CellDataset
from scmf_loader.errors import DatasetExistsError, OutputNotWritableError
from scmf_loader.format import read_manifest
from scmf_loader.streaming import StreamingCellDataset
from scmf_shards import faults
from scmf_shards.cli import main
from scmf_shards.convert import convert_h5ad
from scmf_shards.upload import UPLOAD_MARKER, staging_dir

pytest_plugins = ["s3_fixtures"]

if TYPE_CHECKING:
    from s3_fixtures import MotoS3

SECRET = "scmf-secret-never-logged"
OPTS = {"shard_size": 300, "chunk_size": 256, "obs_columns": ("cell_type",), "seed": 5, "quiet": True}
CLI_OPTS = ["--shard-size", "300", "--chunk-size", "256", "--obs-columns", "cell_type", "--seed", "5", "--quiet"]
N_SHARDS = 4


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file of the dataset under ``root`` (relative path -> bytes; not the lock file)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".scmf-lock"}


def s3_options(server: MotoS3) -> dict[str, Any]:
    from s3_fixtures import storage_options

    return {**storage_options(server.endpoint), "secret": SECRET}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two inputs (CSR and CSC; 1,050 cells): 4 shards."""
    d = tmp_path_factory.mktemp("bucket_src")
    genes = hpc_genes()
    return [write_counts_h5ad(d / "a.h5ad", 650, genes[:300], seed=21),
            write_counts_h5ad(d / "b.h5ad", 400, list(reversed(genes[100:380])), layout="csc", seed=22)]


@pytest.fixture(scope="module")
def reference(sources: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same inputs converted into a local directory."""
    out = tmp_path_factory.mktemp("bucket_ref") / "ds"
    convert_h5ad(sources, out, **OPTS)
    assert len(read_manifest(out).shards) == N_SHARDS
    return out


@pytest.fixture
def aws_env(s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    """The CLI's credentials and endpoint, from the environment only."""
    set_aws_env(monkeypatch, s3_server)
    return s3_server


class Puts:
    """Records the paths of every object put through s3fs or fsspec's memory filesystem."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import s3fs
        from fsspec.implementations.memory import MemoryFileSystem

        self.paths: list[str] = []
        for name in ("_put_file", "_pipe_file"):
            original = getattr(s3fs.S3FileSystem, name)

            async def wrapped(fs: Any, *args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
                self.paths.append(str(args[1] if _name == "_put_file" else args[0]))
                return await _original(fs, *args, **kw)

            monkeypatch.setattr(s3fs.S3FileSystem, name, wrapped)
        # fsspec binds an async filesystem's sync methods (pipe_file ...) when it is made:
        # cached instances made before the patch would bypass it
        s3fs.S3FileSystem.clear_instance_cache()
        for name in ("put_file", "pipe_file"):
            original = getattr(MemoryFileSystem, name)

            def wrapped_sync(fs: Any, *args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
                self.paths.append(str(args[1] if _name == "put_file" else args[0]))
                return _original(fs, *args, **kw)

            monkeypatch.setattr(MemoryFileSystem, name, wrapped_sync)

    def shards(self) -> list[str]:
        """The shards put, in first-put order (``shards/000001.zarr``)."""
        out: list[str] = []
        for p in self.paths:
            if "/shards/" in p:
                name = "shards/" + p.split("/shards/")[1].split("/")[0]
                if name not in out:
                    out.append(name)
        return out

    def data_objects(self) -> list[str]:
        """Puts of the dataset's own files (not the upload marker)."""
        return [p for p in self.paths if not p.endswith(UPLOAD_MARKER)]


def stored_tree(server: MotoS3, url: str) -> dict[str, bytes]:
    """Every object under ``url`` (relative key -> bytes)."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    client = server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: server.get(f"s3://{bucket}/{k}") for k in keys}


def assert_reads_like(url: str, reference: Path, tmp_path: Path, storage_options: dict[str, Any] | None) -> None:
    """CellDataset(url) and StreamingCellDataset(url) give the local dataset's cells."""
    local = CellDataset(reference)
    remote = CellDataset(url, cache_dir=tmp_path / "cache", storage_options=storage_options)
    ids = np.arange(len(local))
    a, b = remote[ids], local[ids]
    for name in ("indptr", "indices", "values"):
        np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy(), err_msg=name)
    stream = StreamingCellDataset(url, batch_size=128, shuffle=True, seed=1, rank=0, world_size=1,
                                  cache_dir=tmp_path / "cache2", storage_options=storage_options)
    seen = []
    for batch in stream:
        ref = local[batch.cell_ids.numpy()]
        for name in ("indptr", "indices", "values"):
            np.testing.assert_array_equal(getattr(batch, name).numpy(), getattr(ref, name).numpy(), err_msg=name)
        np.testing.assert_array_equal(batch.obs["cell_type"].numpy(), ref.obs["cell_type"].numpy())
        seen += batch.cell_ids.tolist()
    assert sorted(seen) == list(range(len(local)))


def test_convert_to_s3_is_the_local_dataset_manifest_last(
    s3_server: MotoS3, sources: list[Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3_server.make_bucket()}/atlas/v1"
    puts = Puts(monkeypatch)
    manifest = convert_h5ad(sources, url, storage_options=s3_options(s3_server), scratch_dir=str(tmp_path), **OPTS)
    local = read_manifest(reference)
    assert manifest.dataset_id == local.dataset_id
    assert [s.arrays["data"].checksums for s in manifest.shards] == [s.arrays["data"].checksums for s in local.shards]
    stored = stored_tree(s3_server, url)
    assert stored == tree_bytes(reference)  # byte-identical, no marker, no scratch left
    # order of puts: vocabulary, every shard in order, the manifest last
    objects = puts.data_objects()
    assert objects[0].endswith("/vocab.json")
    assert objects[-1].endswith("/manifest.json")
    assert sum(p.endswith("/manifest.json") for p in objects) == 1
    assert puts.shards() == [s.path for s in local.shards]
    assert puts.paths[0].endswith(UPLOAD_MARKER)  # the unfinished-upload marker goes first
    assert not any(tmp_path.glob("scmf-staging-*/*")), "the staging directory is removed"
    assert SECRET.encode() not in stored["manifest.json"]
    assert_reads_like(url, reference, tmp_path, s3_options(s3_server))
    # the same conversion again: the stored dataset is the result, nothing is put
    puts.paths.clear()
    again = convert_h5ad(sources, url, storage_options=s3_options(s3_server), **OPTS)
    assert again.dataset_id == manifest.dataset_id
    assert puts.paths == []


def test_memory_url_works_too(sources: list[Path], reference: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    url = f"memory://scmf-{uuid.uuid4().hex[:8]}/atlas"
    puts = Puts(monkeypatch)
    try:
        convert_h5ad(sources, url, scratch_dir=str(tmp_path), **OPTS)
        objects = puts.data_objects()
        assert objects[0].endswith("/vocab.json")
        assert objects[-1].endswith("/manifest.json")
        fs = fsspec.filesystem("memory")
        root = url[len("memory:/"):]
        stored = {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}
        assert stored == tree_bytes(reference)
        assert_reads_like(url, reference, tmp_path, None)
    finally:
        fsspec.filesystem("memory").rm(url[len("memory:/"):], recursive=True)


def _cli(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stdout, result.stderr


def test_cli_verify_and_info_on_a_url(aws_env: MotoS3, sources: list[Path], reference: Path, tmp_path: Path) -> None:
    url = f"s3://{aws_env.make_bucket()}/atlas/v1"
    code, out, err = _cli(["h5ad", *map(str, sources), "--output", url, "--scratch-dir", str(tmp_path), *CLI_OPTS])
    assert code == 0, err
    assert SECRET not in out + err
    assert stored_tree(aws_env, url) == tree_bytes(reference)
    code, out, err = _cli(["verify", url, "-q"])
    assert (code, out.strip()) == (0, f"OK: {url}: {N_SHARDS} shard(s) verified"), err
    code, out, err = _cli(["info", url])
    assert code == 0, err
    assert f"dataset   {url}" in out
    assert "cells     1,050" in out
    # one byte of a stored shard flipped: verify fails, naming the shard's URL
    key = f"{url}/shards/000002.zarr/X/data/c/0"
    data = bytearray(aws_env.get(key))
    data[len(data) // 2] ^= 0x01
    aws_env.put(key, bytes(data))
    code, out, err = _cli(["verify", url, "-q"])
    lines = err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "checksum mismatch" in lines[0]
    assert f"{url}/shards/000002.zarr" in lines[0]


def in_empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Change into a fresh empty directory (to see that nothing is written there)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_a_missing_bucket_is_one_error_line(aws_env: MotoS3, sources: list[Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url = "s3://scmf-missing-bucket-x/atlas"
    cwd = in_empty_cwd(tmp_path, monkeypatch)
    code, _, err = _cli(["h5ad", str(sources[0]), "--output", url, "--quiet"])
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: {url}: bucket 'scmf-missing-bucket-x' does not exist (or these credentials cannot "
        "see it); create it first or fix --output"]
    assert list(cwd.iterdir()) == []  # never turned into a local path
    for command in (["verify", url], ["info", url]):
        code, _, err = _cli(command)
        assert code == 1
        assert err.startswith(f"error: {url}: no such dataset"), err


@pytest.mark.parametrize(("args", "option"), [
    (["preprocess", "IN", "--output", "s3://b/p.h5ad"], "--output"),
    (["h5ad", "IN", "--output", "OUT", "--scratch-dir", "s3://b/scratch"], "--scratch-dir"),
    (["append", "BASE", "IN", "--output", "s3://b/v2"], "--output"),
    (["h5ad", "IN", "--output", "https://example.org/ds"], "--output"),
])
def test_urls_that_cannot_be_honoured_are_refused(aws_env: MotoS3, sources: list[Path], reference: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  args: list[str], option: str) -> None:
    subst = {"IN": str(sources[0]), "OUT": str(tmp_path / "out"), "BASE": str(reference)}
    args = [subst.get(a, a) for a in args]
    url = next(a for a in args if "://" in a)
    cwd = in_empty_cwd(tmp_path, monkeypatch)
    code, _, err = _cli(args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {option} {url}: "), err
    assert list(cwd.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_another_dataset_is_refused_unless_overwrite(s3_server: MotoS3, sources: list[Path], tmp_path: Path) -> None:
    url = f"s3://{s3_server.make_bucket()}/atlas"
    so = s3_options(s3_server)
    first = convert_h5ad(sources[:1], url, storage_options=so, scratch_dir=str(tmp_path), **OPTS)
    with pytest.raises(DatasetExistsError, match="already holds a different dataset"):
        convert_h5ad(sources, url, storage_options=so, scratch_dir=str(tmp_path), **OPTS)
    second = convert_h5ad(sources, url, storage_options=so, scratch_dir=str(tmp_path), **{**OPTS, "overwrite": True})
    assert second.dataset_id != first.dataset_id
    stored = stored_tree(s3_server, url)
    assert read_manifest_bytes(stored)["dataset_id"] == second.dataset_id
    assert {k.split("/")[1] for k in stored if k.startswith("shards/")} == {s.path.split("/")[1] for s in second.shards}
    # a prefix holding something else is never replaced, even with --overwrite
    other = f"s3://{s3_server.make_bucket()}/data"
    s3_server.put(f"{other}/notes.txt", b"not a dataset")
    with pytest.raises(DatasetExistsError, match="is not an scmf dataset"):
        convert_h5ad(sources, other, storage_options=so, **{**OPTS, "overwrite": True})
    with pytest.raises(OutputNotWritableError, match="does not exist"):
        convert_h5ad(sources, "s3://scmf-no-such-bucket/x", storage_options=so, **OPTS)


def read_manifest_bytes(stored: dict[str, bytes]) -> dict[str, Any]:
    import json

    return dict(json.loads(stored["manifest.json"]))


def set_aws_env(mp: pytest.MonkeyPatch, server: MotoS3) -> None:
    """The CLI's credentials and endpoint, from the environment only."""
    mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.delenv(faults.FAULT_ENV, raising=False)


@pytest.fixture(scope="module")
def server(s3_server: MotoS3) -> Iterator[ForkServer]:
    """Forks ``scmf-convert`` runs from one pre-imported process (see fault_harness) whose
    environment points at the loopback S3 server."""
    with pytest.MonkeyPatch.context() as mp:
        set_aws_env(mp, s3_server)
        fork = ForkServer().__enter__()
    try:
        yield fork
    finally:
        fork.__exit__(None, None, None)


def _labels(args: list[str]) -> list[str]:
    """The fault-point labels of an uninterrupted in-process run of ``args``."""
    labels: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(faults, "fault_point", labels.append)
        code, _, err = _cli(args)
    assert code == 0, err
    return labels


@pytest.mark.parametrize("keep_staging", [True, False], ids=["staging-kept", "staging-lost"])
def test_killed_conversion_resumes_against_the_bucket(
    aws_env: MotoS3, sources: list[Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    server: ForkServer, keep_staging: bool,
) -> None:
    """SIGKILL after the k-th shard upload: no manifest in the bucket; the re-run (with the
    local staging kept, or lost as on another machine) puts only the missing shards."""
    scratch = tmp_path / "scratch"
    args = ["h5ad", *map(str, sources), "--scratch-dir", str(scratch), *CLI_OPTS]
    labels = _labels([*args, "--output", f"s3://{aws_env.make_bucket()}/probe"])
    assert labels.count("upload:shard") == N_SHARDS
    assert labels[-1] == "upload:manifest"
    done = 1 if keep_staging else 2
    kill_at = [i for i, label in enumerate(labels) if label == "upload:shard"][done - 1] + 1
    url = f"s3://{aws_env.make_bucket()}/atlas/v1"
    status = server.run([*args, "--output", url], tmp_path / "killed.log", fault=str(kill_at))
    assert status == -9, (tmp_path / "killed.log").read_text()
    stored = stored_tree(aws_env, url)
    assert "manifest.json" not in stored  # not a dataset yet
    assert UPLOAD_MARKER in stored
    expected_shards = [s.path for s in read_manifest(reference).shards]
    assert sorted({"/".join(k.split("/")[:2]) for k in stored if k.startswith("shards/")}) == expected_shards[:done]
    code, _, err = _cli(["verify", url])
    assert code == 1
    assert "not a complete scmf dataset" in err
    staging = staging_dir(url, read_manifest(reference).dataset_id, scratch)
    assert (staging / "manifest.json").is_file()  # the local conversion had finished
    if not keep_staging:
        shutil.rmtree(staging)
    puts = Puts(monkeypatch)
    code, _, err = _cli([*args, "--output", url])
    assert code == 0, err
    assert puts.shards() == expected_shards[done:]  # only the missing shards
    assert puts.data_objects()[-1].endswith("/manifest.json")
    assert stored_tree(aws_env, url) == tree_bytes(reference)
    assert not staging.exists()
