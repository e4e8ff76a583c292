"""CSR mini-batches: assembly from shard rows, and converters for models.

:func:`gather_rows` builds the CSR arrays of a batch from runs of consecutive rows. When the
batch is one run of one shard, ``indices`` and ``values`` are views of the memory map (zero
copy); otherwise each run is copied once into a fresh array. :class:`CSRBatch` wraps the
arrays as torch tensors and converts them to a ``torch.sparse_csr_tensor``, a dense matrix or
padded token batches for transformer models.

Tensors that view a memory map are read-only: write into :meth:`CSRBatch.clone` (or into
the output of a converter), never into ``batch.values`` itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from scmf_loader import buffers, outputs
from scmf_loader.errors import ConfigurationError

__all__ = ["CSRBatch", "as_tensor", "gather_rows"]

TRUNCATIONS = ("top", "random")
_silenced: set[str] = set()


def _quiet_once(message: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with torch's warn-once ``message`` silenced on the first call only
    (torch emits it once per process, so later calls need no filter and pay nothing)."""
    if message in _silenced:
        return fn(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message)
        out = fn(*args, **kwargs)
    _silenced.add(message)
    return out


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` that also takes read-only arrays (views of a memory map)
    without torch's warning that writing through such a tensor is undefined."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    return _quiet_once("The given NumPy array is not writable", torch.from_numpy, a)


def gather_rows(
    pieces: Sequence[tuple[Any, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays ``(indptr, indices, data)`` of the rows ``[start, stop)`` of each run.

    ``pieces`` holds, in output order, ``(arrays, starts, stops)`` with ``arrays`` a shard's
    ``(indptr, indices, data)`` and ``starts``/``stops`` sequences of local row ranges.
    One run in total gives views of ``indices`` and ``data`` (zero copy) and a rebased copy
    of ``indptr``; several runs are concatenated (one copy of each byte).
    """
    if len(pieces) == 1 and len(pieces[0][1]) == 1:
        (ip, idx, data), starts, stops = pieces[0]
        rows = ip[int(starts[0]) : int(stops[0]) + 1]
        lo, hi = int(rows[0]), int(rows[-1])
        return rows - lo, idx[lo:hi], data[lo:hi]
    idx_parts: list[np.ndarray] = []
    data_parts: list[np.ndarray] = []
    len_parts: list[np.ndarray] = []
    for (ip, idx, data), starts, stops in pieces:
        starts, stops = np.asarray(starts), np.asarray(stops)
        n = stops - starts
        local = np.repeat(starts - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
        len_parts.append(ip[local + 1] - ip[local])
        for lo, hi in zip(ip[starts].tolist(), ip[stops].tolist(), strict=True):
            idx_parts.append(idx[lo:hi])
            data_parts.append(data[lo:hi])
    lengths = np.concatenate(len_parts)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    nnz = int(indptr[-1])
    indices = np.concatenate(idx_parts, out=buffers.empty(nnz, idx_parts[0].dtype))
    values = np.concatenate(data_parts, out=buffers.empty(nnz, data_parts[0].dtype))
    return indptr, indices, values


Columns = Mapping[str, torch.Tensor] | tuple[Sequence[str], torch.Tensor] | Callable[[], Any]


def _columns(cols: Columns | None) -> dict[str, torch.Tensor]:
    if cols is None:
        return {}
    if callable(cols):  # built on first access
        cols = cols()
    if isinstance(cols, tuple):  # (names, 2-D block): one view per column
        names, block = cols
        return dict(zip(names, block.unbind(1), strict=True))
    return cols if isinstance(cols, dict) else dict(cols)


def _map_columns(cols: Columns | None, fn: Any) -> Columns:
    if callable(cols):
        cols = cols()
    if isinstance(cols, tuple):
        return (cols[0], fn(cols[1]))
    return {k: fn(v) for k, v in _columns(cols).items()}


class CSRBatch:
    """A mini-batch of cells in CSR form over the gene vocabulary.

    Attributes: ``indptr`` (int64, ``len + 1``, starts at 0), ``indices`` (int32 vocabulary
    ids, sorted within each row), ``values`` (the stored dtype), ``cell_ids`` (int64 global
    row ids), ``obs`` (int64 categorical codes per kept obs column; -1 = missing), ``stats``
    (float64 per-cell columns such as ``library_size``) and ``n_genes`` (vocabulary size).
    ``obs`` and ``stats`` may be given as mappings, as ``(names, 2-D tensor)`` whose columns
    are split into the mapping on first access, or as a function returning either, called
    on first access (so a training loop that never reads them never builds them).
    """

    __slots__ = ("_obs", "_stats", "cell_ids", "indices", "indptr", "n_genes", "values")

    def __init__(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        cell_ids: torch.Tensor,
        n_genes: int,
        obs: Columns | None = None,
        stats: Columns | None = None,
    ) -> None:
        self.indptr = indptr
        self.indices = indices
        self.values = values
        self.cell_ids = cell_ids
        self.n_genes = int(n_genes)
        self._obs = obs
        self._stats = stats

    @property
    def obs(self) -> dict[str, torch.Tensor]:
        """Categorical codes (int64, -1 = missing) of each kept obs column."""
        if not isinstance(self._obs, dict):
            self._obs = _columns(self._obs)
        return self._obs

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Per-cell numeric columns (float64), e.g. ``library_size``."""
        if not isinstance(self._stats, dict):
            self._stats = _columns(self._stats)
        return self._stats

    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in ("cell_ids", "indices", "indptr", "n_genes", "values")}
        return {**state, "_obs": self.obs, "_stats": self.stats}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    # ---- shape --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.cell_ids.shape[0])

    @property
    def nnz(self) -> int:
        """Number of stored non-zeros."""
        return int(self.values.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(cells, vocabulary size)``."""
        return (len(self), self.n_genes)

    def lengths(self) -> torch.Tensor:
        """Non-zeros per cell (int64)."""
        return self.indptr[1:] - self.indptr[:-1]

    def __repr__(self) -> str:
        return (
            f"CSRBatch(cells={len(self)}, nnz={self.nnz}, n_genes={self.n_genes}, "
            f"dtype={self.values.dtype}, obs={list(self.obs)})"
        )

    # ---- converters ---------------------------------------------------------------------
    def _map(self, fn: Any) -> CSRBatch:
        return CSRBatch(
            fn(self.indptr), fn(self.indices), fn(self.values), fn(self.cell_ids), self.n_genes,
            _map_columns(self._obs, fn), _map_columns(self._stats, fn),
        )

    def clone(self) -> CSRBatch:
        """A deep copy whose tensors own writable memory."""
        return self._map(torch.clone)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> CSRBatch:
        """The batch with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CSRBatch:
        """The batch in page-locked memory; unchanged when no CUDA device is available."""
        if not torch.cuda.is_available():
            return self
        return self._map(torch.Tensor.pin_memory)

    def to_sparse_csr(self) -> torch.Tensor:
        """A ``torch.sparse_csr_tensor`` of shape ``(cells, n_genes)`` sharing ``values``."""
        if self.nnz < 2**31:
            crow, col = self.indptr.to(torch.int32), self.indices
        else:
            crow, col = self.indptr, self.indices.to(torch.int64)
        # the format guarantees the invariants (sorted, in range): skip the O(nnz) check
        return _quiet_once(
            "Sparse CSR tensor support is in beta state", torch.sparse_csr_tensor,
            crow, col, self.values, size=self.shape, check_invariants=False,
        )

    def _on_cpu(self) -> bool:
        return self.values.device.type == "cpu"

    def _cpu_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.indptr.numpy(), self.indices.numpy(), self.values.numpy()

    def _fused(self, preprocessing: Any, genes: Any) -> dict[str, Any]:
        """Keyword arguments of the fused preprocessing for :mod:`scmf_loader.outputs`."""
        kw: dict[str, Any] = {"genes": None if genes is None else np.asarray(genes)}
        if preprocessing is not None:
            dtype = np.float64 if self.values.dtype == torch.float64 else np.float32
            kw["divisors"] = preprocessing.divisors_for(self.stats, dtype)
            kw["log1p"] = bool(preprocessing.log1p)
        return kw

    def to_dense(
        self, dtype: torch.dtype | None = None, *, preprocessing: Any = None, genes: Any = None
    ) -> torch.Tensor:
        """A dense ``(cells, n_genes)`` matrix (``values``' dtype unless ``dtype`` is given;
        the compute dtype with ``preprocessing``). ``preprocessing`` (a
        :class:`~scmf_loader.preprocess.PreprocessingPipeline`: its per-cell divisors and
        ``log1p``) and ``genes`` (token ids: only their columns, in that order) are fused
        into the kernel (:mod:`scmf_loader.outputs`)."""
        if not self._on_cpu():
            if preprocessing is None and genes is None:
                dtype = dtype or self.values.dtype
                out = torch.zeros(self.shape, dtype=dtype, device=self.values.device)
                rows = torch.repeat_interleave(torch.arange(len(self), device=out.device), self.lengths())
                out[rows, self.indices.long()] = self.values.to(dtype)
                return out
            return self.to("cpu").to_dense(dtype, preprocessing=preprocessing, genes=genes).to(self.values.device)
        np_dtype = None
        if dtype is not None:
            try:
                np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            except TypeError:  # a torch dtype numpy lacks (bfloat16): through float32
                return self.to_dense(torch.float32, preprocessing=preprocessing, genes=genes).to(dtype)
        return torch.from_numpy(outputs.dense(*self._cpu_arrays(), self.n_genes, dtype=np_dtype,
                                              **self._fused(preprocessing, genes)))

    def preprocessed(self, pipeline: Any) -> CSRBatch:
        """The batch with its values through ``pipeline`` (a
        :class:`~scmf_loader.preprocess.PreprocessingPipeline`: per-cell divisors, ``log1p``):
        ``pipeline.apply_batch``'s numbers, in one pass that reads and writes each value once
        (:func:`scmf_loader.outputs.preprocess`); a shallow copy, this batch is untouched.
        Falls back to ``apply_batch`` off the CPU or for other pipelines."""
        if not getattr(pipeline, "transforms_values", False):
            return pipeline.apply_batch(self) if hasattr(pipeline, "apply_batch") else pipeline(self)
        if not self._on_cpu() or not hasattr(pipeline, "divisors_for"):
            return pipeline.apply_batch(self)
        kw = self._fused(pipeline, None)
        values = outputs.preprocess(self.indptr.numpy(), self.values.numpy(), kw["divisors"], kw["log1p"])
        return CSRBatch(self.indptr, self.indices, torch.from_numpy(values), self.cell_ids, self.n_genes,
                        self._obs, self._stats)

    def _on_device(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return out if self._on_cpu() else {k: v.to(self.values.device) for k, v in out.items()}

    def to_padded(
        self,
        max_genes: int | None = None,
        add_cls: bool = True,
        truncation: str = "top",
        generator: torch.Generator | None = None,
        *,
        preprocessing: Any = None,
        genes: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Padded token batch: ``gene_indices`` (int64), ``expression`` (float32) and
        ``attention_mask`` (bool), each ``(cells, L)``.

        Genes keep their vocabulary order; padding uses the ``<pad>`` id 0 with expression 0.
        ``L`` is ``max_genes`` when given (a fixed shape), else the longest cell; with
        ``add_cls`` a ``<cls>`` token (id 3, expression 0) comes first and ``L`` grows by
        one. A cell with more than ``max_genes`` genes keeps its highest-expressed ones
        (``truncation="top"``, ties to the lower gene id) or a uniform random subset
        (``"random"``, seeded by one draw from ``generator``). ``preprocessing`` and
        ``genes`` are fused as in :meth:`to_dense`. Computed on the CPU by
        :func:`scmf_loader.outputs.padded` (the result is moved back to the batch's device).
        """
        if truncation not in TRUNCATIONS:
            raise ConfigurationError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if max_genes is not None and max_genes < 1:
            raise ConfigurationError(f"max_genes must be >= 1, got {max_genes}")
        b = self if self._on_cpu() else self.to("cpu")
        out = outputs.padded(*b._cpu_arrays(), self.n_genes, max_genes=max_genes, add_cls=add_cls,
                             truncation=truncation, seed=_seed(truncation, generator),
                             **b._fused(preprocessing, genes))
        return self._on_device({k: torch.from_numpy(v) for k, v in out.items()})

    def to_rank(
        self,
        medians: Any,
        max_genes: int | None = None,
        add_cls: bool = True,
        *,
        preprocessing: Any = None,
        genes: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Geneformer rank-value tokens: ``gene_indices`` (int64) and ``attention_mask``
        (bool). Each non-zero value is divided by its gene's non-zero median (``medians``:
        one float32 per token, e.g. :attr:`CellDataset.gene_nonzero_median`); genes are
        ordered by that ratio, highest first (ties: the lower gene id), the first
        ``max_genes`` kept; ``<cls>`` first with ``add_cls``. See
        :func:`scmf_loader.outputs.rank`."""
        b = self if self._on_cpu() else self.to("cpu")
        out = outputs.rank(*b._cpu_arrays(), self.n_genes, medians, max_genes=max_genes, add_cls=add_cls,
                           **b._fused(preprocessing, genes))
        return self._on_device({k: torch.from_numpy(v) for k, v in out.items()})

    def to_binned(
        self,
        n_bins: int = 51,
        max_genes: int | None = None,
        add_cls: bool = True,
        truncation: str = "top",
        generator: torch.Generator | None = None,
        *,
        preprocessing: Any = None,
        genes: Any = None,
    ) -> dict[str, torch.Tensor]:
        """scGPT value bins in the :meth:`to_padded` layout: ``expression`` is the int64 bin
        (1..n_bins-1 for non-zeros from per-cell quantiles of the non-zero values, 0 for
        padding). The exact rule: :func:`scmf_loader.outputs.binned`."""
        b = self if self._on_cpu() else self.to("cpu")
        out = outputs.binned(*b._cpu_arrays(), self.n_genes, n_bins=n_bins, max_genes=max_genes, add_cls=add_cls,
                             truncation=truncation, seed=_seed(truncation, generator),
                             **b._fused(preprocessing, genes))
        return self._on_device({k: torch.from_numpy(v) for k, v in out.items()})


def _seed(truncation: str, generator: torch.Generator | None) -> int:
    """One draw from ``generator`` for random truncation (0 otherwise: unused)."""
    if truncation != "random":
        return 0
    return int(torch.randint(0, 2**62, (1,), generator=generator))
