"""Labels as strings: the one conversion of obs values (categories, booleans, numbers, NA)
to the strings stored in shards and served as categories, shared by every source.

Numpy only, no side effects: the converter's ``.h5ad`` source and the Census paths both
import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["stringify"]


def stringify(values: Sequence[Any]) -> np.ndarray:
    """Values as an object array of ``str`` (``None`` for NA): ``True``/``False`` for
    booleans, UTF-8 decoded ``bytes``, ``str(x)`` otherwise; ``None`` and float NaN are NA."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            out[i] = None
        elif isinstance(v, bytes):
            out[i] = v.decode("utf-8")
        else:
            out[i] = str(v)
    return out
