"""Conversions in failing environments (issue 18): a full disk, a read-only output, a path that
cannot be created, Ctrl-C. Each gives one ``error:`` (or ``interrupted:``) line and no
manifest; a re-run once the problem is gone resumes and ends with the dataset an
uninterrupted run writes.

The small file systems are tmpfs mounts made by the test (root only: a test that cannot
mount is skipped and says so). The CLI runs as a subprocess, as a user would run it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import hpc_genes, write_counts_h5ad

from scmf_loader.format import read_manifest
from scmf_shards.convert.diskspace import (
    LowSpaceWarning,
    OutputNotWritableError,
    estimate_bytes,
    output_error,
    warn_if_short,
)

CLI = [sys.executable, "-c", "from scmf_shards.cli import main; main(prog_name='scmf-convert')"]
ARGS = ["--shard-size", "500", "--chunk-size", "500", "-q"]


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4,000 cells x 400 genes, ~40 values per cell: ~1.3 MB of shards, ~2 MB of buckets."""
    path = tmp_path_factory.mktemp("failing_env") / "big.h5ad"
    return write_counts_h5ad(path, 4000, hpc_genes()[:400], seed=1, density=0.1)


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (skips the test when mounting is not
    permitted), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): needs root / CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, opts: str) -> None:
    """Change a tmpfs mount's options (``size=16m``, ``ro``, ``rw``)."""
    subprocess.run(["mount", "-o", f"remount,{opts}", str(where)], check=True, capture_output=True)


def convert(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "h5ad", str(src), "-o", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: ")]


def test_a_1mb_file_system_gives_one_line_naming_the_output_and_the_space(big_input: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        out = mnt / "out"
        done = convert(big_input, out)
        assert done.returncode == 1
        lines = error_lines(done.stderr)
        assert len(lines) == 1, done.stderr
        m = re.fullmatch(rf"error: {re.escape(str(out))}: no space left on device \(about ([\d.]+) MB "
                         r"needed, ([\d.]+) MB free\); free space and re-run the same command to resume", lines[0])
        assert m, lines[0]
        assert 1.0 <= float(m.group(1)) <= 4.0  # shards ~1.3 MB (one pass: no buckets on disk)
        assert float(m.group(2)) < 1.0
        # the check before writing warned that the estimate does not fit
        assert re.search(r"^warning: .*out: about [\d.]+ MB needed but only 1\.0 MB free", done.stderr, re.M)
        assert not (out / "manifest.json").exists()


def _shard_identity(out: Path) -> dict[str, int]:
    return {p.name: (p / "X" / "data" / "c" / "0").stat().st_ino for p in (out / "shards").glob("*.zarr")}


def test_rerun_after_space_is_freed_resumes_and_equals_an_uninterrupted_run(big_input: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert convert(big_input, reference).returncode == 0
    with tmpfs(tmp_path / "mnt", "3m") as mnt:
        out = mnt / "out"
        failed = convert(big_input, out, "--memory-limit", "1MB")  # through buckets: ~2 MB of them
        assert failed.returncode == 1
        [line] = error_lines(failed.stderr)
        m = re.fullmatch(rf"error: {re.escape(str(out))}: no space left on device \(about ([\d.]+) MB "
                         r"needed, ([\d.]+) MB free\).*", line)
        assert m, line
        assert 2.0 <= float(m.group(1)) <= 8.0  # shards ~1.3 MB and buckets ~2 MB
        assert not (out / "manifest.json").exists()
        finished = _shard_identity(out)
        remount(mnt, "size=32m")  # space freed
        resumed = convert(big_input, out)
        assert resumed.returncode == 0, resumed.stderr
        got, want = read_manifest(out), read_manifest(reference)
        assert got.dataset_id == want.dataset_id
        assert [s.to_dict() for s in got.shards] == [s.to_dict() for s in want.shards]  # same bytes
        kept = {name: ino for name, ino in _shard_identity(out).items() if finished.get(name) == ino}
        assert kept == finished  # shards finished before the failure were verified and reused
        assert subprocess.run([*CLI, "verify", "-q", str(out)], capture_output=True).returncode == 0
        assert not (out / ".scmf-tmp").exists()


def test_a_read_only_output_gives_one_line(big_input: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mnt:
        done = convert(big_input, mnt / "out")
        assert done.returncode == 1
        assert error_lines(done.stderr) == [
            f"error: {mnt / 'out'}: read-only file system (cannot write {mnt / 'out'}); choose another --output"
        ]
    with tmpfs(tmp_path / "ro2", "4m") as mnt:  # the directory exists, the file system turns read-only
        (mnt / "out").mkdir()
        remount(mnt, "ro")
        done = convert(big_input, mnt / "out")
        assert done.returncode == 1
        [line] = error_lines(done.stderr)
        assert line.startswith(f"error: {mnt / 'out'}: read-only file system (cannot write {mnt / 'out'}/")
        assert not (mnt / "out" / "manifest.json").exists()


def test_a_path_that_cannot_be_created_gives_one_line(big_input: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    done = convert(big_input, out)
    assert done.returncode == 1
    assert error_lines(done.stderr) == [
        f"error: {out}: cannot be created (Not a directory: {out}); choose another --output"
    ]


def test_ctrl_c_says_how_to_resume_and_the_rerun_finishes(big_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "h5ad", str(big_input), "-o", str(out), *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "shards" / "000000.zarr").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [
        f"interrupted: {out}: the conversion stopped before its manifest was written, so this is not "
        "a dataset yet; re-run the same command to resume (finished shards are verified and kept)"
    ]
    assert "Aborted!" not in stderr
    assert not (out / "manifest.json").exists()
    rerun = convert(big_input, out)
    assert rerun.returncode == 0, rerun.stderr
    assert read_manifest(out).n_cells == 4000


# ---- the library functions behind the lines ----------------------------------------------------
def test_estimate_is_close_to_what_the_shards_take(big_input: Path, tmp_path: Path) -> None:
    from scmf_shards.sources import open_sources

    out = tmp_path / "out"
    assert convert(big_input, out).returncode == 0
    written = sum(f.stat().st_size for f in (out / "shards").rglob("*") if f.is_file())
    estimate = estimate_bytes(open_sources([str(big_input)], "X", "var_names"), "float32")
    assert 0.5 * written <= estimate <= 2.0 * written, (estimate, written)


def test_free_space_check_warns_only_when_the_estimate_does_not_fit(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path)
    available = free.f_bavail * free.f_frsize
    out = tmp_path / "new" / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_short(out, None, 1000)
        assert not caught
        warn_if_short(out, None, 2 * available)  # the shards alone do not fit
        warn_if_short(out, None, available * 3 // 4)  # they fit, but not with the buckets
    assert [w.category for w in caught] == [LowSpaceWarning, LowSpaceWarning]
    assert re.match(rf"{re.escape(str(out))}: about [\d,.]+ MB needed but only [\d,.]+ MB free", str(caught[0].message))
    assert "if the data does not fit --memory-limit" in str(caught[1].message)


@pytest.mark.parametrize(("code", "text"), [
    (errno.ENOSPC, "no space left on device (about 1.0 MB needed, "),
    (errno.EDQUOT, "no space left on device (disk quota exceeded) (about 1.0 MB needed, "),
    (errno.EROFS, "read-only file system (cannot write "),
    (errno.EACCES, "permission denied (cannot write "),
])
def test_os_errors_become_one_typed_line(tmp_path: Path, code: int, text: str) -> None:
    exc = OSError(code, os.strerror(code), str(tmp_path / "out" / "shards" / "x"))
    error = output_error(exc, tmp_path / "out", None, 1_000_000)
    assert isinstance(error, OutputNotWritableError)
    assert isinstance(error, OSError)
    assert str(error).startswith(f"{tmp_path / 'out'}: {text}")


def test_other_os_errors_are_left_alone(tmp_path: Path) -> None:
    assert output_error(OSError(errno.EIO, "I/O error"), tmp_path, None, 10) is None
    assert output_error(OSError(errno.ENOENT, "gone", "x"), tmp_path, None, 10) is None  # only when creating
    assert output_error(OSError(errno.ENOENT, "gone", "x"), tmp_path, None, 10, creating=True) is not None
    # a short write without errno (numpy's tofile) counts as "no space" only on a full file system
    assert output_error(OSError("160000 requested and 118752 written"), tmp_path, None, 10) is None


def test_errors_raised_on_purpose_pass_the_guard_unchanged(tmp_path: Path) -> None:
    """An error raised on purpose (an ScmfError that is also an OSError) passes through."""
    from scmf_loader.errors import ShardSizeError
    from scmf_shards.convert.diskspace import OutputGuard

    with pytest.raises(ShardSizeError), OutputGuard(tmp_path, None, 10):
        raise ShardSizeError(f"{tmp_path}: short")
