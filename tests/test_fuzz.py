"""Fuzzing dataset directories (issue 18): mutated shards and manifests, checksums recomputed.

Every mutation of :mod:`tests.fuzz_harness` (``indptr`` entries, indices such as 2**30 and
negatives through int32 wrap-around, special tokens, NaN/inf/negative/fractional values,
truncated or extended arrays, manifest counts and dtypes, the vocabulary, obs codes, per-cell
stats, zarr metadata) is applied to a copy of one small dataset, every checksum the manifest
holds is recomputed, and then, in ONE subprocess per run (so a segfault shows as a signal):

* ``scmf-convert verify`` must exit non-zero;
* the loader must refuse the dataset with an ``ScmfError`` or yield only valid batches
  (``indptr`` consistent, every id inside the vocabulary, obs codes inside their
  categories), in every output mode with ``num_workers=0``, and with ``num_workers=2`` in one
  mode per case (rotating, so every mode meets mutations through workers too);
* no process dies of a signal.

Control edits that keep the dataset valid (negative values stated as normalised data,
fractions where the manifest does not say raw counts) must pass ``verify`` and load in every
mode: the checks are exact, not merely strict. ``SCMF_FUZZ_SEED`` / ``SCMF_FUZZ_PER_KIND``
draw other or more cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fuzz_harness as fh
import pytest

SEED = int(os.environ.get("SCMF_FUZZ_SEED", "20261202"))
PER_KIND = int(os.environ.get("SCMF_FUZZ_PER_KIND", "1"))


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Build the base, apply every case, run the checker in one subprocess; results by case."""
    root = tmp_path_factory.mktemp("fuzz")
    base = fh.make_base(root)
    cases = fh.mutations(SEED, PER_KIND)
    jobs = []
    for i, case in enumerate(cases):
        ds = fh.apply_case(base, root / "cases", case)
        runs = [[mode, 0] for mode in fh.OUTPUTS] + [[fh.OUTPUTS[i % len(fh.OUTPUTS)], 2]]
        jobs.append([str(ds), runs])
    (root / "jobs.json").write_text(json.dumps(jobs))
    harness = Path(__file__).with_name("fuzz_harness.py")
    proc = subprocess.run([sys.executable, str(harness), str(root / "jobs.json")], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)
    results = {r["case"]: r for r in map(json.loads, proc.stdout.splitlines())}
    if proc.returncode != 0:
        done = len(results)
        hit = jobs[done][0] if done < len(jobs) else "after the last case"
        pytest.fail(f"the checker exited with {proc.returncode} (negative: killed by that signal) "
                    f"while checking {hit}\n{proc.stderr[-3000:]}")
    assert len(results) == len(cases), proc.stderr[-3000:]
    return results


def test_the_fuzzer_covers_every_mutation_kind_and_mode(fuzz_results: dict[str, dict]) -> None:
    kinds = {name.split("-s")[0] for name in fuzz_results}
    assert kinds == set(fh.MUTATIONS)
    runs = {run for r in fuzz_results.values() for run in r["loader"]}
    assert runs == {f"{mode}/{w}" for mode in fh.OUTPUTS for w in (0, 2)}


def test_verify_refuses_every_mutation(fuzz_results: dict[str, dict]) -> None:
    accepted = [name for name, r in fuzz_results.items()
                if not name.startswith("control_") and r["verify"] == 0]
    assert not accepted, f"scmf-convert verify exited 0 on mutated datasets: {accepted}"


def test_verify_accepts_the_valid_controls(fuzz_results: dict[str, dict]) -> None:
    controls = {name: r for name, r in fuzz_results.items() if name.startswith("control_")}
    assert len(controls) == len(fh.CONTROLS) * PER_KIND
    assert all(r["verify"] == 0 for r in controls.values()), controls
    for name, r in controls.items():
        assert set(r["loader"].values()) == {"valid"}, (name, r["loader"])


def test_loader_refuses_or_yields_only_valid_batches(fuzz_results: dict[str, dict]) -> None:
    bad = {f"{name} {run}": outcome for name, r in fuzz_results.items()
           for run, outcome in r["loader"].items()
           if not (outcome == "valid" or outcome.startswith("refused: "))}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())


@pytest.mark.parametrize("kind", ["indices_2pow30", "indices_negative_wrap", "indices_int32_min",
                                  "indices_n_genes", "vocab_truncate", "indptr_huge", "indptr_negative"])
def test_out_of_range_structure_never_reaches_a_batch(fuzz_results: dict[str, dict], kind: str) -> None:
    """The issue's cases: the loader refuses them (the first map of the shard checks
    ``indptr`` and the range of every index), whatever the output and worker count."""
    for name, r in fuzz_results.items():
        if name.split("-s")[0] == kind:
            assert all(v.startswith("refused: ") for v in r["loader"].values()), (name, r["loader"])


_ARRAY_OF = {"indptr": "X/indptr", "indices": "X/indices", "data": "X/data", "stat": "obs/library_size",
             "obs": "obs/cell_type/codes"}


def test_verify_names_the_shard_the_array_and_the_first_bad_position(fuzz_results: dict[str, dict]) -> None:
    """A content mutation is reported as ``error: <shard dir>: <array>[<position>] ...``."""
    checked = 0
    for name, r in fuzz_results.items():
        kind, shard = name.split("-s")[0], int(name.split("-s")[1].split("-")[0])
        array = _ARRAY_OF.get(kind.split("_")[0])
        if array is None or kind in ("indptr_last_short", "indptr_last_long", "indptr_boundary", "data_other_count"):
            continue  # statements about a whole array or row (ends at, unsorted row): tested below
        line = r["verify_error"]
        assert line.startswith("error: "), (name, line)
        assert f"shards/{shard:06d}.zarr: " in line, (name, line)
        assert f"{array}[" in line or f"{array} decreases at position" in line, (name, line)
        checked += 1
    assert checked >= 15


def test_verify_messages_of_whole_array_rules(fuzz_results: dict[str, dict]) -> None:
    expect = {"indptr_last_short": "X/indptr ends at", "indptr_last_long": "X/indptr ends at",
              "indptr_decrease": "X/indptr decreases at position", "indices_special": "a special token",
              "indices_duplicate": "not strictly increasing in row", "data_fraction": "the manifest says raw counts",
              "data_other_count": "row sum", "stat_changed": "row sum", "zarr_x_shape": "X/zarr.json says shape"}
    for name, r in fuzz_results.items():
        kind = name.split("-s")[0]
        if kind in expect:
            assert expect[kind] in r["verify_error"], (name, r["verify_error"])
