"""Converting straight to a bucket (issue 12, deliverable 3) against a real S3 API on loopback
(moto, ``tests/s3_fixtures.py``) and fsspec's ``memory://``: the stored dataset is byte for byte
the local conversion of the same inputs, read back through ``CellDataset(url)`` and
``StreamingCellDataset``; the manifest is put last; a conversion SIGKILLed after some shards
(``scmf_shards.faults``, forked by ``tests/fault_harness.py``) resumes against the bucket and
uploads only the missing shards; ``verify URL`` passes and catches a flipped byte; URLs the
tool cannot honour are refused with one line naming the option and the URL."""

from __future__ import annotations

import contextlib
import shutil
import uuid
import warnings
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
from scmf_shards.options import default_workers
from scmf_shards.upload import UPLOAD_MARKER, staging_dir
from scmf_shards.upload_stream import RECORDS_DIR, ShardStreamer, in_flight

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
    assert sorted(puts.shards()) == [s.path for s in local.shards]  # each once (gather threads: any order)
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


def intact_shards(stored: dict[str, bytes], reference: Path) -> list[str]:
    """The shards whose stored objects are exactly the reference shard's files."""
    ref = tree_bytes(reference)
    out = []
    for s in read_manifest(reference).shards:
        mine = {k: v for k, v in stored.items() if k.startswith(s.path + "/")}
        if mine and mine == {k: v for k, v in ref.items() if k.startswith(s.path + "/")}:
            out.append(s.path)
    return out


@pytest.mark.parametrize(("label", "nth", "keep_staging"), [
    ("upload:vocab", 1, True),
    ("upload:shard", 1, True),
    ("upload:shard", 2, False),
    ("upload:record", N_SHARDS - 1, False),
    ("upload:manifest", 1, True),
], ids=["vocab", "shard1-staging-kept", "shard2-staging-lost", "before-a-record", "manifest"])
def test_killed_conversion_resumes_against_the_bucket(
    aws_env: MotoS3, sources: list[Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    server: ForkServer, label: str, nth: int, keep_staging: bool,
) -> None:
    """SIGKILL at the ``nth`` ``label`` of the streamed upload (shards go up while later ones
    are gathered, so the exact point varies a little between runs; what is checked holds at
    any point): no manifest in the bucket before every shard is there; the re-run (local
    staging kept, or lost as on another machine) puts only the shards not stored intact,
    gathers again only those without an upload record, and ends byte-identical."""
    scratch = tmp_path / "scratch"
    args = ["h5ad", *map(str, sources), "--scratch-dir", str(scratch), *CLI_OPTS]
    labels = _labels([*args, "--output", f"s3://{aws_env.make_bucket()}/probe"])
    assert labels.count("upload:shard") == labels.count("upload:record") == N_SHARDS
    assert labels.count("upload:vocab") == 1
    assert labels[-1] == "upload:manifest"
    assert labels.index("upload:vocab") < labels.index("upload:shard")
    kill_at = [i for i, x in enumerate(labels) if x == label][nth - 1] + 1
    url = f"s3://{aws_env.make_bucket()}/atlas/v1"
    status = server.run([*args, "--output", url], tmp_path / "killed.log", fault=str(kill_at))
    assert status == -9, (tmp_path / "killed.log").read_text()
    stored = stored_tree(aws_env, url)
    assert UPLOAD_MARKER in stored
    expected = [s.path for s in read_manifest(reference).shards]
    intact = intact_shards(stored, reference)
    recorded = sorted(f"shards/{k.split('/')[1][:-5]}.zarr" for k in stored if k.startswith(RECORDS_DIR + "/"))
    assert set(recorded) <= set(intact)  # a record only once its shard is stored and read back
    if label == "upload:manifest":
        assert intact == expected
    else:
        assert "manifest.json" not in stored  # not a dataset yet
        code, _, err = _cli(["verify", url])
        assert code == 1
        assert "not a complete scmf dataset" in err
    staging = staging_dir(url, read_manifest(reference).dataset_id, scratch)
    staged = [p.name for p in (staging / "shards").glob("*.zarr")] if (staging / "shards").is_dir() else []
    assert len(staged) <= in_flight(default_workers())
    if not keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
    puts = Puts(monkeypatch)
    rerun = _labels([*args, "--output", url])
    assert sorted(puts.shards()) == [s for s in expected if s not in intact]  # only the missing shards
    if label != "upload:manifest":
        assert puts.data_objects()[-1].endswith("/manifest.json")
    if not keep_staging:  # recorded shards are not even gathered again
        assert rerun.count("gather:shard") == N_SHARDS - len(recorded)
    assert stored_tree(aws_env, url) == tree_bytes(reference)
    assert not staging.exists()


def _memory_url() -> str:
    return f"memory://scmf-{uuid.uuid4().hex[:8]}/atlas"


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh ``memory://`` prefix, deleted afterwards."""
    import fsspec

    url = _memory_url()
    yield url
    with contextlib.suppress(FileNotFoundError):
        fsspec.filesystem("memory").rm(url[len("memory:/"):], recursive=True)


def test_staging_holds_only_the_shards_in_flight(sources: list[Path], tmp_path: Path, memory_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """11 shards, 2 gather threads: whenever a shard is handed to the uploader, staging holds
    at most in_flight(2) = 5 shards; every shard is stored, verified."""
    from scmf_shards.upload import verify_url

    seen: list[int] = []
    original = ShardStreamer.on_shard

    def counting(self: ShardStreamer, shard: int, entry: dict[str, Any]) -> None:
        seen.append(len(list((self.staging / "shards").glob("*.zarr"))))
        original(self, shard, entry)

    monkeypatch.setattr(ShardStreamer, "on_shard", counting)
    manifest = convert_h5ad(sources, memory_url, scratch_dir=str(tmp_path), **{**OPTS, "shard_size": 100, "workers": 2})
    assert len(manifest.shards) == len(seen) == 11
    assert max(seen) <= in_flight(2) < 11
    assert verify_url(memory_url) == ([], 11)
    assert not any(tmp_path.glob("scmf-staging-*/*"))


def test_an_upload_error_stops_the_conversion(sources: list[Path], tmp_path: Path, memory_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses the second shard: one error naming the URL, the conversion stops
    (not every shard is written), no manifest is stored. The first shard was recorded; one
    byte of it flipped in the store, the re-run does not trust the record: it puts that
    shard again (with the missing ones), and the result verifies."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from scmf_shards.upload import verify_url

    original = MemoryFileSystem.put_file
    gathered: list[int] = []

    def refusing(fs: Any, lpath: str, rpath: str, *a: Any, **kw: Any) -> Any:
        if "/shards/000001.zarr/" in str(rpath):
            raise PermissionError("AccessDenied: not today")
        return original(fs, lpath, rpath, *a, **kw)

    monkeypatch.setattr(MemoryFileSystem, "put_file", refusing)
    monkeypatch.setattr(ShardStreamer, "on_shard", _recording(ShardStreamer.on_shard, gathered))
    opts = {**OPTS, "shard_size": 100, "workers": 1}
    with pytest.raises(OutputNotWritableError) as info:
        convert_h5ad(sources, memory_url, scratch_dir=str(tmp_path), **opts)
    message = str(info.value)
    assert message.startswith(f"{memory_url}: uploading shards/000001.zarr: access refused"), message
    assert len(gathered) < 11  # the converter stopped
    fs = fsspec.filesystem("memory")
    root = memory_url[len("memory:/"):]
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    assert "manifest.json" not in names
    assert UPLOAD_MARKER in names
    assert fs.ls(f"{root}/{RECORDS_DIR}", detail=False) == [f"{root}/{RECORDS_DIR}/000000.json"]
    key = f"{root}/shards/000000.zarr/X/data/c/0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(key, bytes(data))
    monkeypatch.setattr(MemoryFileSystem, "put_file", original)
    puts = Puts(monkeypatch)
    manifest = convert_h5ad(sources, memory_url, scratch_dir=str(tmp_path), **opts)
    assert len(manifest.shards) == 11
    assert sorted(puts.shards()) == [s.path for s in manifest.shards]  # shard 0 again, despite its record
    assert verify_url(memory_url) == ([], 11)
    assert fs.isfile(f"{root}/manifest.json")
    assert not fs.exists(f"{root}/{UPLOAD_MARKER}")
    assert not fs.exists(f"{root}/{RECORDS_DIR}")


def _recording(original: Any, into: list[int]) -> Any:
    def on_shard(self: ShardStreamer, shard: int, entry: dict[str, Any]) -> None:
        into.append(shard)
        original(self, shard, entry)

    return on_shard


def test_the_disk_guard_asks_staging_for_the_shards_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 110 MB estimate over 1,100 cells, shards of 100 cells, 4 in flight: a staging
    directory needs 40 MB for its shards (plus the buckets when the data does not fit in
    memory), a local output all 110 MB; nothing changes for a local output."""
    from scmf_shards.convert import diskspace

    monkeypatch.setattr(diskspace, "free_bytes", lambda _p: 60_000_000)
    estimate = diskspace.Estimate(110_000_000, 1_100)
    local, staging = tmp_path / "local", tmp_path / "staging"
    with pytest.warns(diskspace.LowSpaceWarning, match="about 110 MB needed but only 60 MB free"):
        diskspace.OutputGuard(local, None, estimate).warn()
    with diskspace.staged_output(staging, 4, 100):
        assert diskspace.staged_bytes(staging, estimate) == 40_000_000
        assert diskspace.staged_bytes(local, estimate) == 110_000_000
        with pytest.warns(diskspace.LowSpaceWarning, match=r"about 40 MB needed for the shards staged at once "
                          r"before upload, 150 MB if the data does not fit --memory-limit"):
            diskspace.OutputGuard(staging, None, estimate).warn()
        with pytest.warns(diskspace.LowSpaceWarning, match="about 110 MB needed but only"):
            diskspace.OutputGuard(local, None, estimate).warn()  # unchanged
    assert diskspace.staged_bytes(staging, estimate) == 110_000_000  # registered only while inside
    monkeypatch.setattr(diskspace, "free_bytes", lambda _p: 200_000_000)
    with diskspace.staged_output(staging, 4, 100), warnings.catch_warnings():
        warnings.simplefilter("error")
        diskspace.OutputGuard(staging, None, estimate).warn()  # fits: no warning
