"""``MixtureDataset``: several datasets read at fixed weights, seeded and resumable.

``MixtureDataset([ds_a, ds_b], weights=[0.7, 0.3])`` behaves like one
:class:`~scmf_loader.dataset.CellDataset` whose cells are those of its members one after the
other (global id ``offset[i] + local id``), and :class:`MixtureSampler` draws its batches at
the weights. ``CellDataLoader(mixture, sampler=mixture.make_sampler(batch_size))`` trains on it.

**Epoch length.** An epoch holds ``epoch_size`` cells (default: the members' cells together,
``sum(len(d))``), as ``ceil(epoch_size / batch_size)`` batches (``drop_last=True``: the full
batches every rank gets, as in every sampler). Member ``i`` serves ``n_i`` of them, the
weights' shares rounded by largest remainder (so ``sum(n_i)`` is the epoch and each ``n_i``
is within one cell of ``w_i * epoch``). Each member reads its own endless stream: its cells in
a seeded block-shuffled order (a :class:`~scmf_loader.samplers.BlockShuffleSampler` over the
member, one member-epoch after another), and mixture epoch ``e`` reads positions
``[e * n_i, (e + 1) * n_i)`` of it. A member whose share is smaller than its size is so
subsampled without replacement, a different part each epoch, every cell equally often in the
long run; a larger share repeats whole passes. ``weights=None`` weighs members by size: every
cell exactly once per epoch. Within an epoch, batch ``j`` takes from member ``i`` the cells of
its share between ``floor`` points of a seeded, exact interleaving, so every batch follows the
weights to within a cell or two per member.

**Vocabulary.** Members share the first member's vocabulary, or are mapped onto it by gene
token: genes the first vocabulary lacks are dropped from the member's batches; the counts are
in :attr:`MixtureDataset.gene_report` and a ``UserWarning`` names them once.

**Obs.** ``batch.obs["dataset"]`` holds the member index of every cell (categories:
``names``); obs columns kept by every member follow, their categories merged (the first
member's order, then new ones); per-cell stats kept by every member too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from scmf_loader.batch import CSRBatch, as_tensor
from scmf_loader.errors import ConfigurationError
from scmf_loader.samplers import BatchSampler, BlockShuffleSampler, SequentialSampler
from scmf_loader.vocab import GeneVocab

__all__ = ["MixtureDataset", "MixtureSampler"]

DATASET_COLUMN = "dataset"
_MIX_KEY, _STREAM_KEY = 0x4D49, 0x5354


def _check_weights(weights: Sequence[float] | None, sizes: list[int]) -> np.ndarray:
    if weights is None:
        w = np.asarray(sizes, dtype=np.float64)
    else:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (len(sizes),):
            raise ConfigurationError(f"weights: {len(sizes)} datasets but {len(w)} weights {list(weights)}")
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise ConfigurationError(f"weights must be finite and >= 0, got {list(weights)}")
    if w.sum() <= 0:
        raise ConfigurationError(f"weights must not all be 0 (nor the datasets empty), got {w.tolist()}")
    empty = [i for i, (x, n) in enumerate(zip(w.tolist(), sizes, strict=True)) if x > 0 and n == 0]
    if empty:
        raise ConfigurationError(f"dataset(s) {empty} hold no cells but have a weight > 0")
    return w / w.sum()


def apportion(weights: np.ndarray, total: int) -> list[int]:
    """``total`` split by ``weights`` (summing to 1) with largest remainders (ties to the
    lower index): each share within one of ``weight * total``, the shares summing to ``total``."""
    exact = weights * total
    shares = np.floor(exact).astype(np.int64)
    rest = total - int(shares.sum())
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:rest]] += 1
    return shares.tolist()


def _gene_map(first: GeneVocab, other: GeneVocab) -> tuple[np.ndarray, list[str]]:
    """Ids of ``other``'s tokens in ``first`` (-1: absent), and the absent tokens."""
    ids = {t: i for i, t in enumerate(first.tokens)}
    tokens = other.tokens
    mapping = np.fromiter((ids.get(t, -1) for t in tokens), dtype=np.int64, count=len(tokens))
    return mapping, [t for t, m in zip(tokens, mapping.tolist(), strict=True) if m < 0]


class MixtureDataset(torch.utils.data.Dataset):
    """Datasets read together at fixed weights (see the module docstring for the rules).

    ``datasets``: :class:`~scmf_loader.dataset.CellDataset` objects (anything with their
    batch interface). ``weights``: one per dataset, >= 0, normalised (default: their sizes).
    ``seed`` enters every draw of :class:`MixtureSampler` together with the sampler's own.
    ``names``: the categories of ``obs["dataset"]`` (default ``"0"``, ``"1"``, ...).
    ``epoch_size``: cells per epoch (default: all members' cells).
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        *,
        names: Sequence[str] | None = None,
        epoch_size: int | None = None,
        max_genes: int | None = None,
    ) -> None:
        self.datasets = list(datasets)
        if not self.datasets:
            raise ConfigurationError("MixtureDataset needs at least one dataset")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"seed must be an integer >= 0, got {seed!r}")
        sizes = [len(d) for d in self.datasets]
        self.weights = _check_weights(weights, sizes)
        self.seed = seed
        self.names = tuple(str(n) for n in names) if names is not None else tuple(map(str, range(len(sizes))))
        if len(self.names) != len(sizes) or len(set(self.names)) != len(self.names):
            raise ConfigurationError(f"names must be {len(sizes)} distinct strings, got {list(self.names)}")
        total = sum(sizes)
        self.epoch_size = total if epoch_size is None else epoch_size
        if isinstance(self.epoch_size, bool) or not isinstance(self.epoch_size, int) or self.epoch_size < 1:
            raise ConfigurationError(f"epoch_size must be an integer >= 1, got {epoch_size!r}")
        self.max_genes = max_genes
        self.preprocessing = None  # members apply their own
        self.store = None  # no single memory map: batches are always assembled
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shard_offsets = np.concatenate(
            [[0]] + [np.asarray(d.shard_offsets[1:], dtype=np.int64) + o for d, o in zip(self.datasets, self.offsets[:-1].tolist(), strict=True)]
        ).astype(np.int64)
        self._shard_member = np.repeat(np.arange(len(sizes)), [len(d.shard_offsets) - 1 for d in self.datasets])
        self._setup_vocab()
        self._setup_obs()
        self._dtype = self._common_dtype()

    # ---- set-up -------------------------------------------------------------------------
    def _setup_vocab(self) -> None:
        self.vocab: GeneVocab = self.datasets[0].vocab
        self._maps: list[tuple[np.ndarray, bool] | None] = []
        self.gene_report: list[dict[str, Any]] = []
        for i, d in enumerate(self.datasets):
            if i == 0 or d.vocab == self.vocab:
                self._maps.append(None)
                n = len(d.vocab) - 4
                self.gene_report.append({"dataset": self.names[i], "genes": n, "mapped": n, "dropped": 0, "dropped_genes": []})
                continue
            mapping, absent = _gene_map(self.vocab, d.vocab)
            kept = mapping[mapping >= 0]
            self._maps.append((mapping, bool((np.diff(kept) > 0).all())))
            n = len(d.vocab) - 4
            self.gene_report.append({"dataset": self.names[i], "genes": n, "mapped": n - len(absent),
                                     "dropped": len(absent), "dropped_genes": absent})
            if absent:
                warnings.warn(
                    f"MixtureDataset: dataset {self.names[i]!r} has {len(absent)} of its {n} genes absent from "
                    f"dataset {self.names[0]!r}'s vocabulary (e.g. {absent[:5]}); they are dropped from its "
                    "batches (see gene_report)", UserWarning, stacklevel=3,
                )

    def _setup_obs(self) -> None:
        first = self.datasets[0]
        shared = [c for c in first.obs_columns if c != DATASET_COLUMN
                  and all(c in d.obs_columns for d in self.datasets[1:])]
        self.obs_columns: tuple[str, ...] = (DATASET_COLUMN, *shared)
        self.categories: dict[str, tuple[str, ...]] = {DATASET_COLUMN: self.names}
        self._code_maps: dict[str, list[np.ndarray]] = {}
        for c in shared:
            merged: dict[str, int] = {}
            for d in self.datasets:
                for cat in d.categories[c]:
                    merged.setdefault(cat, len(merged))
            self.categories[c] = tuple(merged)
            # member code -> merged code; index -1 (missing) hits the trailing -1
            self._code_maps[c] = [np.array([merged[x] for x in d.categories[c]] + [-1], dtype=np.int64) for d in self.datasets]
        self.cell_stats = tuple(k for k in first.cell_stats if all(k in d.cell_stats for d in self.datasets[1:]))

    def _common_dtype(self) -> np.dtype:
        dtypes = {self.datasets[i][[0]].values.numpy().dtype for i, n in enumerate(self.sizes) if n}
        return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)

    # ---- shape --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_genes(self) -> int:
        """The first member's vocabulary size (the column space of every batch)."""
        return len(self.vocab)

    @property
    def n_shards(self) -> int:
        """All members' shards, one after the other."""
        return len(self.shard_offsets) - 1

    @property
    def gene_nonzero_median(self) -> np.ndarray:
        """The first dataset's per-gene non-zero medians (its vocabulary is the mixture's):
        what the ``rank`` output divides by."""
        return self.datasets[0].gene_nonzero_median

    def member_of(self, ids: Any) -> np.ndarray:
        """The member index of each global id."""
        return np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1

    def obs_codes(self, shard: int, column: str) -> np.ndarray:
        """Codes of obs ``column`` (merged categories) for every cell of global ``shard``."""
        i = int(self._shard_member[shard])
        d = self.datasets[i]
        local = shard - int(np.searchsorted(self._shard_member, i))
        n = int(d.shard_offsets[local + 1] - d.shard_offsets[local])
        if column == DATASET_COLUMN:
            return np.full(n, i, dtype=np.int64)
        if column not in self._code_maps:
            raise ConfigurationError(f"obs column {column!r} is not kept by every dataset; kept: {list(self.obs_columns)}")
        return self._code_maps[column][i][np.asarray(d.obs_codes(local, column), dtype=np.int64)]

    def decode(self, column: str, codes: Any) -> list[str | None]:
        """Category names of ``codes`` of obs ``column`` (``None`` for -1 = missing)."""
        cats = self.categories[column]
        return [cats[c] if c >= 0 else None for c in np.asarray(codes).ravel().tolist()]

    def make_sampler(self, batch_size: int, *, shuffle: bool = True, **kwargs: Any) -> BatchSampler:
        """The sampler a loader should use: a :class:`MixtureSampler` (``shuffle=False``: a
        :class:`~scmf_loader.samplers.SequentialSampler` over the members one after the
        other, weights ignored, for evaluation). ``kwargs`` go to the sampler."""
        if shuffle:
            return MixtureSampler(self, batch_size, **kwargs)
        kwargs.pop("block_size", None)
        return SequentialSampler(self, batch_size, **kwargs)

    # ---- batches ------------------------------------------------------------------------
    def __getitems__(self, ids: Any) -> CSRBatch:
        """One :class:`~scmf_loader.batch.CSRBatch` of the global ids ``ids``, in order: each
        run of one member read from it, mapped onto the first vocabulary, concatenated."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"cell ids must lie in [0, {len(self)}); got [{ids.min()}, {ids.max()}]")
        member = self.member_of(ids)
        cut = np.flatnonzero(np.diff(member)) + 1
        parts = []
        for a, b in zip(np.concatenate([[0], cut]).tolist(), np.append(cut, len(ids)).tolist(), strict=True):
            if b > a:
                i = int(member[a])
                parts.append((i, self.datasets[i].__getitems__(ids[a:b] - self.offsets[i])))
        return self._concat(ids, parts)

    def get_range(self, start: int, stop: int) -> CSRBatch:
        """The batch of global ids ``[start, stop)``."""
        return self.__getitems__(np.arange(start, stop, dtype=np.int64))

    def shard_of_range(self, start: int, stop: int) -> int:
        """Always -1: mixture batches are assembled, never views (what a loader asks)."""
        return -1

    def _csr_part(self, i: int, batch: CSRBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row lengths, indices (first vocabulary) and values of a member's batch."""
        indptr = batch.indptr.numpy()
        indices, values = batch.indices.numpy(), batch.values.numpy()
        lengths = np.diff(indptr).astype(np.int64)
        mapped = self._maps[i]
        if mapped is None:
            return lengths, indices.astype(np.int32, copy=False), values.astype(self._dtype, copy=False)
        mapping, monotone = mapped
        new = mapping[indices]
        keep = new >= 0
        rows = np.repeat(np.arange(len(lengths)), lengths)[keep]
        new, values = new[keep], values[keep]
        if not monotone:  # restore sorted indices within each row
            order = np.lexsort((new, rows))
            new, values = new[order], values[order]
        lengths = np.bincount(rows, minlength=len(lengths)).astype(np.int64)
        return lengths, new.astype(np.int32), values.astype(self._dtype, copy=False)

    def _concat(self, ids: np.ndarray, parts: list[tuple[int, CSRBatch]]) -> CSRBatch:
        csr = [self._csr_part(i, b) for i, b in parts]
        lengths = np.concatenate([c[0] for c in csr]) if csr else np.zeros(0, np.int64)
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.concatenate([c[1] for c in csr]) if csr else np.zeros(0, np.int32)
        values = np.concatenate([c[2] for c in csr]) if csr else np.zeros(0, self._dtype)
        obs_cols, stat_cols = self.obs_columns, self.cell_stats

        def obs() -> tuple[tuple[str, ...], torch.Tensor]:
            block = np.zeros((len(ids), len(obs_cols)), dtype=np.int64)
            row = 0
            for i, b in parts:
                n = len(b)
                block[row : row + n, 0] = i
                for j, c in enumerate(obs_cols[1:], start=1):
                    block[row : row + n, j] = self._code_maps[c][i][b.obs[c].numpy()]
                row += n
            return obs_cols, torch.from_numpy(block)

        def stats() -> tuple[tuple[str, ...], torch.Tensor]:
            block = np.zeros((len(ids), len(stat_cols)), dtype=np.float64)
            row = 0
            for _, b in parts:
                for j, k in enumerate(stat_cols):
                    block[row : row + len(b), j] = b.stats[k].numpy()
                row += len(b)
            return stat_cols, torch.from_numpy(block)

        return CSRBatch(torch.from_numpy(indptr), as_tensor(indices), as_tensor(values),
                        torch.from_numpy(ids.copy()), self.n_genes, obs, stats)

    def __getitem__(self, index: Any) -> Any:
        """``ds[i]``: one cell as the seed's dict (``expression``, ``gene_indices``,
        ``n_genes``, ``metadata`` with ``"dataset"``); ``ds[ids]``: a :class:`CSRBatch`."""
        if not isinstance(index, (int, np.integer)):
            if isinstance(index, slice):
                return self.__getitems__(np.arange(len(self))[index])
            return self.__getitems__(index)
        i = int(index) + (len(self) if int(index) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"cell {index} out of range for {len(self)} cells")
        batch = self.__getitems__([i])
        values = batch.values.numpy().astype(np.float32)
        genes = batch.indices.numpy().astype(np.int64)
        if self.max_genes is not None and len(values) > self.max_genes:
            top = np.sort(np.argsort(-values, kind="stable")[: self.max_genes])
            values, genes = values[top], genes[top]
        return {
            "expression": torch.from_numpy(values),
            "gene_indices": torch.from_numpy(genes),
            "n_genes": len(values),
            "metadata": {c: self.decode(c, batch.obs[c])[0] for c in self.obs_columns},
        }

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {len(d)} cells @ {w:.3g}" for n, d, w in zip(self.names, self.datasets, self.weights.tolist(), strict=True))
        return f"MixtureDataset({parts}; epoch_size={self.epoch_size}, n_genes={self.n_genes})"



class MixtureSampler(BatchSampler):
    """Batches of a :class:`MixtureDataset` at its weights (rules in the module docstring).

    Seeded by ``(seed, mixture.seed)``, distributed-aware (``rank``/``world_size`` as every
    sampler: arguments, else ``torch.distributed``, else the environment) and worker-aware
    (:meth:`~scmf_loader.samplers.BatchSampler.batches` with ``num_workers``/``worker_id``);
    ``state_dict()``/``load_state_dict()`` resume at exactly the next batch. Every batch is
    random access, O(members + blocks it touches); memory is O(shards) per member.
    ``block_size`` (default ``batch_size``): the contiguous blocks each member's stream is
    cut into (smaller: more mixing inside a member, more gathers).
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        batch_size: int,
        block_size: int | None = None,
        *,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not isinstance(dataset, MixtureDataset):
            raise ConfigurationError(f"MixtureSampler needs a MixtureDataset, got {type(dataset).__name__}")
        super().__init__(dataset, batch_size, drop_last=drop_last, seed=seed, rank=rank, world_size=world_size)
        self.mixture = dataset
        self.block_size = batch_size if block_size is None else block_size
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigurationError(f"block_size must be an integer >= 1, got {block_size!r}")
        self._streams: list[BlockShuffleSampler | None] = []
        for i, d in enumerate(dataset.datasets):
            if dataset.sizes[i] == 0:
                self._streams.append(None)
                continue
            key = np.random.SeedSequence([seed, dataset.seed, _STREAM_KEY, i]).generate_state(1, np.uint32)[0]
            self._streams.append(BlockShuffleSampler(d, self.block_size, seed=int(key), rank=0, world_size=1))
        self._plan: tuple[int, list[int], list[int]] | None = None

    @property
    def n_batches(self) -> int:
        """Batches in one epoch's order (``epoch_size`` cells; see the module docstring)."""
        n = self.mixture.epoch_size
        if self.drop_last:
            return n // (self.batch_size * self.world_size) * self.world_size
        return -(-n // self.batch_size)

    @property
    def epoch_cells(self) -> int:
        """Cells one epoch serves over all ranks (before padding)."""
        return min(self.n_batches * self.batch_size, self.mixture.epoch_size)

    def member_counts(self) -> list[int]:
        """Cells each member serves per epoch (the same every epoch)."""
        return self._interleave()[1]

    def _interleave(self) -> tuple[int, list[int], list[int]]:
        """``(epoch cells, shares, phases)``: the exact interleaving's constants."""
        total = self.epoch_cells
        if self._plan is None or self._plan[0] != total:
            shares = apportion(self.mixture.weights, total)
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.mixture.seed, _MIX_KEY]))
            phases, rest = [], total
            for n in shares:
                phases.append(int(rng.integers(0, max(rest, 1))))
                rest -= n
            self._plan = (total, shares, phases)
        return self._plan

    def _cumulative(self, p: int) -> list[int]:
        """Cells each member serves among the epoch's first ``p``: member ``i`` takes
        ``floor((q * n_i + u_i) / r_i)`` of the ``q`` positions the members before it left,
        ``r_i`` the cells they leave in the epoch. Monotone in ``p``, exact at the ends."""
        _, shares, phases = self._interleave()
        out, q, rest = [], p, self.epoch_cells
        for n, u in zip(shares, phases, strict=True):
            take = (q * n + u) // rest if rest else 0
            out.append(take)
            q, rest = q - take, rest - n
        return out

    def _stream(self, i: int, q0: int, q1: int) -> list[np.ndarray]:
        """Member-local ids at positions ``[q0, q1)`` of member ``i``'s endless stream."""
        inner, size, blk = self._streams[i], self.mixture.sizes[i], self.block_size
        assert inner is not None
        out, q = [], q0
        while q < q1:
            k, r = divmod(q, size)
            end = min(size, r + q1 - q)
            while r < end:
                b = r // blk
                lo, hi = r - b * blk, min(end - b * blk, blk)
                item = inner.batch_or_range(k, b)
                out.append(np.arange(item[0] + lo, item[0] + hi, dtype=np.int64) if isinstance(item, tuple) else item[lo:hi])
                r = b * blk + hi
            q = k * size + end
        return out

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Global ids of batch ``index`` of ``epoch``: each member's part in member order."""
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch {index} out of range for {self.n_batches} batches")
        lo = index * self.batch_size
        hi = min(lo + self.batch_size, self.epoch_cells)
        _, shares, _ = self._interleave()
        parts = []
        for i, (a, b) in enumerate(zip(self._cumulative(lo), self._cumulative(hi), strict=True)):
            if b > a:
                base = epoch * shares[i]
                parts.extend(x + int(self.mixture.offsets[i]) for x in self._stream(i, base + a, base + b))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def with_drop_last(self, drop_last: bool) -> BatchSampler:
        """A copy with ``drop_last`` set (the epoch's constants recomputed)."""
        other = super().with_drop_last(drop_last)
        assert isinstance(other, MixtureSampler)
        other._plan = None
        return other

    def _fingerprint(self) -> dict[str, Any]:
        return {
            **super()._fingerprint(), "block_size": self.block_size, "mixture_seed": self.mixture.seed,
            "weights": [float(w) for w in self.mixture.weights], "sizes": list(self.mixture.sizes),
            "epoch_size": self.mixture.epoch_size,
        }
