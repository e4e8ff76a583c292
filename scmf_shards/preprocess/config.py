"""The converter's ``preprocessing:`` configuration: validation into a canonical mapping
(every key with its default; the names come from :mod:`scmf_loader.preprocess.schema`), and
the checks that need the inputs but no data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scmf_loader.align import GeneAlignment
from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.preprocess.pipeline import PreprocessingPipeline
from scmf_loader.preprocess.schema import CONFIG_KEYS, PREPROCESSING_ALIASES

__all__ = [
    "DEFAULT_BAKE",
    "PREPROCESSING_ALIASES",
    "PREPROCESSING_KEYS",
    "allows_negative",
    "check_preprocessing",
    "parse_preprocessing",
    "pipeline_of",
]

#: keys of the ``preprocessing:`` config section (and ConvertOptions.preprocessing); the
#: one list lives in :mod:`scmf_loader.preprocess.schema`
PREPROCESSING_KEYS = CONFIG_KEYS
DEFAULT_BAKE = False
_FLOAT_DTYPES = ("float32", "float64")


# ---- configuration -------------------------------------------------------------------------
def allows_negative(config: Mapping[str, Any] | None) -> bool:
    """Whether a (canonical) preprocessing config lets the input hold negative values: only
    data stated as already normalised (``assume_normalized``) that gets no ``log1p``."""
    return bool(config) and bool(config.get("assume_normalized")) and not config.get("log1p", True)


def parse_preprocessing(config: Mapping[str, Any] | None, dtype: str = "float32") -> dict[str, Any]:
    """Validate a ``preprocessing`` mapping and return its canonical form: every key of
    :data:`PREPROCESSING_KEYS` with defaults filled in (``{}`` stays ``{}``: no
    preprocessing). Raises :class:`ConfigurationError` on any bad value, before any work."""
    if not config:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigurationError(f"preprocessing must be a mapping, got {type(config).__name__}")
    d: dict[str, Any] = {}
    for key, value in config.items():
        name = PREPROCESSING_ALIASES.get(key, key)
        if name not in PREPROCESSING_KEYS:
            raise ConfigurationError(
                f"unknown preprocessing key {key!r}; known: {list(PREPROCESSING_KEYS)}"
            )
        if name in d:
            raise ConfigurationError(f"preprocessing key {name!r} given twice (alias {key!r})")
        d[name] = value
    bake = d.pop("bake", DEFAULT_BAKE)
    if not isinstance(bake, (bool, np.bool_)):
        raise ConfigurationError(f"preprocessing bake must be true or false, got {bake!r}")
    pipe = PreprocessingPipeline(**d)
    out = pipe.to_dict()
    del out["hvg_genes"]
    out["bake"] = bool(bake)
    if out["bake"] and pipe.transforms_values and dtype not in _FLOAT_DTYPES:
        raise ConfigurationError(
            f"baked normalisation/log1p needs a float --dtype, got {dtype!r}; use float32 or "
            "--no-bake (raw counts stored, the loader normalises)"
        )
    return out


def pipeline_of(config: Mapping[str, Any]) -> PreprocessingPipeline:
    """The pipeline of a canonical preprocessing mapping."""
    return PreprocessingPipeline(**{k: v for k, v in config.items() if k != "bake"})


def check_preprocessing(config: Mapping[str, Any], sources: Sequence[Any],
                        alignments: Sequence[GeneAlignment]) -> None:
    """Checks that need the inputs but no data: the batch key exists in every input, and
    there are at least as many genes as HVGs requested."""
    if not config:
        return
    pipe = pipeline_of(config)
    if pipe.hvg_selection is None:
        return
    if pipe.hvg_batch_key is not None:
        for s in sources:
            try:
                s.check_obs_columns([pipe.hvg_batch_key])
            except ScmfError as exc:
                raise ConfigurationError(f"--hvg-batch-key {pipe.hvg_batch_key!r}: {exc}") from None
    n = len(np.unique(np.concatenate([a.vocab_ids for a in alignments])))
    if pipe.hvg_selection > n:
        raise ConfigurationError(
            f"--hvg {pipe.hvg_selection} asks for more highly variable genes than the inputs "
            f"have in the vocabulary ({n})"
        )
