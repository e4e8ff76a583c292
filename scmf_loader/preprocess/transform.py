"""The per-value arithmetic of preprocessing (numpy; torch only when given tensors).

Shared by :class:`~scmf_loader.preprocess.pipeline.PreprocessingPipeline` (in memory and per
loader batch) and the converter (per read chunk, when preprocessing is baked), so all paths
give the same numbers: values are computed in float64 when the input is float64 and in
float32 otherwise; a cell's divisor is ``float32(library_size) / float32(target_sum)`` (or its
scran size factor), a divisor of zero becomes one (an empty cell stays zero), then
``values / divisor`` and ``numpy.log1p``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported only when a tensor is actually processed, so the
    import torch  # converter's workers (which import this module) never load it.

from scmf_loader.errors import ConfigurationError, InvalidInputError
from scmf_loader.preprocess.schema import NORMALIZE_METHODS

__all__ = ["cell_divisors", "check_counts", "compute_dtype", "is_tensor", "torch_transform",
           "transform_values"]


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype normalised values are computed in: float64 for float64 input, else float32
    (scanpy converts integer counts to float32)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def cell_divisors(
    stat: np.ndarray, *, normalize: str, target_sum: float | None, dtype: Any
) -> np.ndarray:
    """Per-cell divisors in the compute dtype of ``dtype``: ``library_size / target_sum`` for
    ``"library_size"``, the size factor itself for ``"scran"``; zeros become one."""
    dt = compute_dtype(dtype)
    s = np.asarray(stat, dtype=np.float64).astype(dt)
    if normalize == "library_size":
        s = s / dt.type(target_sum)
    elif normalize != "scran":
        raise ConfigurationError(f"normalize must be one of {NORMALIZE_METHODS}, got {normalize!r}")
    return s + (s == 0)


def transform_values(
    values: np.ndarray, indptr: np.ndarray | None, divisors: np.ndarray | None, log1p: bool,
    dtype: Any = None,
) -> np.ndarray:
    """Normalise and log-transform the non-zeros of a CSR matrix (a new array).

    ``values``: the non-zeros; ``indptr``: row pointers (``len(divisors) + 1``); ``divisors``:
    one per row from :func:`cell_divisors` (None: no normalisation). ``dtype``: the compute
    dtype (default: that of ``divisors``, else from ``values``).
    """
    dt = np.dtype(dtype) if dtype is not None else (
        divisors.dtype if divisors is not None else compute_dtype(values.dtype)
    )
    out = np.array(values, dtype=dt, copy=True)
    if divisors is not None:
        if indptr is None:
            raise InvalidInputError("transform_values: indptr is required with divisors")
        lengths = np.diff(np.asarray(indptr))
        np.divide(out, np.repeat(divisors.astype(dt, copy=False), lengths), out=out)
    if log1p:
        np.log1p(out, out=out)
    return out


def check_counts(values: np.ndarray, where: str) -> None:
    """Raise :class:`InvalidInputError` unless ``values`` are non-negative integers."""
    v = np.asarray(values)
    if v.size == 0:
        return
    if v.dtype.kind == "f":
        if not np.isfinite(v).all():
            raise InvalidInputError(f"{where} hold NaN or infinite values")
        frac = v != np.floor(v)
        if frac.any():
            example = v[frac][0]
            raise InvalidInputError(
                f"{where} hold non-integer values (e.g. {float(example)!r}), which are not raw "
                "counts; normalising them again is wrong. If the data is already normalised, "
                "pass --assume-normalized (assume_normalized=True), or use --normalize none"
            )
    if v.dtype.kind in "if" and v.min() < 0:
        raise InvalidInputError(
            f"{where} hold negative values (min {v.min()!r}), which are not raw counts; if the "
            "data is already normalised, pass --assume-normalized or use --normalize none"
        )


def is_tensor(x: Any) -> bool:
    """True for a torch tensor, without importing torch (if torch is not loaded, x is none)."""
    torch_mod = sys.modules.get("torch")
    return torch_mod is not None and isinstance(x, torch_mod.Tensor)


def torch_transform(
    values: torch.Tensor, indptr: torch.Tensor, divisors: np.ndarray | None, log1p: bool,
    dtype: np.dtype,
) -> torch.Tensor:
    """:func:`transform_values` in torch, on the tensor's own device (a new tensor)."""
    import torch

    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    out = values.to(tdtype).clone()
    if divisors is not None:
        lengths = (indptr[1:] - indptr[:-1]).to(values.device)
        div = torch.as_tensor(divisors, device=values.device).to(tdtype)
        out = out / torch.repeat_interleave(div, lengths)
    if log1p:
        out = torch.log1p(out)
    return out
