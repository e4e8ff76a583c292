"""Faults: conversions killed with SIGKILL at many points and re-run end byte-identical to an
uninterrupted run, reusing the shards that verify; killed runs leave no manifest and
``verify`` says so; a second conversion into the same output refuses (the lock); a shard
corrupted after its record was written is redone, not reused.

Kill points come from the converter's crash hook (``SCMF_FAULT_AFTER=N``: SIGKILL at the
N-th file operation of the process, see ``scmf_shards.faults``): every kind of point is hit
at least once, plus random ones drawn from a seed that changes per run (``SCMF_FAULT_SEED``
replays one; a failure names it), on both paths of a conversion: one pass (the default here:
the data fits the memory limit; chunks held in memory, ``scatter:held``) and two stages
(``--memory-limit 1KB``: chunks written to scratch buckets, ``scatter:*``). Both end in the
same bytes. One test also kills a two-thread run at a random time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hpc_genes, write_counts_h5ad
from fault_harness import ForkServer

from scmf_loader.errors import DatasetLockedError, ScmfError
from scmf_shards import faults
from scmf_shards.cli import main
from scmf_shards.convert import convert_h5ad, output
from scmf_shards.convert.workspace import Workspace

OPTS = ["--shard-size", "500", "--chunk-size", "256", "--obs-columns", "cell_type", "--seed", "3", "--quiet"]
N_SHARDS = 3
N_CHUNKS = 7
#: extra arguments of each path: one pass (default: fits the memory limit), two stages
PATHS = {"one-pass": [], "two-stage": ["--memory-limit", "1KB"]}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _args(sources: list[Path], out: Path) -> list[str]:
    return ["h5ad", *map(str, sources), "--output", str(out), *OPTS]


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three inputs (CSR, CSC, dense; 1,450 cells): 7 read chunks, 3 shards."""
    d = tmp_path_factory.mktemp("fault_src")
    genes = hpc_genes()
    return [
        write_counts_h5ad(d / "a.h5ad", 700, genes[:400], seed=1),
        write_counts_h5ad(d / "b.h5ad", 450, [*reversed(genes[200:500]), "NOT_A_GENE"], layout="csc", seed=2),
        write_counts_h5ad(d / "c.h5ad", 300, genes[::50][:300], layout="dense", seed=3),
    ]


def _labelled_run(args: list[str]) -> list[str]:
    """Run the CLI in this process; the labels of its fault points in order (the same
    sequence a single-process CLI run goes through)."""
    labels: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(faults.FAULT_ENV, raising=False)
        mp.setattr(faults, "fault_point", labels.append)
        code, text = _cli(args)
    assert code == 0, text
    return labels


@pytest.fixture(scope="module")
def references(sources: list[Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, tuple[dict[str, bytes], list[str]]]:
    """An uninterrupted run per path: its files and its fault-point labels."""
    out = {}
    for path, extra in PATHS.items():
        ds = tmp_path_factory.mktemp("fault_ref") / "ds"
        labels = _labelled_run([*_args(sources, ds), *extra])
        out[path] = (tree_bytes(ds), labels)
    return out


@pytest.fixture(scope="module")
def reference(references: dict[str, tuple[dict[str, bytes], list[str]]]) -> tuple[dict[str, bytes], list[str]]:
    """The default (one-pass) run's files and labels."""
    return references["one-pass"]


def test_one_pass_and_two_stage_write_the_same_bytes(
    references: dict[str, tuple[dict[str, bytes], list[str]]]
) -> None:
    (one, one_labels), (two, two_labels) = references["one-pass"], references["two-stage"]
    assert one == two  # same shards, same manifest (dataset_id), byte for byte
    assert one_labels.count("scatter:held") == N_CHUNKS
    assert "scatter:renamed" not in one_labels
    assert two_labels.count("scatter:renamed") == N_CHUNKS
    assert "scatter:held" not in two_labels


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    """Forks ``scmf-convert`` runs from one pre-imported process (see fault_harness)."""
    with ForkServer() as s:
        yield s


def _csr_mtimes(out: Path) -> dict[str, int]:
    """mtime_ns of the CSR files of every shard that has a completion record."""
    records = Workspace.at(out).records
    found = {}
    for rec in sorted(records.glob("*.json")) if records.is_dir() else []:
        shard = out / "shards" / f"{rec.stem}.zarr"
        for f in sorted(shard.glob("X/*/c/0")):
            found[str(f.relative_to(out))] = f.stat().st_mtime_ns
    return found


def _kill_points(labels: list[str], n_random: int) -> tuple[list[int], int]:
    """One random occurrence of every kind of point, plus ``n_random`` more, from a seed that
    differs per run unless ``SCMF_FAULT_SEED`` fixes it. Returns (1-based points, seed)."""
    seed = int(os.environ.get("SCMF_FAULT_SEED", np.random.SeedSequence().entropy % 2**32))
    rng = np.random.default_rng(seed)
    points = {int(rng.choice([i + 1 for i, x in enumerate(labels) if x == kind])) for kind in set(labels)}
    rest = [i for i in range(1, len(labels) + 1) if i not in points]
    points.update(int(x) for x in rng.choice(rest, size=min(n_random, len(rest)), replace=False))
    return sorted(points), seed


def _kill_and_rerun(args: list[str], out: Path, log: Path, point: int, label: str,
                    expected: dict[str, bytes], server: ForkServer, seed: int) -> int:
    """Kill a run at ``point``, check what it left, re-run; returns the shards reused."""
    where = f"point {point} ({label}), SCMF_FAULT_SEED={seed}"
    status = server.run(args, log, fault=str(point))
    assert status == -signal.SIGKILL, f"{where}: {status}"
    if label == "driver:manifest":  # killed after the manifest: a complete dataset
        assert (out / "manifest.json").is_file()
    else:  # never mistaken for a dataset; verify says what is missing
        assert not (out / "manifest.json").exists(), where
        code, text = _cli(["verify", str(out), "--quiet"])
        assert code == 1, where
        assert "no manifest" in text
        assert "not a complete scmf dataset" in text
        if (Workspace.at(out).plan).is_file():
            assert "incomplete conversion" in text, where
            assert "planned; missing:" in text, where
    before = _csr_mtimes(out)
    code, text = _cli(args)  # the same command again
    assert code == 0, f"rerun after {where}: {text}"
    assert tree_bytes(out) == expected, where
    for f, mtime in before.items():  # completed shards that verify are reused, not rewritten
        assert (out / f).stat().st_mtime_ns == mtime, f"{where}: {f}"
    return len(before) // 3


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(PATHS))
def test_sigkill_at_every_kind_of_point_and_10_random_ones_then_rerun_is_byte_identical(
    path: str, sources: list[Path], tmp_path: Path,
    references: dict[str, tuple[dict[str, bytes], list[str]]], server: ForkServer
) -> None:
    expected, labels = references[path]
    per_chunk = {"one-pass": ["scatter:held"], "two-stage": ["scatter:partial", "scatter:written", "scatter:renamed"]}
    assert all(labels.count(x) == N_CHUNKS for x in per_chunk[path])
    per_shard = ["shard:X", "shard:complete", "gather:shard", "gather:record-tmp", "gather:record"]
    assert all(labels.count(x) == N_SHARDS for x in per_shard)
    assert labels[:2] == ["driver:plan", "driver:vocab"]
    assert labels[-1] == "driver:manifest"
    scatter_point = "scatter:held" if path == "one-pass" else "scatter:renamed"
    assert {"shard:X", "shard:complete", "driver:manifest-tmp", scatter_point} <= set(labels)
    points, seed = _kill_points(labels, n_random=10)
    assert len(points) >= 10 + len(set(labels))
    reused = 0
    for p in points:
        out = tmp_path / f"kill{p:03d}"
        reused += _kill_and_rerun([*_args(sources, out), *PATHS[path]], out, tmp_path / f"kill{p:03d}.log",
                                  p, labels[p - 1], expected, server, seed)
    assert reused >= 3


@pytest.mark.slow
def test_sigkill_during_preprocessing_stats_then_rerun_is_byte_identical(
    sources: list[Path], tmp_path: Path, server: ForkServer
) -> None:
    """With HVG selection on, the stats passes write files too: kill among them."""
    hvg = ["--hvg", "40", "--hvg-flavor", "seurat_v3"]
    labels: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(faults.FAULT_ENV, raising=False)
        mp.setattr(faults, "fault_point", labels.append)
        ref = tmp_path / "ref"
        code, text = _cli([*_args(sources, ref), *hvg])
    assert code == 0, text
    expected = tree_bytes(ref)
    stats = [i + 1 for i, x in enumerate(labels) if x.startswith("stats:")]
    assert len(stats) >= 2 * 7  # every chunk of every stats stage saves one file
    seed = int(os.environ.get("SCMF_FAULT_SEED", np.random.SeedSequence().entropy % 2**32))
    rng = np.random.default_rng(seed)
    for p in sorted(int(x) for x in rng.choice(stats, size=4, replace=False)):
        out = tmp_path / f"kill{p:03d}"
        _kill_and_rerun([*_args(sources, out), *hvg], out, tmp_path / f"kill{p:03d}.log", p,
                        labels[p - 1], expected, server, seed)


@pytest.mark.slow
def test_repeated_kills_make_progress_and_finish(
    sources: list[Path], tmp_path: Path, reference: tuple[dict[str, bytes], list[str]], server: ForkServer
) -> None:
    """Kill every run at its 9th file operation: each run keeps what the previous ones did."""
    expected, labels = reference
    out = tmp_path / "ds"
    kills = 0
    for _ in range(len(labels)):
        status = server.run(_args(sources, out), tmp_path / "run.log", fault="9")
        if status == 0:
            break
        assert status == -signal.SIGKILL, (tmp_path / "run.log").read_text()
        kills += 1
    assert kills >= 3
    assert tree_bytes(out) == expected


@pytest.mark.slow
def test_random_time_kill_of_a_two_worker_cli_run(
    sources: list[Path], tmp_path: Path, reference: tuple[dict[str, bytes], list[str]]
) -> None:
    """SIGKILL a ``scmf-convert --workers 2`` process (two task threads) after a random
    delay; nothing outlives it, and the same command finishes the job."""
    expected, _ = reference
    seed = int(os.environ.get("SCMF_FAULT_SEED", np.random.SeedSequence().entropy % 2**32))
    rng = np.random.default_rng(seed)
    delay = float(rng.uniform(0.0, 1.0))
    for attempt in range(6):  # a run that finished before the kill is retried, sooner
        out = tmp_path / f"ds{attempt}"
        status = _kill_after(_args(sources, out), out, delay)
        if status == -signal.SIGKILL:
            break
        assert status == 0
        delay /= 3
    else:
        pytest.fail(f"every run finished before its kill (SCMF_FAULT_SEED={seed})")
    if (out / "manifest.json").exists():  # killed after its last write: it must be complete
        assert _cli(["verify", str(out), "--quiet"])[0] == 0, f"killed after {delay:.3f} s (seed {seed})"
    else:
        assert _cli(["verify", str(out), "--quiet"])[0] == 1
    code, text = _cli(_args(sources, out))
    assert code == 0, text
    assert tree_bytes(out) == expected


def _kill_after(args: list[str], out: Path, delay: float) -> int:
    """Start ``scmf-convert ... --workers 2`` and SIGKILL it ``delay`` s after its plan is
    written; returns its exit status (``-SIGKILL`` when the kill came first)."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != faults.FAULT_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "scmf_shards.cli", *args, "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (Workspace.at(out).plan).exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(delay)
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"worker processes outlived their killed driver: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def _label_index(labels: list[str], label: str, last: bool = False) -> int:
    hits = [i + 1 for i, x in enumerate(labels) if x == label]
    return hits[-1] if last else hits[0]


def test_corrupted_shard_is_redone_not_reused(
    sources: list[Path], tmp_path: Path, reference: tuple[dict[str, bytes], list[str]], server: ForkServer
) -> None:
    expected, labels = reference
    out = tmp_path / "ds"
    fault = str(_label_index(labels, "gather:record", last=True))
    assert server.run(_args(sources, out), tmp_path / "log", fault=fault) == -signal.SIGKILL
    before = _csr_mtimes(out)
    assert len(before) == N_SHARDS * 3  # every shard has its record
    bad = out / "shards" / "000001.zarr" / "X" / "data" / "c" / "0"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # same size: only the checksum tells
    bad.write_bytes(bytes(raw))
    os.utime(bad, ns=(before[str(bad.relative_to(out))],) * 2)  # and the same mtime
    (out / "shards" / "000002.zarr" / "X" / "indices" / "c" / "0").unlink()
    code, text = _cli(_args(sources, out))
    assert code == 0, text
    assert tree_bytes(out) == expected
    after = {f: (out / f).stat().st_mtime_ns for f in before}
    redone = {f.split("/")[1] for f in before if after[f] != before[f]}
    assert redone == {"000001.zarr", "000002.zarr"}


def test_second_conversion_into_the_same_output_refuses(
    sources: list[Path], tmp_path: Path, reference: tuple[dict[str, bytes], list[str]], server: ForkServer
) -> None:
    """Hold a first conversion mid-way (SIGSTOP at its first shard) while a second process
    starts one into the same directory: it refuses, with a clear error, and writes nothing."""
    expected, labels = reference
    out = tmp_path / "ds"
    first = server.start(_args(sources, out), tmp_path / "first.log",
                         fault=f"{_label_index(labels, 'gather:shard')}:STOP")
    try:
        deadline = time.monotonic() + 120
        while _state(first) != "T":
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        snapshot = tree_bytes(out)
        assert server.run(_args(sources, out), tmp_path / "second.log") == 1
        err = (tmp_path / "second.log").read_text()
        assert "another conversion is writing to this directory" in err
        assert str(out) in err
        with pytest.raises(DatasetLockedError, match="lock .scmf-lock held"):
            convert_h5ad(sources, out, seed=99, overwrite=True, quiet=True)
        assert tree_bytes(out) == snapshot  # nothing interleaved
    finally:
        os.kill(first, signal.SIGCONT)
        status = server.wait(first)
    assert status == 0, (tmp_path / "first.log").read_text()
    assert tree_bytes(out) == expected


def _state(pid: int) -> str:
    """Process state letter from /proc (``T`` = stopped, ``Z`` = exited)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    state = stat[stat.rindex(")") + 2]
    assert state != "Z", f"process {pid} exited early"
    return state


def test_file_system_without_flock_is_a_clear_error(
    sources: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(output.fcntl, "flock", no_flock)
    with pytest.raises(ScmfError, match=r"cannot lock \.scmf-lock \(Function not implemented\)"):
        convert_h5ad(sources[:1], tmp_path / "ds", quiet=True)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_scratch_without_a_plan_is_discarded(
    sources: list[Path], tmp_path: Path, reference: tuple[dict[str, bytes], list[str]]
) -> None:
    """Killed between creating ``.scmf-tmp`` and writing its plan: nothing to resume, and
    nothing that could belong to another dataset; the re-run starts afresh."""
    expected, _ = reference
    out = tmp_path / "ds"
    Workspace.at(out).root.mkdir(parents=True)
    (Workspace.at(out).root / "plan.json.tmp").write_text('{"dataset_id": "sha256:0')
    code, text = _cli(_args(sources, out))
    assert code == 0, text
    assert tree_bytes(out) == expected


def test_scratch_dir_buckets_resume_and_are_removed(
    sources: list[Path], tmp_path: Path, references: dict[str, tuple[dict[str, bytes], list[str]]],
    server: ForkServer
) -> None:
    """``--scratch-dir`` moves the buckets elsewhere: same bytes, a killed run resumes from
    the buckets it finished there, and they are deleted once the manifest is written."""
    expected, labels = references["two-stage"]  # buckets: the two-stage path
    out, scratch = tmp_path / "ds", tmp_path / "scratch"
    args = [*_args(sources, out), *PATHS["two-stage"], "--scratch-dir", str(scratch)]
    fault = str(_label_index(labels, "gather:shard"))
    assert server.run(args, tmp_path / "log", fault=fault) == -signal.SIGKILL
    buckets = list(scratch.glob("scmf-buckets-*"))
    assert len(buckets) == 1
    assert len(list(buckets[0].glob("c*"))) == N_CHUNKS  # every chunk scattered before the first gather
    assert not (Workspace.at(out).root / "buckets").exists()
    code, text = _cli(args)
    assert code == 0, text
    assert tree_bytes(out) == expected  # the scratch location is not part of the dataset
    assert list(scratch.iterdir()) == []
