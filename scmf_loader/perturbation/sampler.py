"""PerturbationSampler: batches with at most ``k`` cells of any one perturbation, with the
other samplers' rank/world/worker split, ``drop_last`` handling and exact resume."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import numpy as np

from scmf_loader.errors import ConfigurationError
from scmf_loader.perturbation.dataset import PERTURBATION, _rng
from scmf_loader.samplers import BatchSampler

__all__ = ["PerturbationSampler"]


class PerturbationSampler(BatchSampler):
    """Batches holding at most ``k`` cells of any one perturbation (obs column ``key``).

    Each shard's cells make ``len(shard) // batch_size`` batches; each batch gives every
    perturbation present in the shard its share of the batch, capped at ``k`` (the excess
    goes to the others, integer quotas ±1 drawn per batch), and each perturbation's cells are
    drawn in a shuffled cycle: common perturbations (controls, usually) are subsampled within
    an epoch, rare ones may repeat. Shards' left-over cells (fewer than a batch) sit out the
    epoch, so every batch is full and capped; which cells sit out changes every epoch.
    Rank/world/worker split, ``drop_last`` padding and resume as for every
    :class:`~scmf_loader.samplers.BatchSampler`. ``set_epoch`` also sets the epoch of a
    :class:`PerturbationDataset`, so its matched controls follow the loader's epochs.
    """

    def __init__(self, dataset: Any, batch_size: int = 64, k: int = 8, *, key: str = PERTURBATION, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size, **kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"k must be an integer >= 1, got {k!r}")
        if key not in getattr(dataset, "categories", {}):
            raise ConfigurationError(f"obs column {key!r} is not kept in this dataset")
        self.dataset, self.k, self.key = dataset, k, key
        self._layout_of: tuple[int, list[int], list[int]] | None = None
        self._plan_of: tuple[tuple[int, int], np.ndarray] | None = None
        for s in range(len(self.shard_sizes)):
            n_cats = len(np.unique(np.asarray(dataset.obs_codes(s, key))))
            if self.shard_sizes[s] >= batch_size and n_cats * k < batch_size:
                raise ConfigurationError(
                    f"shard {s} holds {n_cats} perturbation(s): at most {k} cells each cannot fill a batch of "
                    f"{batch_size}; raise k or lower batch_size"
                )
        if self.n_batches == 0 and self.n_cells:
            raise ConfigurationError(f"no shard holds batch_size={batch_size} cells")

    @property
    def n_batches(self) -> int:
        """Full batches of all shards (left-over cells sit out: no partial batch)."""
        return int((self.shard_sizes // self.batch_size).sum())

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "k": self.k, "key": self.key}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; also the dataset's (its matched controls)."""
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume (see :meth:`BatchSampler.load_state_dict`); sets the dataset's epoch too."""
        super().load_state_dict(state)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def _epoch_layout(self, epoch: int) -> tuple[list[int], list[int]]:
        """The shard order of ``epoch`` and the first batch index of each shard in it."""
        if self._layout_of is None or self._layout_of[0] != epoch:
            order = _rng(self.seed, epoch, 0).permutation(len(self.shard_sizes))
            first = np.concatenate([[0], np.cumsum((self.shard_sizes // self.batch_size)[order])])
            self._layout_of = (epoch, order.tolist(), first.tolist())
        return self._layout_of[1], self._layout_of[2]

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Global row ids (int64, sorted) of batch ``index`` of ``epoch``: shards in an order
        drawn from ``(seed, epoch)``, each shard's batches one after another."""
        order, first = self._epoch_layout(epoch)
        i = bisect.bisect_right(first, index) - 1
        shard = order[i]
        if self._plan_of is None or self._plan_of[0] != (epoch, shard):
            self._plan_of = ((epoch, shard), self._shard_batches(epoch, shard))
        return self._plan_of[1][index - first[i]] + self._offsets[shard]

    def _shard_batches(self, epoch: int, shard: int) -> np.ndarray:
        """``(batches, batch_size)`` local ids of one shard's batches in ``epoch``."""
        bs, n_batches = self.batch_size, int(self.shard_sizes[shard]) // self.batch_size
        codes = np.asarray(self.dataset.obs_codes(shard, self.key), dtype=np.int64)
        rng = _rng(self.seed, epoch, 3, shard)
        cats, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        quota = _integer_quotas(_capped_shares(counts, bs, self.k), n_batches, rng)
        batch_of, drawn = [], []
        for j in range(len(cats)):
            pool = rng.permutation(np.flatnonzero(inverse == j))
            drawn.append(np.resize(pool, int(quota[:, j].sum())))
            batch_of.append(np.repeat(np.arange(n_batches), quota[:, j]))
        order = np.argsort(np.concatenate(batch_of), kind="stable")
        return np.sort(np.concatenate(drawn)[order].reshape(n_batches, bs), axis=1)


def _capped_shares(counts: np.ndarray, batch_size: int, k: int) -> np.ndarray:
    """Cells per batch of each category: proportional to ``counts``, capped at ``k``, the
    excess spread over the uncapped ones (water filling); sums to ``batch_size``."""
    x = batch_size * counts / counts.sum()
    capped = np.zeros(len(counts), dtype=bool)
    while True:
        over = (x > k + 1e-9) & ~capped
        if not over.any():
            return np.minimum(x, k)
        capped |= over
        free = ~capped
        x = np.where(capped, float(k), (batch_size - k * capped.sum()) * counts / counts[free].sum())


def _integer_quotas(shares: np.ndarray, n_batches: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_batches, categories)`` integer quotas: ``floor(share)`` plus one for as many
    categories as the batch still needs, drawn per batch with probability ∝ the fractional
    part (Efraimidis–Spirakis keys), so no quota exceeds ``ceil(share)``."""
    base = np.floor(shares + 1e-9).astype(np.int64)
    frac = np.clip(shares - base, 0.0, None)
    short = int(round(float(shares.sum()))) - int(base.sum())
    quota = np.repeat(base[None, :], n_batches, axis=0)
    if short > 0:
        keys = np.where(frac > 1e-9, rng.random((n_batches, len(shares))) ** (1.0 / np.maximum(frac, 1e-12)), -1.0)
        top = np.argsort(-keys, axis=1, kind="stable")[:, :short]
        np.put_along_axis(quota, top, base[top] + 1, axis=1)
    return quota
