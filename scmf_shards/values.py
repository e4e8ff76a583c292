"""Checks of input values against what a conversion will store (pure numpy).

Nothing is silently coerced: NaN/inf, negative values (unless the user states the data is
already normalised and asks for no log1p), values a chosen integer ``--dtype`` cannot hold
exactly (fractions, out of range) and counts a float ``--dtype`` cannot represent exactly
are each one clear error naming the rows and the file.
"""

from __future__ import annotations

import numpy as np

from scmf_loader.errors import InvalidInputError

__all__ = ["check_values"]


def _exact_integer_limit(dtype: np.dtype) -> int:
    """Largest integer up to which every integer is exactly representable in float ``dtype``."""
    return 2 ** (np.finfo(dtype).nmant + 1)


def check_values(data: np.ndarray, target: str | np.dtype, where: str, allow_negative: bool = False) -> None:
    """Raise :class:`InvalidInputError` (message starting with ``where``) if ``data`` (the
    stored values of some rows, source dtype) cannot be converted to ``target`` faithfully."""
    target = np.dtype(target)
    if data.size == 0:
        return
    is_float = data.dtype.kind == "f"
    if is_float and not np.isfinite(data).all():
        raise InvalidInputError(f"{where} hold NaN or infinite values")
    lo, hi = data.min(), data.max()
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
    elif target.kind == "f" and data.dtype.kind in "iu" and hi > _exact_integer_limit(target):
        raise InvalidInputError(
            f"{where} hold counts above 2^{np.finfo(target).nmant + 1} that {target} cannot "
            "store exactly; use --dtype float64"
        )
