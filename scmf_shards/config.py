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

The keys are the names of :data:`scmf_shards.options.OPTIONS` (and their YAML aliases).
Keys of the seed's data section that belong to the loader (``num_workers``, ``batch_size``,
``max_genes``, ``output: padded`` ...) are ignored with a warning naming the key and the
converter's equivalent where there is one; any other unknown key is an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scmf_loader.errors import ConfigurationError
from scmf_loader.vocab import BUILTIN_VOCABS
from scmf_shards.options import MANIFEST_NAMES, OPTIONS

__all__ = ["ALIASES", "LOADER_KEYS", "LOADER_OUTPUTS", "OPTION_KEYS", "load_config"]

#: YAML key -> option name, for every key that differs from its option's name
ALIASES = {alias: o.name for o in OPTIONS for alias in o.yaml if o.group != "preprocessing"}
#: option names settable at the top level of the data section
OPTION_KEYS = frozenset(o.name for o in OPTIONS if o.group != "preprocessing")
#: keys that belong to the loader (CellDataLoader / CellDataset) -> the converter's equivalent
LOADER_KEYS: dict[str, str | None] = {
    "num_workers": "workers", "batch_size": None, "pin_memory": None, "persistent_workers": None,
    "prefetch_factor": None, "drop_last": None, "max_genes": None, "block_size": None,
    "add_cls": None, "truncation": None, "rank": None, "world_size": None, "timeout": None,
}
#: values of the loader's ``output`` (batch kinds); the converter's ``output`` is a directory
LOADER_OUTPUTS = ("csr", "padded", "dense", "rank", "binned")


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config and return the options it sets, keyed by option name.

    Loader keys are dropped with a :class:`UserWarning` each; unknown keys raise
    :class:`~scmf_loader.errors.ConfigurationError` naming them and the known keys."""
    p = Path(path)
    section = _data_section(p)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in section.items():
        name = ALIASES.get(key, key)
        if _is_loader_key(name, value):
            warnings.warn(_loader_message(p, key, value), UserWarning, stacklevel=2)
        elif name in OPTION_KEYS:
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigurationError(
            f"{p}: unknown key(s) {sorted(unknown)} in the data section; known: "
            f"{sorted(OPTION_KEYS | set(ALIASES))}"
        )
    _check_preprocessing(p, out.get("preprocessing"))
    return _normalise(p.parent, out)


def _data_section(p: Path) -> Mapping[str, Any]:
    import yaml

    if not p.is_file():
        raise ConfigurationError(f"{p}: config file not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{p}: not valid YAML ({exc})") from exc
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigurationError(f"{p}: expected a mapping at the top level")
    section = doc.get("data", doc)
    if not isinstance(section, Mapping):
        raise ConfigurationError(f"{p}: 'data' must be a mapping")
    return section


def _is_loader_key(name: str, value: Any) -> bool:
    return name in LOADER_KEYS or (name == "output" and isinstance(value, str) and value in LOADER_OUTPUTS)


def _loader_message(p: Path, key: str, value: Any) -> str:
    if key == "output":
        return (f"{p}: output: {value} is a loader setting (the batch kind; ignored by the converter); "
                "the converter's output is the dataset directory (--output)")
    equivalent = LOADER_KEYS.get(key)
    tail = f"; the converter's is {equivalent}" if equivalent else ""
    return f"{p}: {key} is a loader setting (ignored by the converter){tail}"


def _check_preprocessing(p: Path, section: Any) -> None:
    """The manifest's record names (``baked``) are not options: say which option is."""
    if isinstance(section, Mapping):
        for option, record in MANIFEST_NAMES.items():
            if record in section:
                raise ConfigurationError(
                    f"{p}: preprocessing key {record!r} is what the manifest records; "
                    f"the option is {option!r}"
                )


def _normalise(base: Path, out: dict[str, Any]) -> dict[str, Any]:
    """Lists from strings; relative paths relative to the config file, as a reader expects."""
    if isinstance(out.get("inputs"), str):
        out["inputs"] = [out["inputs"]]
    if isinstance(out.get("obs_columns"), str):
        out["obs_columns"] = [c.strip() for c in out["obs_columns"].split(",") if c.strip()]
    if "inputs" in out:
        out["inputs"] = [_rel(base, str(x)) for x in out["inputs"]]
    for key in ("output", "uri"):
        if key in out:
            out[key] = _rel(base, str(out[key]))
    if "vocab" in out and out["vocab"] not in ("union", *BUILTIN_VOCABS):
        out["vocab"] = _rel(base, str(out["vocab"]))
    return out


def _rel(base: Path, value: str) -> str:
    if "://" in value or os.path.isabs(value):
        return value
    return str(base / value)
