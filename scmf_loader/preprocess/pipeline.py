"""``PreprocessingPipeline``: normalisation, ``log1p`` and a highly-variable-gene subset.

The same arithmetic (:mod:`scmf_loader.preprocess.transform`) runs in three places and gives
the same numbers in each:

* in memory, on a dense cells × genes array (:meth:`PreprocessingPipeline.__call__`), the
  seed's interface; numerically what ``scanpy.pp.normalize_total`` + ``scanpy.pp.log1p``
  (+ ``scanpy.pp.highly_variable_genes``) give on the same data;
* in the converter, on every read chunk, when preprocessing is *baked* into the shards;
* in the loader, on every CSR batch of raw counts (:meth:`PreprocessingPipeline.apply_batch`),
  when it is not baked, from the per-cell ``library_size`` / ``size_factor`` stored with the
  cells.

On CPU tensors the numpy kernels run on the same memory (zero copy), so baked and on-the-fly
batches are bit-identical; on other devices the same operations run in torch (equal to within
one float32 ulp). Fitting in memory (:meth:`PreprocessingPipeline.fit`) uses
:mod:`scmf_loader.preprocess.hvg` and :mod:`scmf_loader.preprocess.scran`; the converter's
out-of-core fitting passes feed the same selection functions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scmf_loader.errors import ConfigurationError, InvalidInputError
from scmf_loader.preprocess.hvg import highly_variable_genes
from scmf_loader.preprocess.schema import (
    CELL_STAT_OF,
    HVG_FLAVORS,
    INFO_KEYS,
    NORMALIZE_METHODS,
    PIPELINE_KEYS,
)
from scmf_loader.preprocess.scran import scran_size_factors
from scmf_loader.preprocess.transform import (
    cell_divisors,
    check_counts,
    compute_dtype,
    is_tensor,
    torch_transform,
    transform_values,
)

__all__ = ["PreprocessingPipeline"]


# ---- the pipeline --------------------------------------------------------------------------
def _parse_normalize(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    if value not in NORMALIZE_METHODS:
        raise ConfigurationError(
            f"normalize must be one of {[*NORMALIZE_METHODS, None]}, got {value!r}"
        )
    return str(value)


def _parse_target_sum(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigurationError(f"target_sum must be a positive number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ConfigurationError(f"target_sum must be a positive number, got {value!r}")
    return v


def _parse_hvg(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigurationError(f"hvg_selection must be a positive integer or None, got {value!r}")
    if value < 1:
        raise ConfigurationError(f"hvg_selection must be >= 1, got {value}")
    return int(value)


class PreprocessingPipeline:
    """Configurable preprocessing applied on the fly (per batch) or baked at conversion.

    ``normalize``: ``"library_size"`` (scale every cell to ``target_sum`` counts, scanpy's
    ``normalize_total``), ``"scran"`` (divide by pooled size factors, Lun et al. 2016; centred
    to mean one; ``target_sum`` unused) or None. ``log1p``: natural ``log(1 + x)`` afterwards.
    ``hvg_selection``: keep that many highly variable genes (scanpy's
    ``highly_variable_genes(n_top_genes=...)``) of flavor ``hvg_flavor`` (``"seurat"``,
    ``"cell_ranger"`` on the normalised values, ``"seurat_v3"`` on the counts), per batch of
    ``hvg_batch_key`` when given. ``assume_normalized``: the input is already normalised: it
    is not checked for counts and not normalised again (``normalize`` becomes None).
    ``hvg_genes``: the fitted selection (gene names), set by :meth:`fit` or by a converter.
    """

    def __init__(
        self,
        normalize: str | None = "library_size",
        target_sum: float | None = 1e4,
        hvg_selection: int | None = None,
        log1p: bool = True,
        *,
        hvg_flavor: str = "seurat",
        hvg_batch_key: str | None = None,
        assume_normalized: bool = False,
        hvg_genes: Sequence[str] | None = None,
    ) -> None:
        self.normalize = _parse_normalize(normalize)
        self.target_sum = _parse_target_sum(1e4 if target_sum is None else target_sum)
        if target_sum is None and self.normalize == "library_size":
            raise ConfigurationError(
                "target_sum=None (scanpy's per-dataset median) is not supported; give a number"
            )
        self.hvg_selection = _parse_hvg(hvg_selection)
        if not isinstance(log1p, (bool, np.bool_)):
            raise ConfigurationError(f"log1p must be true or false, got {log1p!r}")
        self.log1p = bool(log1p)
        if hvg_flavor not in HVG_FLAVORS:
            raise ConfigurationError(f"hvg_flavor must be one of {HVG_FLAVORS}, got {hvg_flavor!r}")
        self.hvg_flavor = str(hvg_flavor)
        if hvg_batch_key is not None and (not isinstance(hvg_batch_key, str) or not hvg_batch_key):
            raise ConfigurationError(f"hvg_batch_key must be a non-empty string, got {hvg_batch_key!r}")
        if hvg_batch_key is not None and self.hvg_selection is None:
            raise ConfigurationError("hvg_batch_key is given but hvg_selection is not")
        self.hvg_batch_key = hvg_batch_key
        if not isinstance(assume_normalized, (bool, np.bool_)):
            raise ConfigurationError(f"assume_normalized must be true or false, got {assume_normalized!r}")
        self.assume_normalized = bool(assume_normalized)
        if self.assume_normalized:
            self.normalize = None
        if hvg_genes is not None:
            if isinstance(hvg_genes, str) or not all(isinstance(g, str) for g in hvg_genes):
                raise ConfigurationError("hvg_genes must be a list of gene names")
            if self.hvg_selection is None:
                raise ConfigurationError("hvg_genes is given but hvg_selection is not")
        self.hvg_genes: tuple[str, ...] | None = None if hvg_genes is None else tuple(hvg_genes)

    # ---- description --------------------------------------------------------------------
    @property
    def cell_stat(self) -> str | None:
        """The per-cell statistic normalisation divides by (``library_size``,
        ``size_factor``) or None."""
        return CELL_STAT_OF.get(self.normalize) if self.normalize else None

    @property
    def is_fitted(self) -> bool:
        """True when nothing needs fitting (no HVG selection, or HVGs already chosen)."""
        return self.hvg_selection is None or self.hvg_genes is not None

    @property
    def transforms_values(self) -> bool:
        """True when the pipeline changes values (normalisation or log1p)."""
        return self.normalize is not None or self.log1p

    def to_dict(self) -> dict[str, Any]:
        """The full configuration (and fitted genes) as a JSON-ready dict."""
        return {
            "normalize": self.normalize,
            "target_sum": self.target_sum,
            "log1p": self.log1p,
            "hvg_selection": self.hvg_selection,
            "hvg_flavor": self.hvg_flavor,
            "hvg_batch_key": self.hvg_batch_key,
            "assume_normalized": self.assume_normalized,
            "hvg_genes": None if self.hvg_genes is None else list(self.hvg_genes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessingPipeline:
        """Rebuild a pipeline from :meth:`to_dict` output or a manifest's ``preprocessing``
        (informational keys such as ``baked`` are ignored; unknown keys are an error)."""
        if not isinstance(d, Mapping):
            raise ConfigurationError(f"preprocessing must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(PIPELINE_KEYS) - set(INFO_KEYS))
        if unknown:
            raise ConfigurationError(f"unknown preprocessing key(s) {unknown}; known: {list(PIPELINE_KEYS)}")
        return cls(**{k: d[k] for k in PIPELINE_KEYS if k in d})

    @classmethod
    def for_loader(cls, preprocessing: Mapping[str, Any]) -> PreprocessingPipeline | None:
        """The pipeline the loader must apply per batch for a manifest's ``preprocessing``
        dict: None when the shards already hold final values (baked, or nothing to do)."""
        if not preprocessing or preprocessing.get("baked", True):
            return None
        pipe = cls.from_dict(preprocessing)
        return pipe if pipe.transforms_values else None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "hvg_genes")
        n = "unfitted" if self.hvg_genes is None else f"{len(self.hvg_genes)} genes"
        return f"PreprocessingPipeline({args}, hvg_genes=<{n}>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PreprocessingPipeline) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    # ---- in memory ----------------------------------------------------------------------
    def _check_hvg_request(self, n_genes: int, batch_labels: Any) -> None:
        if self.hvg_selection is not None and self.hvg_genes is None:
            if self.hvg_selection > n_genes:
                raise ConfigurationError(
                    f"hvg_selection={self.hvg_selection} but the data has only {n_genes} genes"
                )
            if self.hvg_batch_key is not None and batch_labels is None:
                raise ConfigurationError(
                    f"hvg_batch_key={self.hvg_batch_key!r}: pass batch_labels (one per cell)"
                )

    def normalize_dense(
        self, expression: np.ndarray, size_factors: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalise (and log1p) a dense cells × genes array; a new array in the compute
        dtype. ``size_factors`` overrides the computed scran factors."""
        x = np.asarray(expression)
        if x.ndim != 2:
            raise InvalidInputError(f"expression must be a 2-d cells × genes array, got shape {x.shape}")
        if self.normalize is not None:
            check_counts(x, "expression")
        dt = compute_dtype(x.dtype)
        out = np.array(x, dtype=dt, copy=True)
        if self.normalize is not None:
            if self.normalize == "library_size":
                stat = x.sum(axis=1, dtype=np.float64)
            elif size_factors is not None:
                stat = np.asarray(size_factors, dtype=np.float64)
            else:
                stat = scran_size_factors(x)
            div = cell_divisors(stat, normalize=self.normalize, target_sum=self.target_sum, dtype=dt)
            np.divide(out, div[:, None], out=out)
        if self.log1p:
            np.log1p(out, out=out)
        return out

    def fit(
        self,
        expression: np.ndarray,
        gene_names: Sequence[str] | np.ndarray,
        batch_labels: Sequence[Any] | np.ndarray | None = None,
    ) -> PreprocessingPipeline:
        """Choose the highly variable genes of ``expression`` (raw input, cells × genes) in
        memory; sets :attr:`hvg_genes` and returns ``self``."""
        x = np.asarray(expression)
        names = np.asarray(gene_names, dtype=object)
        if x.ndim != 2 or x.shape[1] != len(names):
            raise InvalidInputError(
                f"expression has shape {x.shape} but {len(names)} gene names were given"
            )
        if self.hvg_selection is None:
            return self
        self._check_hvg_request(x.shape[1], batch_labels)
        processed = x if self.hvg_flavor == "seurat_v3" else self.normalize_dense(x)
        self.hvg_genes = tuple(str(g) for g in names[self._select(processed, names, batch_labels)])
        return self

    def _select(self, processed: np.ndarray, names: np.ndarray, batch_labels: Any) -> np.ndarray:
        result = highly_variable_genes(
            processed, n_top_genes=int(self.hvg_selection or 0), flavor=self.hvg_flavor,
            batch_labels=batch_labels, gene_names=[str(g) for g in names],
        )
        return np.flatnonzero(result.highly_variable)

    def __call__(
        self,
        expression: np.ndarray,
        gene_names: Sequence[str] | np.ndarray,
        batch_labels: Sequence[Any] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply preprocessing to a dense cells × genes array of raw counts. Returns
        ``(processed_expression, kept_gene_names)``. HVGs are fitted on this data first when
        ``hvg_selection`` is set and the pipeline is not fitted yet (``batch_labels``: one
        label per cell, needed with ``hvg_batch_key``)."""
        x = np.asarray(expression)
        names = np.asarray(gene_names, dtype=object)
        if x.ndim != 2 or x.shape[1] != len(names):
            raise InvalidInputError(
                f"expression has shape {x.shape} but {len(names)} gene names were given"
            )
        self._check_hvg_request(x.shape[1], batch_labels)
        out = self.normalize_dense(x)
        if self.hvg_selection is None:
            return out, names
        if self.hvg_genes is None:
            processed = x if self.hvg_flavor == "seurat_v3" else out
            self.hvg_genes = tuple(str(g) for g in names[self._select(processed, names, batch_labels)])
        chosen = set(self.hvg_genes)
        keep = np.fromiter((str(g) in chosen for g in names), dtype=bool, count=len(names))
        return out[:, keep], names[keep]

    # ---- per batch (the loader) ---------------------------------------------------------
    def divisors_for(self, stats: Mapping[str, Any], dtype: Any) -> np.ndarray | None:
        """Per-cell divisors from a mapping of per-cell statistics (numpy arrays or tensors),
        or None when the pipeline does not normalise."""
        if self.normalize is None:
            return None
        name = CELL_STAT_OF[self.normalize]
        if name not in stats:
            raise ConfigurationError(
                f"normalize={self.normalize!r} needs the per-cell {name!r}, which the batch lacks "
                f"(it has {sorted(stats)}); was the dataset converted with this normalisation?"
            )
        stat = stats[name]
        if is_tensor(stat):
            stat = stat.detach().cpu().numpy()
        return cell_divisors(stat, normalize=self.normalize, target_sum=self.target_sum, dtype=dtype)

    def apply_values(
        self, values: Any, indptr: Any, stats: Mapping[str, Any]
    ) -> Any:
        """Transform the non-zeros of a CSR batch given as arrays: ``values`` and ``indptr``
        (numpy arrays or torch tensors) and ``stats`` (per-cell ``library_size`` /
        ``size_factor``). Returns a new array of the same kind (float32, or float64 for
        float64 input)."""
        if is_tensor(values):
            import torch

            dt = compute_dtype(torch.empty(0, dtype=values.dtype).numpy().dtype)
            div = self.divisors_for(stats, dt)
            if values.device.type == "cpu":
                ip = indptr.numpy() if is_tensor(indptr) else np.asarray(indptr)
                return torch.from_numpy(transform_values(values.numpy(), ip, div, self.log1p, dt))
            ip_t = indptr if is_tensor(indptr) else torch.as_tensor(indptr)
            return torch_transform(values, ip_t, div, self.log1p, dt)
        v = np.asarray(values)
        dt = compute_dtype(v.dtype)
        return transform_values(v, np.asarray(indptr), self.divisors_for(stats, dt), self.log1p, dt)

    def apply_batch(self, batch: Any) -> Any:
        """The batch with its values preprocessed (a shallow copy; the input is untouched).

        ``batch`` is a :class:`~scmf_loader.batch.CSRBatch` (or any object with ``indptr``,
        ``values`` and a ``stats`` mapping of per-cell tensors) holding raw counts over the
        genes the shards store; HVG restriction already happened at conversion.
        """
        if not self.transforms_values:
            return batch
        new_values = self.apply_values(batch.values, batch.indptr, getattr(batch, "stats", {}))
        out = copy.copy(batch)
        out.values = new_values
        return out
