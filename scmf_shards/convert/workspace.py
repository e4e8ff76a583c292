"""The scratch layout of a conversion: every path under ``DIR/.scmf-tmp`` is defined here.

::

    DIR/.scmf-tmp/
      plan.json              written first (temporary name, then rename): marks the scratch
                             as this conversion's (dataset_id, n_shards, chunk sources,
                             bucket root)
      table_by_shard.npy     one row per shard: cells each read chunk sends it
      vocab.json             the vocabulary, copied to DIR/vocab.json at the end
      alignments/sNNNNN.npz  each source's gene alignment (scatter tasks load it by reference)
      preprocess/            the preprocessing stats passes' files
      buckets/cNNNNNN/       one scatter task's output, grouped by shard (or in --scratch-dir)
      medians/cNNNNNN.npz    one scatter task's non-zero histogram (scmf_shards.medians),
                             written before its bucket is complete (either path)
      medians/nonzero_median.npy   the per-gene non-zero medians, merged from every chunk's
                             histogram before the gather stage
      shards/NNNNNN.json     a gather task's completion record (the shard's manifest entry)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BUCKET_PREFIX", "TMP_DIR", "Workspace", "bucket_path"]

TMP_DIR = ".scmf-tmp"
PLAN_NAME = "plan.json"
TABLE_NAME = "table_by_shard.npy"
BUCKET_PREFIX = "scmf-buckets-"
MEDIANS_DIR = "medians"
MEDIANS_NAME = "nonzero_median.npy"


def bucket_path(bucket_root: str | os.PathLike[str], chunk: int) -> Path:
    """The bucket directory of read chunk ``chunk``."""
    return Path(bucket_root) / f"c{chunk:06d}"


@dataclass(frozen=True)
class Workspace:
    """The scratch directory of a conversion into ``out`` (``out/.scmf-tmp``)."""

    out: Path

    @classmethod
    def at(cls, out: str | os.PathLike[str]) -> Workspace:
        """The workspace of output directory ``out``."""
        return cls(Path(out))

    @classmethod
    def of_tmp(cls, tmp_dir: str | os.PathLike[str]) -> Workspace:
        """The workspace whose scratch directory is ``tmp_dir`` (what tasks are given)."""
        return cls(Path(tmp_dir).parent)

    @property
    def root(self) -> Path:
        """``out/.scmf-tmp``."""
        return self.out / TMP_DIR

    @property
    def plan(self) -> Path:
        """The plan file (its presence marks the scratch directory as a conversion's)."""
        return self.root / PLAN_NAME

    @property
    def table(self) -> Path:
        """The assignment table, one row per shard."""
        return self.root / TABLE_NAME

    @property
    def vocab(self) -> Path:
        """The vocabulary used during the conversion."""
        from scmf_loader.format import VOCAB_NAME

        return self.root / VOCAB_NAME

    @property
    def records(self) -> Path:
        """Directory of the gather tasks' completion records."""
        return self.root / "shards"

    def record(self, shard: int) -> Path:
        """Completion record of shard ``shard``."""
        return self.records / f"{shard:06d}.json"

    def alignment(self, source: int) -> Path:
        """Stored gene alignment of source ``source``."""
        return self.root / "alignments" / f"s{source:05d}.npz"

    def histogram(self, chunk: int) -> Path:
        """The non-zero histogram of read chunk ``chunk`` (its scatter task writes it)."""
        return self.root / MEDIANS_DIR / f"c{chunk:06d}.npz"

    @property
    def medians(self) -> Path:
        """The per-gene non-zero medians every gather task writes into its shard's var."""
        return self.root / MEDIANS_DIR / MEDIANS_NAME

    @property
    def preprocess(self) -> Path:
        """Working directory of the preprocessing stats passes."""
        return self.root / "preprocess"

    def bucket_root(self, scratch_dir: str | os.PathLike[str] | None, dataset_id: str) -> Path:
        """Where the buckets go: ``.scmf-tmp/buckets``, or with a scratch directory
        ``SCRATCH/scmf-buckets-<dataset id prefix>`` (the same on a re-run, so a killed
        conversion resumes with the buckets it finished)."""
        if scratch_dir is None:
            return self.root / "buckets"
        return Path(scratch_dir) / f"{BUCKET_PREFIX}{dataset_id.split(':')[-1][:24]}"

    def write_plan(self, doc: dict[str, Any]) -> None:
        """Write the plan atomically (temporary name, then rename)."""
        tmp = self.plan.with_name(PLAN_NAME + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.plan)

    def read_plan(self) -> dict[str, Any] | None:
        """The plan, or None when there is none or it cannot be read."""
        try:
            doc = json.loads(self.plan.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None
