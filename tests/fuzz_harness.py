"""A seeded fuzzer of dataset directories, for ``tests/test_fuzz.py``.

:func:`make_base` converts a small ``.h5ad`` of raw counts into a dataset (library-size
normalisation recorded, not baked: the manifest says the shards hold raw counts) and gives
every shard the per-gene ``var/nonzero_median`` the ``rank`` output needs.
:func:`mutations` draws, from a seed, structural mutations of manifests and shard arrays;
:func:`apply_case` copies the base, applies one and then recomputes every checksum the
manifest holds (array sizes and sha256, each shard's other-files digest, the vocabulary hash)
so that only the structural checks can find the damage.

Run as a script (``python tests/fuzz_harness.py CASES.json``), it checks each case dir in
this process and prints one JSON line per case: ``scmf-convert verify``'s exit status (the
click command line run in-process) and, per output mode and ``num_workers``, whether the
loader refused the dataset with an :class:`~scmf_loader.errors.ScmfError` (``"refused"``),
yielded only valid batches (``"valid"``), or did something else (``"BAD: ..."``). The test
runs it in a subprocess so that a crash shows as a signal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OUTPUTS = ("csr", "padded", "dense", "rank", "binned")
SHARD_SIZE = 60
N_CELLS = 170
N_GENES_SOURCE = 120


# ---- the base dataset ---------------------------------------------------------------------
def make_base(root: Path) -> Path:
    """Convert a small raw-count ``.h5ad`` into ``root/base`` (3 shards) and give every shard
    a ``var/nonzero_median`` if the converter did not (digests recomputed). Returns the dir."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from scmf_loader.vocab import GeneVocab
    from scmf_shards.convert import convert_h5ad

    rng = np.random.default_rng(7)
    genes = GeneVocab.human_protein_coding().genes[:N_GENES_SOURCE]
    x = sp.random(N_CELLS, len(genes), density=0.15, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 30, k)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], N_CELLS))},
                       index=[f"c{i}" for i in range(N_CELLS)])
    src = root / "src.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(src)
    out = root / "base"
    convert_h5ad([src], out, shard_size=SHARD_SIZE, obs_columns=("cell_type",), vocab="union",
                 preprocessing={"normalize": "library_size", "log1p": True}, quiet=True)
    _add_medians(out)
    recompute(out)
    return out


def _add_medians(ds: Path) -> None:
    import zarr

    manifest = json.loads((ds / "manifest.json").read_text())
    medians = np.linspace(1.0, 5.0, manifest["n_genes"]).astype(np.float32)
    for shard in manifest["shards"]:
        var = zarr.open_group(str(ds / shard["path"] / "var"), mode="r+")
        if "nonzero_median" in var:  # written by the converter
            continue
        var.create_array("nonzero_median", shape=medians.shape, dtype=medians.dtype)[...] = medians
        var["nonzero_median"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        var.attrs["column-order"] = [*var.attrs.get("column-order", []), "nonzero_median"]


# ---- checksums ----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recompute(ds: Path, manifest: dict[str, Any] | None = None) -> None:
    """Rewrite ``ds/manifest.json`` (``manifest`` if given) with every checksum recomputed
    from the files: each array's ``nbytes`` and checksums (``sha256``, ``xxh3_128``), each shard's ``other_files``
    digest, and the vocabulary's content hash and file hash."""
    from scmf_loader.format._common import CHECKSUM_ALGORITHMS, file_checksum
    from scmf_loader.format.shard import other_files_digest
    from scmf_loader.vocab import GeneVocab

    m = manifest if manifest is not None else json.loads((ds / "manifest.json").read_text())
    for shard in m["shards"]:
        base = ds / shard["path"]
        for entry in shard["arrays"].values():
            f = base / entry["path"]
            if f.exists():
                entry["nbytes"] = f.stat().st_size
                for algorithm in CHECKSUM_ALGORITHMS:  # every checksum the entry carries
                    if algorithm in entry:
                        entry[algorithm] = file_checksum(f, algorithm)
        if "other_files" in shard:
            d = other_files_digest(base)
            shard["other_files"] = {"n_files": d.n_files, "nbytes": d.nbytes, "sha256": d.sha256}
    vocab_file = ds / m["vocab"]["path"]
    m["vocab"]["sha256"] = GeneVocab.from_file(vocab_file).sha256()
    m["vocab"]["file_sha256"] = _sha256(vocab_file)
    (ds / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")


# ---- mutations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One mutation: its kind, the shard it hits and a seed for positions and values."""

    kind: str
    shard: int
    seed: int

    @property
    def name(self) -> str:
        """A directory name for the case."""
        return f"{self.kind}-s{self.shard}-{self.seed}"


class _Ctx:
    """What a mutation works on: the case dir, its manifest (as JSON) and a seeded rng."""

    def __init__(self, ds: Path, case: Case) -> None:
        self.ds = ds
        self.m = json.loads((ds / "manifest.json").read_text())
        self.rng = np.random.default_rng(case.seed)
        self.i = case.shard
        self.entry = self.m["shards"][case.shard]
        self.dir = ds / self.entry["path"]

    def file(self, name: str) -> Path:
        return self.dir / self.entry["arrays"][name]["path"]

    def load(self, name: str) -> np.ndarray:
        dtype = {"indptr": np.int64, "indices": np.int32, "data": np.dtype(self.m["dtype"])}[name]
        return np.fromfile(self.file(name), dtype=dtype)

    def save(self, name: str, a: np.ndarray) -> None:
        a.tofile(self.file(name))

    def pos(self, n: int, lo: int = 0) -> int:
        return int(self.rng.integers(lo, n))

    def inner(self) -> int:
        """A position in ``indices`` that is not the first of its row."""
        indptr = self.load("indptr")
        rows = np.flatnonzero(np.diff(indptr) >= 2)
        r = int(rows[self.pos(len(rows))])
        return int(indptr[r]) + self.pos(int(indptr[r + 1] - indptr[r]), 1)


def _set(name: str, value: Callable[[_Ctx, np.ndarray, int], Any], where: str = "any") -> Callable[[_Ctx], None]:
    def mutate(c: _Ctx) -> None:
        a = c.load(name)
        k = {"any": lambda: c.pos(len(a)), "inner": c.inner, "first": lambda: 0,
             "last": lambda: len(a) - 1, "middle": lambda: c.pos(len(a) - 1, 1)}[where]()
        a[k] = value(c, a, k)
        c.save(name, a)
    return mutate


def _bump_boundary(c: _Ctx) -> None:
    """Move one row boundary by one entry (``indptr`` stays monotone: only the row sums or
    the sort order can tell)."""
    indptr = c.load("indptr")
    k = int(np.flatnonzero((np.diff(indptr)[:-1] >= 2) & (np.diff(indptr)[1:] >= 2))[0]) + 1
    indptr[k] += 1 if c.rng.random() < 0.5 else -1
    c.save("indptr", indptr)


def _truncate(name: str) -> Callable[[_Ctx], None]:
    def mutate(c: _Ctx) -> None:
        f = c.file(name)
        f.write_bytes(f.read_bytes()[: -np.dtype(c.load(name).dtype).itemsize])
    return mutate


def _extend(name: str) -> Callable[[_Ctx], None]:
    def mutate(c: _Ctx) -> None:
        a = c.load(name)
        c.save(name, np.concatenate([a, a[-1:]]))
    return mutate


def _drop_last_cell(c: _Ctx) -> None:
    """A consistent CSR of one fewer cell, with the manifest's counts updated to match."""
    indptr = c.load("indptr")
    cut = int(indptr[-2])
    c.save("indptr", indptr[:-1])
    c.save("indices", c.load("indices")[:cut])
    c.save("data", c.load("data")[:cut])
    removed = int(indptr[-1]) - cut
    c.entry["n_cells"] -= 1
    c.entry["nnz"] -= removed
    c.m["n_cells"] -= 1
    c.m["nnz"] -= removed


def _manifest(edit: Callable[[_Ctx], None]) -> Callable[[_Ctx], None]:
    return edit


def _dtype_edit(new: str) -> Callable[[_Ctx], None]:
    def mutate(c: _Ctx) -> None:
        c.m["dtype"] = new
        for shard in c.m["shards"]:
            shard["arrays"]["data"]["dtype"] = new
    return mutate


def _shard_n_cells(c: _Ctx) -> None:
    c.entry["n_cells"] += 1
    c.m["n_cells"] += 1


def _shard_nnz(c: _Ctx) -> None:
    c.entry["nnz"] -= 1
    c.m["nnz"] -= 1


def _vocab_truncate(c: _Ctx) -> None:
    """Drop the vocabulary's last tokens (hash and n_genes updated): stored ids now point
    past its end."""
    vocab = json.loads((c.ds / "vocab.json").read_text())
    drop = max(1, c.pos(30))
    for key in ("tokens", "symbols", "origins"):
        if isinstance(vocab.get(key), list):
            vocab[key] = vocab[key][:-drop]
    (c.ds / "vocab.json").write_text(json.dumps(vocab))
    c.m["n_genes"] -= drop
    if "n_tokens" in c.m["vocab"]:
        c.m["vocab"]["n_tokens"] = c.m["n_genes"]


def _obs_codes(value: Callable[[int], int]) -> Callable[[_Ctx], None]:
    def mutate(c: _Ctx) -> None:
        import zarr

        codes = zarr.open_array(str(c.dir / "obs" / "cell_type" / "codes"), mode="r+")
        n_cats = len(next(col for col in c.m["obs_columns"] if col["name"] == "cell_type")["categories"])
        a = codes[...]
        a[c.pos(len(a))] = value(n_cats)
        codes[...] = a
    return mutate


def _cell_stat(value: Callable[[float], float]) -> Callable[[_Ctx], None]:
    def mutate(c: _Ctx) -> None:
        import zarr

        arr = zarr.open_array(str(c.dir / "obs" / "library_size"), mode="r+")
        a = arr[...]
        k = c.pos(len(a))
        a[k] = value(float(a[k]))
        arr[...] = a
    return mutate


def _zarr_json(rel: str, edit: Callable[[dict[str, Any]], None]) -> Callable[[_Ctx], None]:
    def mutate(c: _Ctx) -> None:
        f = c.dir / rel
        meta = json.loads(f.read_text())
        edit(meta)
        f.write_text(json.dumps(meta))
    return mutate


def _x_shape(meta: dict[str, Any]) -> None:
    meta["attributes"]["shape"] = [meta["attributes"]["shape"][0], meta["attributes"]["shape"][1] + 5]


def _array_shape(meta: dict[str, Any]) -> None:
    meta["shape"] = [meta["shape"][0] - 1]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = meta["shape"]


def _compressed(meta: dict[str, Any]) -> None:
    meta["codecs"] = [*meta["codecs"], {"name": "zstd", "configuration": {"level": 0, "checksum": False}}]


def _wrap(v: int) -> int:
    """``v`` as the int32 its low 32 bits spell (2**32 - 1 -> -1)."""
    return int(np.array(v & 0xFFFFFFFF, dtype=np.uint32).view(np.int32))


MUTATIONS: dict[str, Callable[[_Ctx], None]] = {
    "indptr_huge": _set("indptr", lambda c, a, k: 10**12, "middle"),
    "indptr_negative": _set("indptr", lambda c, a, k: -1, "middle"),
    "indptr_first": _set("indptr", lambda c, a, k: 1, "first"),
    "indptr_last_short": _set("indptr", lambda c, a, k: a[k] - 1, "last"),
    "indptr_last_long": _set("indptr", lambda c, a, k: a[k] + 1, "last"),
    "indptr_decrease": _set("indptr", lambda c, a, k: a[k + 1] + 1, "middle"),
    "indptr_boundary": _bump_boundary,
    "indices_2pow30": _set("indices", lambda c, a, k: 2**30),
    "indices_negative_wrap": _set("indices", lambda c, a, k: _wrap(2**32 - 1 - c.pos(1000))),
    "indices_int32_min": _set("indices", lambda c, a, k: _wrap(2**31)),
    "indices_n_genes": _set("indices", lambda c, a, k: c.m["n_genes"]),
    "indices_special": _set("indices", lambda c, a, k: c.pos(4), "first"),
    "indices_duplicate": _set("indices", lambda c, a, k: a[k - 1], "inner"),
    "indices_decrease": _set("indices", lambda c, a, k: max(a[k - 1] - 1, 4), "inner"),
    "data_nan": _set("data", lambda c, a, k: np.nan),
    "data_inf": _set("data", lambda c, a, k: np.inf),
    "data_neg_inf": _set("data", lambda c, a, k: -np.inf),
    "data_negative": _set("data", lambda c, a, k: -a[k]),
    "data_fraction": _set("data", lambda c, a, k: a[k] + 0.5),
    "data_other_count": _set("data", lambda c, a, k: a[k] + 1),
    "truncate_indptr": _truncate("indptr"),
    "truncate_indices": _truncate("indices"),
    "truncate_data": _truncate("data"),
    "extend_indices": _extend("indices"),
    "drop_last_cell": _drop_last_cell,
    "manifest_n_cells": _manifest(lambda c: c.m.update(n_cells=c.m["n_cells"] + 1)),
    "manifest_nnz": _manifest(lambda c: c.m.update(nnz=c.m["nnz"] - 1)),
    "manifest_n_genes_up": _manifest(lambda c: c.m.update(n_genes=c.m["n_genes"] + 3)),
    "manifest_n_genes_down": _manifest(lambda c: c.m.update(n_genes=c.m["n_genes"] - 3)),
    "manifest_shard_n_cells": _shard_n_cells,
    "manifest_shard_nnz": _shard_nnz,
    "manifest_dtype_int32": _dtype_edit("int32"),
    "manifest_dtype_uint32": _dtype_edit("uint32"),
    "manifest_dtype_float64": _dtype_edit("float64"),
    "vocab_truncate": _vocab_truncate,
    "obs_code_high": _obs_codes(lambda n: n),
    "obs_code_negative": _obs_codes(lambda n: -5),
    "stat_nan": _cell_stat(lambda v: float("nan")),
    "stat_negative": _cell_stat(lambda v: -v - 1),
    "stat_changed": _cell_stat(lambda v: v + 3),
    "zarr_x_shape": _zarr_json("X/zarr.json", _x_shape),
    "zarr_indices_shape": _zarr_json("X/indices/zarr.json", _array_shape),
    "zarr_data_codec": _zarr_json("X/data/zarr.json", _compressed),
}


def _raw_preprocessing(c: _Ctx, **extra: Any) -> None:
    c.m["preprocessing"] = {"normalize": None, "log1p": False, "hvg": None, **extra}


def _negative_allowed(c: _Ctx) -> None:
    """Negative values in data stated as already normalised (no log1p): valid."""
    _set("data", lambda c, a, k: -a[k])(c)
    _raw_preprocessing(c, assume_normalized=True)


def _fraction_allowed(c: _Ctx) -> None:
    """A non-integer value where the manifest does not say raw counts, its cell's library
    size raised to match: valid."""
    import zarr

    data, indptr = c.load("data"), c.load("indptr")
    k = c.pos(len(data))
    data[k] += 0.5
    c.save("data", data)
    lib = zarr.open_array(str(c.dir / "obs" / "library_size"), mode="r+")
    row = int(np.searchsorted(indptr, k, side="right")) - 1
    lib[row] = float(lib[row]) + 0.5
    _raw_preprocessing(c)


#: edits that keep the dataset valid: verify must pass and the loader must read it
CONTROLS: dict[str, Callable[[_Ctx], None]] = {
    "control_none": lambda c: None,
    "control_negative_allowed": _negative_allowed,
    "control_fraction_allowed": _fraction_allowed,
}
MUTATIONS.update(CONTROLS)


def mutations(seed: int, per_kind: int = 1, n_shards: int = 3) -> list[Case]:
    """``per_kind`` cases of every mutation kind, shards and seeds drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [Case(kind, int(rng.integers(n_shards)), int(rng.integers(2**31)))
            for kind in MUTATIONS for _ in range(per_kind)]


def apply_case(base: Path, root: Path, case: Case) -> Path:
    """Copy ``base`` to ``root/<case name>``, apply the mutation, recompute every checksum."""
    ds = root / case.name
    shutil.copytree(base, ds)
    ctx = _Ctx(ds, case)
    MUTATIONS[case.kind](ctx)
    recompute(ds, ctx.m)
    return ds


# ---- checking a case (run in a subprocess) --------------------------------------------------
def run_verify(ds: Path) -> tuple[int, str]:
    """``scmf-convert verify -q DS`` (the click command line, run in-process): its exit
    status and the first line it wrote to stderr."""
    import contextlib
    import io

    from scmf_shards.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["verify", "-q", str(ds)], prog_name="scmf-convert", standalone_mode=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, (err.getvalue().splitlines() or [""])[0]


class InvalidBatch(Exception):
    """A loader output that breaks the batch invariants."""


def _require(ok: Any, message: Callable[[], str]) -> None:
    if not bool(ok):
        raise InvalidBatch(message())


def _check_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_cells: int, n_genes: int) -> None:
    _require(indptr.shape == (n_cells + 1,), lambda: f"indptr shape {indptr.shape} for {n_cells} cells")
    _require(indptr[0] == 0, lambda: f"indptr starts at {indptr[0]}")
    _require((np.diff(indptr) >= 0).all(), lambda: f"indptr decreases: {indptr[:8]}...")
    _require(indptr[-1] == len(indices) == len(values),
             lambda: f"indptr ends at {indptr[-1]}, {len(indices)} indices, {len(values)} values")
    _require(((indices >= 0) & (indices < n_genes)).all(),
             lambda: f"index outside [0, {n_genes}): {indices.min()}..{indices.max()}")


def check_batch(out: Any, mode: str, n_genes: int, categories: dict[str, int]) -> None:
    """Raise :class:`InvalidBatch` unless one loader output is valid: CSR consistent and gene
    ids in range, token outputs' ids in range, obs codes within their categories."""
    if mode == "csr":
        n = len(out.cell_ids)
        _check_csr(out.indptr.numpy(), out.indices.numpy(), out.values.numpy(), n, n_genes)
        obs = out.obs
    else:
        n = len(out["cell_ids"])
        if mode == "dense":
            shape = tuple(out["expression"].shape)
            _require(shape == (n, n_genes), lambda: f"dense shape {shape} for {n} cells")
        else:
            ids = out["gene_indices"].numpy()
            _require(ids.shape[0] == n, lambda: f"gene_indices shape {ids.shape} for {n} cells")
            _require(((ids >= 0) & (ids < n_genes)).all(), lambda: f"gene ids {ids.min()}..{ids.max()}")
        obs = out["obs"]
    for name, codes in obs.items():
        c = codes.numpy()
        if not ((c >= -1) & (c < categories[name])).all():
            raise InvalidBatch(f"obs {name} codes {c.min()}..{c.max()}")


def run_loader(ds: Path, mode: str, num_workers: int) -> str:
    """``"refused: <type>"``, ``"valid"`` or ``"BAD: ..."`` for one mode and worker count."""
    from scmf_loader import CellDataLoader, CellDataset
    from scmf_loader.errors import ScmfError

    try:
        dataset = CellDataset(ds)
        loader = CellDataLoader(dataset, batch_size=32, num_workers=num_workers, drop_last=False,
                                output=mode, persistent_workers=False)
        categories = {k: len(v) for k, v in dataset.categories.items()}
        n = 0
        for out in loader:
            check_batch(out, mode, dataset.n_genes, categories)
            n += len(out.cell_ids) if mode == "csr" else len(out["cell_ids"])
        if n != len(dataset):
            return f"BAD: {n} cells yielded, {len(dataset)} in the dataset"
        return "valid"
    except ScmfError as exc:
        return f"refused: {type(exc).__name__}: {str(exc)[:200]}"
    except InvalidBatch as exc:
        return f"BAD: invalid batch: {exc}"
    except Exception as exc:  # noqa: BLE001 -- the report names anything else
        return f"BAD: {type(exc).__name__}: {exc} | {traceback.format_exc(limit=-3)[-600:]}"


def check_case(ds: Path, runs: list[tuple[str, int]]) -> dict[str, Any]:
    """verify's exit status and the loader's result for each ``(mode, num_workers)``."""
    code, line = run_verify(ds)
    return {"case": ds.name, "verify": code, "verify_error": line,
            "loader": {f"{mode}/{w}": run_loader(ds, mode, w) for mode, w in runs}}


def main(argv: list[str]) -> int:
    """``fuzz_harness.py JOBS.json``: JOBS is ``[[dataset dir, [[mode, workers], ...]], ...]``;
    prints one JSON line per dataset (flushed, so a crash loses only the case it hit)."""
    jobs = json.loads(Path(argv[0]).read_text())
    for ds, runs in jobs:
        print(json.dumps(check_case(Path(ds), [tuple(r) for r in runs])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
