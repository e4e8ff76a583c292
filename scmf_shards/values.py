"""Checks of input values against what a conversion will store (numpy, and one compiled
pass for the range: :func:`scmf_shards.kernels.value_stats`).

Nothing is silently coerced: NaN/inf, negative values (unless the user states the data is
already normalised and asks for no log1p), values a chosen integer ``--dtype`` cannot hold
exactly (fractions, out of range), values beyond a float ``--dtype``'s range and counts
(integer values, from integer or float inputs) a float ``--dtype`` cannot represent exactly
are each one clear error naming the rows and the file.
"""

from __future__ import annotations

import numpy as np

from scmf_loader.errors import InvalidInputError
from scmf_shards.kernels import value_stats

__all__ = ["check_values"]


def _exact_integer_limit(dtype: np.dtype) -> int:
    """Largest integer up to which every integer is exactly representable in float ``dtype``."""
    return 2 ** (np.finfo(dtype).nmant + 1)


def check_values(data: np.ndarray, target: str | np.dtype, where: str, allow_negative: bool = False) -> bool:
    """Raise :class:`InvalidInputError` (message starting with ``where``) if ``data`` (the
    stored values of some rows, source dtype) cannot be converted to ``target`` faithfully.
    Returns whether every value is a whole count in ``[0, 65535]`` (from the same pass): what
    a conversion may hold as ``uint16`` between its stages (``scatter.held_dtypes``)."""
    target = np.dtype(target)
    if data.size == 0:
        return True
    is_float = data.dtype.kind == "f"
    finite, whole, lo, hi = value_stats(data)  # one compiled pass
    if not finite:
        raise InvalidInputError(f"{where} hold NaN or infinite values")
    lo, hi = data.dtype.type(lo).item(), data.dtype.type(hi).item()  # Python scalars: exact comparisons
    if lo < 0 and not allow_negative:
        raise InvalidInputError(
            f"{where} hold negative values (min {lo}); raw counts cannot be negative. For data "
            "that is already normalised (e.g. scaled), pass --assume-normalized --no-log1p"
        )
    if target.kind in "iu":
        if is_float:
            frac = data != np.trunc(data)
            if frac.any():
                raise InvalidInputError(
                    f"{where} hold non-integer values (e.g. {float(data[frac][0])!r}) that "
                    f"--dtype {target} would truncate; use a float --dtype"
                )
        info = np.iinfo(target)
        if hi > info.max or lo < info.min:
            raise InvalidInputError(
                f"{where} hold values in [{lo}, {hi}], outside the range of --dtype {target} "
                f"[{info.min}, {info.max}]; choose a wider --dtype"
            )
    elif target.kind == "f":
        largest = max(-lo, hi)
        _check_float_target(data, target, where, largest)
    return whole and lo >= 0 and hi <= np.iinfo(np.uint16).max


def _check_float_target(data: np.ndarray, target: np.dtype, where: str, largest: float | int) -> None:
    """Refuse values outside ``target``'s range and counts (integers, whatever the source
    dtype) that ``target`` cannot store exactly: ``16777217`` in float64 would become
    ``16777216`` in float32. Non-integral values of float inputs (normalised data) are
    rounded to the target's precision as usual."""
    if target.itemsize >= data.dtype.itemsize and data.dtype.kind == "f":
        return  # a float input into an as-wide float: every value is kept
    if largest > float(np.finfo(target).max):
        raise InvalidInputError(
            f"{where} hold values up to {largest!r}, outside the range of --dtype {target}; "
            "choose a wider --dtype"
        )
    limit = _exact_integer_limit(target)
    if largest <= limit:
        return
    big = data[np.abs(data) > limit]
    if data.dtype.kind == "f":
        big = big[big == np.trunc(big)]  # counts held as floats
    changed = big[big.astype(target).astype(data.dtype) != big]
    if changed.size:
        fix = "use --dtype float64 or an integer --dtype" if target.itemsize < 8 else "no --dtype holds them"
        raise InvalidInputError(
            f"{where} hold counts above 2^{np.finfo(target).nmant + 1} (e.g. {int(changed[0])}) "
            f"that {target} cannot store exactly; {fix}"
        )
