"""Rank / world / worker arithmetic: which batches of an epoch one reader gets.

One pure function, :func:`partition`, with ``torch.utils.data.DistributedSampler``
semantics applied to whole batches: with ``drop_last=False`` the epoch's batch order is
padded by repeating batches from its start so that every rank reads the same number of
batches (as torch pads its index list); with ``drop_last=True`` the remainder (fewer than
``world_size`` batches) is dropped. Each rank then reads one contiguous stretch of the
(padded) order: rank ``r`` of ``W`` reads positions ``[r * m, (r + 1) * m)`` with ``m`` the
batches per rank. torch strides instead (``r, r + W, ...``); the same batches are read
overall, but a contiguous stretch touches only about ``1/W`` of the shards on each rank
(fewer memory maps and obs reads, better page-cache locality), since the epoch order
visits shards one after another. Each rank's stretch is then split by stride over its
DataLoader workers, which is how a DataLoader hands out a sampler's items: no batch twice,
none lost.

:func:`resolve_world` finds rank and world size: explicit arguments, else an initialised
``torch.distributed`` process group, else the ``RANK``/``WORLD_SIZE`` environment, else
``(0, 1)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from scmf_loader.errors import ConfigurationError

__all__ = ["Partition", "partition", "resolve_world"]


@dataclass(frozen=True)
class Partition:
    """The batches one reader (rank, worker) gets in one epoch.

    ``n_batches``: batches in the epoch's order; ``total``: its length after padding or
    dropping (a multiple of the world size); ``positions``: the positions in the padded
    order this reader reads, in order (a contiguous stretch per rank, strided over
    workers). Item ``i`` is the batch index ``positions[i] % n_batches`` (positions past
    ``n_batches`` are the padding).
    """

    n_batches: int
    total: int
    positions: range

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> int:
        return self.positions[i] % self.n_batches

    def __iter__(self) -> Iterator[int]:
        n = self.n_batches
        return (p % n for p in self.positions)


def _check_world(world_size: int, rank: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigurationError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigurationError(
            f"rank must be an integer in [0, world_size) = [0, {world_size}), got {rank!r}"
        )


def partition(
    n_batches: int,
    world_size: int,
    rank: int,
    *,
    drop_last: bool,
    num_workers: int = 0,
    worker_id: int = 0,
) -> Partition:
    """The batches of an epoch of ``n_batches`` that ``(rank, worker_id)`` reads.

    ``num_workers=0`` (or 1) means the rank reads its whole share itself. Pure arithmetic:
    O(1) time and memory whatever the epoch size.
    """
    if n_batches < 0:
        raise ConfigurationError(f"n_batches must be >= 0, got {n_batches}")
    _check_world(world_size, rank)
    workers = max(num_workers, 1)
    if not 0 <= worker_id < workers:
        raise ConfigurationError(f"worker_id must be in [0, {workers}), got {worker_id}")
    per_rank = n_batches // world_size if drop_last else -(-n_batches // world_size)
    first = rank * per_rank
    return Partition(
        n_batches=n_batches,
        total=per_rank * world_size,
        positions=range(first + worker_id, first + per_rank, workers),
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: each from its argument, else ``torch.distributed`` when a
    process group is initialised, else the ``RANK``/``WORLD_SIZE`` environment, else 0 / 1."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    if rank is None:
        rank = _env_int("RANK")
    if world_size is None:
        world_size = _env_int("WORLD_SIZE")
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    _check_world(world_size, rank)
    return rank, world_size
