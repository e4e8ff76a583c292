"""Shared pytest fixtures. Add fixtures here; keep existing ones stable (other tests use them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

HPC_GENES: list[str] | None = None


def hpc_genes() -> list[str]:
    """Gene tokens (Ensembl ids) of the shipped human protein-coding vocabulary."""
    global HPC_GENES
    if HPC_GENES is None:
        from scmf_loader.vocab import GeneVocab

        HPC_GENES = GeneVocab.human_protein_coding().genes
    return HPC_GENES


def write_counts_h5ad(
    path: Path,
    n_cells: int,
    genes: Sequence[str],
    *,
    layout: str = "csr",
    seed: int = 0,
    density: float = 0.1,
    obs: dict[str, Sequence[str]] | None = None,
    dtype: str = "float32",
    cell_prefix: str | None = None,
) -> Path:
    """Write an .h5ad of random integer counts with the given genes and matrix layout
    (``csr``, ``csc`` or ``dense``); obs gets ``cell_type`` and ``batch`` unless given."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = sp.random(
        n_cells, len(genes), density=density, format="csr", random_state=rng,
        data_rvs=lambda k: rng.integers(1, 30, k),
    ).astype(dtype)
    if obs is None:
        obs = {
            "cell_type": rng.choice(["T cell", "B cell", "NK cell", "monocyte"], n_cells).tolist(),
            "batch": rng.choice(["b1", "b2", "b3"], n_cells).tolist(),
        }
    prefix = cell_prefix if cell_prefix is not None else path.stem
    frame = pd.DataFrame(
        {k: pd.Categorical(v) for k, v in obs.items()},
        index=[f"{prefix}-cell{i}" for i in range(n_cells)],
    )
    matrix = {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[layout]
    ad.AnnData(X=matrix, obs=frame, var=pd.DataFrame(index=list(genes))).write_h5ad(path)
    return path


@pytest.fixture
def make_h5ad(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_h5ad(name, n_cells, genes, layout=..., seed=...) -> Path``."""

    def factory(name: str, n_cells: int, genes: Sequence[str], **kwargs: object) -> Path:
        return write_counts_h5ad(tmp_path / name, n_cells, genes, **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def three_sources(make_h5ad: Callable[..., Path]) -> list[Path]:
    """Three inputs with different gene orders and layouts (CSR, CSC, dense) and genes outside
    the human protein-coding vocabulary."""
    genes = hpc_genes()
    a = make_h5ad("a.h5ad", 700, genes[:400], layout="csr", seed=1)
    b = make_h5ad(
        "b.h5ad", 450, [*reversed(genes[200:500]), "NOT_A_GENE_1", "NOT_A_GENE_2"], layout="csc", seed=2
    )
    c = make_h5ad("c.h5ad", 300, [f"{g}.7" for g in genes[::50][:300]], layout="dense", seed=3)
    return [a, b, c]


# ---- loader fixtures (tests/test_store.py, test_dataset.py, test_dataloader.py, ...) ----------
LOADER_CELLS = (900, 537)  # two sources; shards of 200 cells leave uneven tails


@pytest.fixture(scope="session")
def loader_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small .h5ad inputs (CSR and CSC, overlapping genes in different orders)."""
    d = tmp_path_factory.mktemp("loader_src")
    genes = hpc_genes()
    a = write_counts_h5ad(d / "la.h5ad", LOADER_CELLS[0], genes[:300], seed=11, density=0.08)
    b = write_counts_h5ad(
        d / "lb.h5ad", LOADER_CELLS[1], list(reversed(genes[150:420])), layout="csc", seed=12, density=0.08
    )
    return [a, b]


@pytest.fixture(scope="session")
def loader_dataset(loader_sources: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two loader sources converted into a dataset directory of 8 shards."""
    from scmf_shards.convert import convert_h5ad

    out = tmp_path_factory.mktemp("loader_ds") / "ds"
    convert_h5ad(
        loader_sources, out, shard_size=200, chunk_size=256, obs_columns=("cell_type", "batch"),
        vocab="union", quiet=True,
    )
    return out


@pytest.fixture(scope="session")
def loader_reference(loader_sources: list[Path], loader_dataset: Path) -> dict[str, np.ndarray]:
    """Every source cell as a dense row over the dataset's vocabulary, read with anndata
    (independent of the loader), keyed by original cell id."""
    import anndata as ad

    from scmf_loader.vocab import GeneVocab

    vocab = GeneVocab.from_file(loader_dataset / "vocab.json")
    out: dict[str, np.ndarray] = {}
    for p in loader_sources:
        a = ad.read_h5ad(p)
        dense = np.zeros((a.n_obs, len(vocab)), dtype=np.float32)
        dense[:, vocab.encode(a.var_names)] = np.asarray(a.X.toarray(), dtype=np.float32)
        out.update(zip(a.obs_names, dense, strict=True))
    return out


# ---- a real dask.distributed cluster on loopback (tests/test_distributed.py) --------------
def _dask_command() -> list[str]:
    """The ``dask`` CLI of this interpreter's environment (``python -m dask`` as a fallback)."""
    import shutil
    import sys

    exe = Path(sys.executable).parent / "dask"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("dask")
    return [found] if found else [sys.executable, "-m", "dask"]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def dask_scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Address of a real ``dask scheduler`` with two ``dask worker`` processes (one thread
    each), started as subprocesses on 127.0.0.1 and stopped at the end of the session."""
    import subprocess

    from distributed import Client

    work = tmp_path_factory.mktemp("dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = _dask_command()
    log = open(work / "cluster.log", "wb")  # noqa: SIM115 (closed in the finally below)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work,
        ))
        procs.append(subprocess.Popen(
            [*dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
             "--host", "127.0.0.1", "--local-directory", str(work / "workers"), "--death-timeout", "60"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work,
        ))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
