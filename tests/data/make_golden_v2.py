"""Write ``tests/data/golden_v2`` (format v2) from ``tests/data/golden_source.h5ad``.

Run once, when format v2 was introduced; never again (tests/test_golden.py checks that the
current writer still reproduces it byte for byte):

    python tests/data/make_golden_v2.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scmf_shards.convert import convert_h5ad

DATA = Path(__file__).resolve().parent
#: the conversion options of every golden dataset (see tests/test_golden.py)
OPTIONS = {"vocab": "union", "shard_size": 16, "chunk_size": 10, "obs_columns": ("cell_type",)}


def main() -> None:
    """Convert the golden source into ``golden_v2`` (replacing it)."""
    os.chdir(DATA.parent.parent)  # the manifest records the source as given: a relative path
    out = Path("tests/data/golden_v2")
    shutil.rmtree(out, ignore_errors=True)
    m = convert_h5ad(["tests/data/golden_source.h5ad"], out, quiet=True, **OPTIONS)
    print(f"{out}: format_version {m.format_version}, {m.dataset_id}")


if __name__ == "__main__":
    main()
