"""The YAML ``data:`` section of the seed config, mapped 1:1 onto conversion options.

Example (``scmf-convert h5ad --config data.yaml``)::

    data:
      source: local
      paths: [./data/dataset1.h5ad, ./data/dataset2.h5ad]
      output: ./shards/my_dataset
      gene_vocab: human_protein_coding   # or union, or a vocabulary file
      obs_columns: [cell_type, batch]
      shard_size: 50000
      seed: 0
      preprocessing: {normalize: library_size, target_sum: 10000, log1p: true}

Keys the converter does not use but the loader does (``max_genes``, ``num_workers``,
``batch_size``, ...) are accepted and ignored here; any other unknown key is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scmf_loader.errors import ScmfError

__all__ = ["LOADER_KEYS", "load_config"]

#: config key -> option name (identity when not listed)
ALIASES = {"gene_vocab": "vocab", "paths": "inputs", "num_shards_workers": "workers"}
OPTION_KEYS = {
    "inputs", "output", "vocab", "gene_column", "matrix", "obs_columns", "shard_size",
    "chunk_size", "shuffle", "seed", "dtype", "workers", "scheduler", "scratch_dir", "overwrite", "quiet",
    "preprocessing", "source",
}
#: keys that belong to other parts of the seed's data section (loader, census)
LOADER_KEYS = {"max_genes", "num_workers", "batch_size", "pin_memory", "drop_last", "block_size"}
CENSUS_KEYS = {"organism", "filters", "census_version", "uri", "obs_filter", "var_filter"}


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config and return the options it sets, keyed by option name."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ScmfError(f"{p}: config file not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ScmfError(f"{p}: not valid YAML ({exc})") from exc
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ScmfError(f"{p}: expected a mapping at the top level")
    section = doc.get("data", doc)
    if not isinstance(section, Mapping):
        raise ScmfError(f"{p}: 'data' must be a mapping")
    out: dict[str, Any] = {}
    unknown = []
    for key, value in section.items():
        name = ALIASES.get(key, key)
        if name in LOADER_KEYS:
            continue
        if name not in OPTION_KEYS and name not in CENSUS_KEYS:
            unknown.append(key)
            continue
        out[name] = value
    if unknown:
        raise ScmfError(
            f"{p}: unknown key(s) {sorted(unknown)} in the data section; known: "
            f"{sorted(OPTION_KEYS | CENSUS_KEYS | LOADER_KEYS | set(ALIASES))}"
        )
    if isinstance(out.get("inputs"), str):
        out["inputs"] = [out["inputs"]]
    if isinstance(out.get("obs_columns"), str):
        out["obs_columns"] = [c.strip() for c in out["obs_columns"].split(",") if c.strip()]
    # Relative input/output paths are relative to the config file, as a user reading it expects.
    base = p.parent
    if "inputs" in out:
        out["inputs"] = [_rel(base, str(x)) for x in out["inputs"]]
    if "output" in out:
        out["output"] = _rel(base, str(out["output"]))
    if "vocab" in out and out["vocab"] not in ("human_protein_coding", "union"):
        out["vocab"] = _rel(base, str(out["vocab"]))
    return out


def _rel(base: Path, value: str) -> str:
    if "://" in value or os.path.isabs(value):
        return value
    return str(base / value)
