"""Checking and describing a dataset directory (``scmf-convert verify`` / ``info``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scmf_loader.errors import ManifestError, ManifestNotFoundError
from scmf_loader.format import Manifest, read_manifest
from scmf_loader.format.integrity import iter_problems

__all__ = ["dataset_info", "format_info", "verify_dataset"]


def verify_dataset(
    directory: str | os.PathLike[str], progress: Callable[[int], Any] | None = None
) -> list[str]:
    """Check a dataset directory completely with the one integrity checker
    (:func:`scmf_loader.format.integrity.iter_problems`: the vocabulary hash, every shard's
    files, sha256s and other-files digest, and its full structure). Returns one line per
    problem (at most one per shard; a missing manifest also says what a killed conversion
    left); empty when all holds."""
    d = Path(directory)
    try:
        manifest = read_manifest(d)
    except (ManifestNotFoundError, ManifestError) as exc:
        return [str(exc), *_unfinished(d)]
    return [str(p) for p in iter_problems(d, manifest, level="checksum", structure=True, progress=progress)]


def _unfinished(d: Path) -> list[str]:
    """What a killed conversion left: finished, partial and missing shards (from its plan)."""
    from scmf_shards.convert.workspace import Workspace

    shards = d / "shards"
    ws = Workspace.at(d)
    if not shards.is_dir() and not ws.plan.is_file():
        return []
    names = [p.name for p in shards.iterdir()] if shards.is_dir() else []
    done = sorted(n for n in names if n.endswith(".zarr"))
    partial = sorted(n for n in names if ".zarr.tmp" in n)
    line = (f"{d}: incomplete conversion: {len(done)} finished shard(s), {len(partial)} partial")
    try:
        n_shards = int((ws.read_plan() or {})["n_shards"])
    except (ValueError, KeyError, TypeError):
        n_shards = None
    if n_shards is not None:
        missing = [f"{i:06d}" for i in range(n_shards) if f"{i:06d}.zarr" not in done]
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        line += f" of {n_shards} planned; missing: {shown or 'none (the manifest is not written yet)'}"
    return [line + "; re-run the same scmf-convert command to finish it"]


def dataset_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a dataset directory (reads only the manifest)."""
    m: Manifest = read_manifest(directory)
    sizes = [s.n_cells for s in m.shards]
    return {
        "path": str(directory),
        "dataset_id": m.dataset_id,
        "format_version": m.format_version,
        "n_cells": m.n_cells,
        "n_genes": m.n_genes,
        "nnz": m.nnz,
        "mean_genes_per_cell": (m.nnz / m.n_cells) if m.n_cells else 0.0,
        "dtype": m.dtype,
        "vocab": dict(m.vocab),
        "preprocessing": dict(m.preprocessing),
        "shuffle": dict(m.shuffle),
        "obs_columns": {c.name: len(c.categories) for c in m.obs_columns},
        "sources": [s.to_dict() for s in m.sources],
        "n_shards": len(m.shards),
        "shard_cells": {"min": min(sizes, default=0), "max": max(sizes, default=0)},
        "bytes": sum(a.nbytes for s in m.shards for a in s.arrays.values()),
    }


def _wrapped(label: str, mapping: Any, width: int = 100) -> list[str]:
    """``label`` then ``key=value`` items, wrapped onto indented lines of about ``width``."""
    if not isinstance(mapping, dict) or not mapping:
        return [f"{label}{mapping}"]
    lines: list[list[str]] = [[]]
    used = len(label)
    for k, v in mapping.items():
        item = f"{k}={v!r}"
        if lines[-1] and used + len(item) + 2 > width:
            lines.append([])
            used = len(label)
        lines[-1].append(item)
        used += len(item) + 2
    indent = " " * len(label)
    return [(label if i == 0 else indent) + ", ".join(items) + ("," if i < len(lines) - 1 else "")
            for i, items in enumerate(lines)]


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`dataset_info`."""
    lines = [
        f"dataset   {info['path']}",
        f"id        {info['dataset_id']}  (format v{info['format_version']})",
        f"cells     {info['n_cells']:,}",
        f"genes     {info['n_genes']:,}  (vocabulary {info['vocab'].get('name')}, incl. 4 special tokens)",
        f"nnz       {info['nnz']:,}  ({info['mean_genes_per_cell']:.1f} per cell, {info['dtype']})",
        f"shards    {info['n_shards']}  ({info['shard_cells']['min']:,}–{info['shard_cells']['max']:,} cells each, "
        f"{info['bytes'] / 2**20:,.1f} MiB of CSR arrays)",
        *_wrapped("shuffle   ", info["shuffle"]),
        *_wrapped("preproc   ", info["preprocessing"]),
        *_wrapped("obs       ", info["obs_columns"]),
        "sources:",
    ]
    for s in info["sources"]:
        lines.append(
            f"  {s['path']}: {s['n_cells']:,} cells, {s['genes_matched']:,} genes matched, "
            f"{s['genes_dropped']:,} dropped"
        )
    return "\n".join(lines)
