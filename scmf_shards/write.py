"""Shard writer, converter side: a shard written under a temporary name, renamed when complete.

The layout itself (what goes where, the raw CSR chunks, obs and var through anndata) is
:mod:`scmf_loader.format.shard`, next to its reader; this module adds what only a converter
needs: a temporary name unique to the attempt, the crash-test hooks and the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scmf_loader.format import ShardEntry
from scmf_loader.format.writer import (
    ShardContent,
    StreamedArray,
    csr_arrays,
    shard_entry,
    write_shard_files,
)

__all__ = ["ShardContent", "StreamedArray", "attempt_name", "write_shard"]


def attempt_name(path: Path) -> Path:
    """A temporary sibling of ``path`` unique to this attempt: a task of a killed driver that
    still runs on a remote worker never writes into the temporary files of its re-run."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def write_shard(
    final_path: str | os.PathLike[str],
    relpath: str,
    content: ShardContent,
    after_step: Callable[[str], None] | None = None,
    lock: contextlib.AbstractContextManager[Any] | None = None,
) -> ShardEntry:
    """Write one shard to ``final_path`` (via a temporary sibling unique to this attempt,
    ``<name>.tmp-<pid>-<random>``, and a rename) and return its manifest entry with byte
    counts and checksums of its three CSR arrays. ``after_step(label)`` is called after each
    part is written (the converter's crash-test hook: ``shard:X``, ``shard:complete``).
    ``lock``: held around the part of the writer that is not thread-safe (anndata's)."""
    final = Path(final_path)
    tmp = attempt_name(final)
    step = after_step or (lambda label: None)
    arrays = csr_arrays(content.indptr, content.indices, content.data)
    digests = write_shard_files(tmp, arrays, content, after_x=lambda: step("shard:X"), lock=lock)
    entry = shard_entry(tmp, relpath, arrays, checksums=digests)
    step("shard:complete")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return entry
