"""The one integrity checker of a dataset directory.

Used by ``open_dataset`` (sizes and the vocabulary on open; structure on a shard's first
map), ``open_dataset(verify=True)`` and ``scmf-convert verify`` (every checksum and the full
structure) and the converter's resume (:func:`shard_ok`). Every check raises the
:class:`~scmf_loader.errors.ScmfError` subclass that matches its cause, naming the file:

- :class:`~scmf_loader.errors.ShardNotFoundError`: a shard or array file is missing;
- :class:`~scmf_loader.errors.ShardSizeError`: a file's size differs from the manifest;
- :class:`~scmf_loader.errors.ChecksumMismatchError`: a file's bytes differ from the manifest;
- :class:`~scmf_loader.errors.ShardCorruptError`: sizes and (where checked) checksums agree
  but the content breaks the format (``indptr`` not monotone from 0 to ``nnz``, indices out
  of range, special tokens or unsorted, values not finite / negative / not counts where the
  manifest says so, per-cell statistics inconsistent, obs codes outside their categories,
  zarr metadata disagreeing with the manifest); it names the shard, array and first bad position;
- :class:`~scmf_loader.errors.ManifestError`: the manifest contradicts itself.

Cost: ``level="size"`` is one ``stat`` per file; :func:`check_csr_structure` is O(cells)
unless ``full=True`` (O(nnz), bounded memory); :func:`check_shard_on_map` adds one vectorised
pass over ``indices``; ``level="checksum"`` reads every byte.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from scmf_loader.errors import (
    ChecksumMismatchError,
    ManifestError,
    ScmfError,
    ShardCorruptError,
    ShardNotFoundError,
    ShardSizeError,
)
from scmf_loader.format._common import file_checksum
from scmf_loader.format.manifest import Manifest
from scmf_loader.format.shard import (
    ARRAY_NAMES,
    ShardArrays,
    ShardEntry,
    array_dtypes,
    array_nbytes,
    map_csr,
    other_files_digest,
    read_obs_codes,
    read_obs_values,
    read_x_metadata,
)
from scmf_loader.vocab import SPECIAL_TOKENS, GeneVocab

__all__ = [
    "Level",
    "ValueRules",
    "check_csr_structure",
    "check_dataset",
    "check_index_range",
    "check_manifest_arrays",
    "check_obs_codes",
    "check_shard",
    "check_shard_on_map",
    "check_shard_structure",
    "check_vocab",
    "check_x_metadata",
    "iter_problems",
    "shard_ok",
    "value_rules",
]

Level = Literal["size", "checksum"]
_BLOCK_NNZ = 1 << 22  # the full index check reads at most this many indices at a time


def check_manifest_arrays(manifest: Manifest, where: str | os.PathLike[str]) -> None:
    """Every array entry must agree with its shard's cell and non-zero counts and with the
    format's dtypes (no I/O)."""
    expected = array_dtypes(manifest.dtype)
    for i, shard in enumerate(manifest.shards):
        sizes = array_nbytes(shard.n_cells, shard.nnz, manifest.dtype)
        for name in ARRAY_NAMES:
            entry = shard.arrays[name]
            if entry.dtype != expected[name] or entry.nbytes != sizes[name]:
                raise ManifestError(
                    f"{where}: shards[{i}] ({shard.path}) array {name!r} is listed as "
                    f"{entry.nbytes} bytes of {entry.dtype}; expected {sizes[name]} bytes of "
                    f"{expected[name]} for {shard.n_cells} cells and {shard.nnz} non-zeros"
                )


def check_vocab(dataset_dir: str | os.PathLike[str], manifest: Manifest) -> GeneVocab:
    """Load the vocabulary and check it against the manifest: ``n_genes`` tokens and THE
    vocabulary hash, ``vocab.sha256`` (content of tokens and symbols). Returns the
    :class:`~scmf_loader.vocab.GeneVocab`."""
    path = Path(dataset_dir) / manifest.vocab["path"]
    vocab = GeneVocab.from_file(path)
    if len(vocab) != manifest.n_genes:
        raise ManifestError(
            f"{path}: vocabulary has {len(vocab)} tokens but the manifest says n_genes={manifest.n_genes}"
        )
    expected = manifest.vocab.get("sha256")
    if expected is not None and vocab.sha256() != expected:
        raise ChecksumMismatchError(
            f"{path}: checksum mismatch: vocabulary hash {vocab.sha256()} differs from the "
            f"manifest's {expected}; the dataset was modified: re-convert it"
        )
    return vocab


def _label(entry: ShardEntry, index: int | None) -> str:
    return f"shard {index} ({entry.path})" if index is not None else f"shard {entry.path}"


def _check_sizes(base: Path, entry: ShardEntry, label: str) -> None:
    for name in ARRAY_NAMES:
        a = entry.arrays[name]
        f = base / a.path
        try:
            size = os.stat(f).st_size
        except FileNotFoundError:
            if a.nbytes == 0:
                continue  # an empty array MAY have no file
            raise ShardNotFoundError(f"{f}: array file {name} of {label} is missing") from None
        if size != a.nbytes:
            what = "shorter" if size < a.nbytes else "longer"
            raise ShardSizeError(
                f"{f}: {size} bytes, {what} than the {a.nbytes} bytes the manifest says for "
                f"{name} of {label} (truncated copy or modified file); re-copy or re-convert"
            )


def _check_checksums(base: Path, entry: ShardEntry, label: str) -> None:
    for name in ARRAY_NAMES:
        a = entry.arrays[name]
        if a.nbytes == 0:
            continue
        f = base / a.path
        for algorithm, expected in a.checksums.items():  # sha256 (v1), xxh3_128 (v2)
            digest = file_checksum(f, algorithm)
            if digest != expected:
                raise ChecksumMismatchError(
                    f"{f}: checksum mismatch in {name} of {label}: {algorithm} {digest} differs "
                    f"from the manifest's {expected}; the file is corrupt: re-copy or re-convert"
                )
    if entry.other_files is not None:
        found = other_files_digest(base)
        if found != entry.other_files:
            raise ChecksumMismatchError(
                f"{base}: obs/var/zarr metadata differ from the manifest ({label}: found "
                f"{found.n_files} files, {found.nbytes} bytes, sha256 {found.sha256[:12]}…; "
                f"expected {entry.other_files.n_files} files, {entry.other_files.nbytes} "
                f"bytes, sha256 {entry.other_files.sha256[:12]}…): re-copy or re-convert"
            )


def check_shard(
    dataset_dir: str | os.PathLike[str], entry: ShardEntry, level: Level = "size",
    *, index: int | None = None,
) -> None:
    """Check one shard's files against its manifest entry: present and of the listed sizes
    (``level="size"``, one ``stat`` each), and also every checksum (sha256 in v1, xxh3_128
    in v2) and the digest of its other files (``level="checksum"``, reads everything).
    ``index`` names the shard in messages."""
    if level not in ("size", "checksum"):
        raise ValueError(f"level must be 'size' or 'checksum', got {level!r}")
    base = Path(dataset_dir) / entry.path
    label = _label(entry, index)
    if not base.is_dir():
        raise ShardNotFoundError(
            f"{base}: missing shard: {label} is listed in the manifest but absent; the "
            "dataset is incomplete (copy it again or re-run the conversion)"
        )
    _check_sizes(base, entry, label)
    if level == "checksum":
        _check_checksums(base, entry, label)


def shard_ok(out_dir: str | os.PathLike[str], entry: ShardEntry) -> bool:
    """Whether a shard already on disk is exactly the one ``entry`` describes (every size,
    sha256 and the other-files digest): the converter's test for reusing it on resume."""
    try:
        check_shard(out_dir, entry, "checksum")
    except (ScmfError, OSError):
        return False
    return True


def _first(mask: np.ndarray) -> int | None:
    bad = np.flatnonzero(mask)
    return int(bad[0]) if bad.size else None


def _check_indptr(where: str, indptr: np.ndarray, nnz: int) -> None:
    """O(cells): starts at 0, never decreases, ends at ``nnz``."""
    if indptr.size == 0:
        raise ShardCorruptError(f"{where}: X/indptr is empty; it must hold n_cells + 1 entries")
    if indptr[0] != 0:
        raise ShardCorruptError(f"{where}: X/indptr[0] is {int(indptr[0])}; it must be 0")
    pos = _first(indptr[1:] < indptr[:-1])
    if pos is not None:
        raise ShardCorruptError(
            f"{where}: X/indptr decreases at position {pos + 1} ({int(indptr[pos])} then "
            f"{int(indptr[pos + 1])}); it must be non-decreasing"
        )
    if indptr[-1] != nnz:
        raise ShardCorruptError(
            f"{where}: X/indptr ends at {int(indptr[-1])} (position {indptr.size - 1}); the "
            f"manifest says nnz={nnz}"
        )


def _check_index_block(where: str, indptr: np.ndarray, indices: np.ndarray, rows: tuple[int, int],
                       n_genes: int, first_gene: int = 0) -> None:
    lo, hi = int(indptr[rows[0]]), int(indptr[rows[1]])
    block = indices[lo:hi]
    pos = _first((block < first_gene) | (block >= n_genes))
    if pos is not None:
        value = int(block[pos])
        if 0 <= value < first_gene:
            raise ShardCorruptError(
                f"{where}: X/indices[{lo + pos}] is {value}, a special token (ids 0-{first_gene - 1}: "
                f"<pad>, <unk>, <mask>, <cls>); stored genes have ids in [{first_gene}, {n_genes})"
            )
        raise ShardCorruptError(f"{where}: X/indices[{lo + pos}] is {value}, outside the vocabulary [0, {n_genes})")
    down = np.diff(block) <= 0  # True where an index does not increase
    starts = indptr[rows[0] + 1:rows[1]] - lo  # a new row may restart lower
    down[starts[(starts > 0) & (starts < block.size)] - 1] = False
    pos = _first(down)
    if pos is not None:
        at = lo + pos + 1
        row = int(np.searchsorted(indptr, at, side="right")) - 1
        raise ShardCorruptError(
            f"{where}: X/indices are not strictly increasing in row {row} at X/indices[{at}] "
            f"({int(block[pos])} then {int(block[pos + 1])})"
        )


class ValueRules(NamedTuple):
    """What a manifest says about its stored values (see :func:`value_rules`)."""

    nonneg: bool  # no value may be negative
    counts: bool  # every value is an integer (raw counts)
    sums: str | None  # "eq": library_size == the row sum; "ge": >= it; None: unrelated
    why: str  # the manifest's reason, for messages


#: sources whose per-cell library_size the converter computes from the very rows it stores
_ROW_TOTAL_KINDS = ("h5ad", "anndata_zarr")
_SUM_RTOL = 1e-5


def value_rules(manifest: Manifest) -> ValueRules:
    """The value invariants of a dataset, from its ``preprocessing`` and ``sources``.

    Values are always finite. They are non-negative unless the manifest says
    ``assume_normalized`` without ``log1p`` (the one case the converter stores negative
    input). They are raw counts (integers) when a normalisation is recorded but not baked.
    Where the stored values are the input's own (nothing baked) and every source is an
    AnnData file, ``library_size`` is each cell's total over all its source's genes: equal
    to the row sum when no source gene was dropped and no HVG subset was kept, at least the
    row sum otherwise."""
    prep = manifest.preprocessing
    nonneg = not (prep.get("assume_normalized") and not prep.get("log1p", False))
    transformed = bool(prep.get("normalize")) or bool(prep.get("log1p"))
    baked = transformed and bool(prep.get("baked", True))
    counts = bool(prep.get("normalize")) and not baked
    why = (f"preprocessing normalize={prep.get('normalize')!r}, baked={bool(prep.get('baked', True))}"
           if counts else "preprocessing")
    sums = None
    kinds = {s.kind for s in manifest.sources}
    if "library_size" in manifest.cell_stats and not baked and nonneg and kinds and kinds <= set(_ROW_TOTAL_KINDS):
        whole = all(s.genes_dropped == 0 for s in manifest.sources) and not prep.get("hvg_genes")
        sums = "eq" if whole else "ge"
    return ValueRules(nonneg=nonneg, counts=counts, sums=sums, why=why)


def _check_value_block(where: str, indptr: np.ndarray, data: np.ndarray, rows: tuple[int, int],
                       rules: ValueRules, sums: np.ndarray | None) -> None:
    lo, hi = int(indptr[rows[0]]), int(indptr[rows[1]])
    block = data[lo:hi]
    checks = [(~np.isfinite(block), "not finite")] if block.dtype.kind == "f" else []
    if rules.nonneg and block.dtype.kind != "u":
        checks.append((block < 0, "negative; stored values MUST be >= 0 (no assume_normalized without log1p)"))
    if rules.counts and block.dtype.kind == "f":
        checks.append((block != np.floor(block), f"not an integer; the manifest says raw counts ({rules.why})"))
    for mask, what in checks:
        pos = _first(mask)
        if pos is not None:
            raise ShardCorruptError(f"{where}: X/data[{lo + pos}] is {block[pos].item()!r}: {what}")
    if sums is not None:
        total = np.zeros(block.size + 1, dtype=np.float64)
        np.cumsum(block, dtype=np.float64, out=total[1:])
        starts = indptr[rows[0]:rows[1] + 1] - lo
        sums[rows[0]:rows[1]] = total[starts[1:]] - total[starts[:-1]]


def _check_stats(where: str, n_cells: int, rules: ValueRules, stats: Mapping[str, np.ndarray],
                 sums: np.ndarray | None) -> None:
    """Per-cell statistics: one finite value per cell, non-negative where the values are,
    ``library_size`` consistent with the row sums where :func:`value_rules` says."""
    for name, column in stats.items():
        v = np.asarray(column)
        if v.shape != (n_cells,):
            raise ShardCorruptError(f"{where}: obs/{name} holds {v.shape} values; the shard has {n_cells} cells")
        if v.dtype.kind not in "iuf":
            raise ShardCorruptError(f"{where}: obs/{name} has dtype {v.dtype}; per-cell statistics are numbers")
        pos = _first(~np.isfinite(v) | ((v < 0) if rules.nonneg else False))
        if pos is not None:
            raise ShardCorruptError(f"{where}: obs/{name}[{pos}] is {v[pos].item()!r}; it must be finite and >= 0")
    if sums is None or "library_size" not in stats:
        return
    lib = np.asarray(stats["library_size"], dtype=np.float64)
    tol = _SUM_RTOL * np.maximum(np.abs(lib), np.abs(sums)) + 1e-6
    bad = (np.abs(lib - sums) > tol) if rules.sums == "eq" else (sums > lib + tol)
    pos = _first(bad)
    if pos is not None:
        rel = "equal to" if rules.sums == "eq" else "at least"
        raise ShardCorruptError(
            f"{where}: obs/library_size[{pos}] is {float(lib[pos])!r} but row {pos} of X/data sums to "
            f"{float(sums[pos])!r}; the library size of stored raw values MUST be {rel} the row sum "
            "(corrupt values or statistics)"
        )


def check_index_range(where: str, indices: np.ndarray, n_genes: int) -> None:
    """Every index must lie in ``[0, n_genes)``: one vectorised pass (the maximum of the
    indices read as unsigned, so a negative one counts as huge), in blocks of 4 Mi. The
    loader runs this once per shard and process, before any batch is cut from the shard."""
    for lo in range(0, len(indices), _BLOCK_NNZ):
        block = indices[lo:lo + _BLOCK_NNZ]
        if block.size and int(block.view(np.uint32).max()) >= n_genes:
            pos = _first((block < 0) | (block >= n_genes))
            raise ShardCorruptError(
                f"{where}: X/indices[{lo + pos}] is {int(block[pos])}, outside the vocabulary [0, {n_genes})"
            )


def check_shard_on_map(shard_dir: str | os.PathLike[str], entry: ShardEntry, arrays: ShardArrays,
                       n_genes: int, value_dtype: str) -> None:
    """The loader's check of a shard it has just mapped: the zarr metadata of ``X`` agrees
    with the manifest (four small files; skipped when ``X/zarr.json`` is absent, which the
    loader does not need and full checks report), ``indptr`` is sound (O(cells)) and every
    index is inside the vocabulary (one vectorised pass over ``indices``), so no batch cut
    from the shard can point outside it."""
    if (Path(shard_dir) / "X" / "zarr.json").exists():
        check_x_metadata(shard_dir, entry, n_genes, value_dtype)
    where = str(shard_dir)
    check_csr_structure(where, entry, arrays, n_genes)
    check_index_range(where, arrays.indices, n_genes)


def check_csr_structure(
    where: str, entry: ShardEntry, arrays: ShardArrays, n_genes: int, *, full: bool = False,
    first_gene: int = 0, values: ValueRules | None = None, stats: Mapping[str, np.ndarray] | None = None,
) -> None:
    """The CSR arrays of a shard must form a valid matrix of ``entry.n_cells`` rows and
    ``n_genes`` columns: lengths agree with the manifest and ``indptr`` runs from 0 to
    ``nnz`` without decreasing (O(cells)); with ``full``, also every index lies in
    ``[first_gene, n_genes)`` (``first_gene=4`` refuses the special tokens) and indices
    strictly increase within each row, and the values follow ``values`` (finite, and as the
    rules say non-negative, integral, summing per row to ``stats["library_size"]``) (O(nnz),
    read in blocks of at most 4 Mi entries). Raises ShardCorruptError naming the first bad
    position."""
    lengths = {"indptr": entry.n_cells + 1, "indices": entry.nnz, "data": entry.nnz}
    for name, n in lengths.items():
        found = len(getattr(arrays, name))
        if found != n:
            raise ShardCorruptError(f"{where}: X/{name} holds {found} entries; the manifest implies {n}")
    _check_indptr(where, arrays.indptr, entry.nnz)
    if not full:
        return
    indptr, row, n = arrays.indptr, 0, entry.n_cells
    sums = np.zeros(n, dtype=np.float64) if values is not None and values.sums else None
    while row < n:
        stop = int(np.searchsorted(indptr, indptr[row] + _BLOCK_NNZ, side="right")) - 1
        stop = min(max(stop, row + 1), n)
        _check_index_block(where, indptr, arrays.indices, (row, stop), n_genes, first_gene)
        if values is not None:
            _check_value_block(where, indptr, arrays.data, (row, stop), values, sums)
        row = stop
    if values is not None:
        _check_stats(where, entry.n_cells, values, stats or {}, sums)


def _check_array_metadata(where: str, name: str, meta: dict[str, Any], length: int, dtype: str) -> None:
    shape = meta.get("shape")
    if shape != [length]:
        raise ShardCorruptError(f"{where}: X/{name}/zarr.json says shape {shape}; the manifest implies [{length}]")
    if meta.get("data_type") != dtype:
        raise ShardCorruptError(
            f"{where}: X/{name}/zarr.json says data_type {meta.get('data_type')!r}; expected {dtype!r}"
        )
    chunks = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    codecs = [c.get("name") for c in meta.get("codecs", []) if isinstance(c, dict)]
    endian = [c.get("configuration", {}).get("endian", "little") for c in meta.get("codecs", [])
              if isinstance(c, dict) and c.get("name") == "bytes"]
    if (length and chunks != [length]) or codecs != ["bytes"] or endian != ["little"]:
        raise ShardCorruptError(
            f"{where}: X/{name}/zarr.json is not the raw layout (one chunk {chunks}, codecs "
            f"{codecs}, endian {endian}; expected one chunk [{length}], codecs ['bytes'], little endian)"
        )


def check_x_metadata(
    shard_dir: str | os.PathLike[str], entry: ShardEntry, n_genes: int, value_dtype: str
) -> None:
    """The zarr metadata of ``X`` must agree with the manifest: a ``csr_matrix`` of shape
    ``[n_cells, n_genes]`` whose three arrays have the listed lengths and dtypes, each in
    one uncompressed little-endian chunk (four small JSON files)."""
    where = f"{shard_dir}"
    meta = read_x_metadata(shard_dir)
    attrs = meta["X"].get("attributes", {})
    if attrs.get("encoding-type") != "csr_matrix":
        raise ShardCorruptError(
            f"{where}: X/zarr.json says encoding-type {attrs.get('encoding-type')!r}; expected 'csr_matrix'"
        )
    if attrs.get("shape") != [entry.n_cells, n_genes]:
        raise ShardCorruptError(
            f"{where}: X/zarr.json says shape {attrs.get('shape')}; the manifest says "
            f"[{entry.n_cells}, {n_genes}] (n_cells, n_genes)"
        )
    lengths = {"indptr": entry.n_cells + 1, "indices": entry.nnz, "data": entry.nnz}
    dtypes = array_dtypes(value_dtype)
    for name in ARRAY_NAMES:
        _check_array_metadata(where, name, meta[name], lengths[name], dtypes[name])


def check_obs_codes(where: str, column: str, codes: np.ndarray, n_categories: int) -> None:
    """Categorical codes must index the manifest's categories (``-1``: missing)."""
    pos = _first((codes < -1) | (codes >= n_categories))
    if pos is not None:
        raise ShardCorruptError(
            f"{where}: obs/{column}/codes[{pos}] is {int(codes[pos])}, outside the "
            f"{n_categories} categories the manifest lists (-1 means missing)"
        )


def check_shard_structure(dataset_dir: str | os.PathLike[str], manifest: Manifest, index: int) -> None:
    """The full structural check of shard ``index`` (reads all of it once): zarr metadata,
    CSR structure including every index (never a special token), the values and per-cell
    statistics (:func:`value_rules`), obs codes of every listed column."""
    entry = manifest.shards[index]
    shard_dir = Path(dataset_dir) / entry.path
    check_x_metadata(shard_dir, entry, manifest.n_genes, manifest.dtype)
    stats = {name: read_obs_values(shard_dir, name) for name in manifest.cell_stats}
    arrays = map_csr(shard_dir, entry, manifest.dtype)
    check_csr_structure(str(shard_dir), entry, arrays, manifest.n_genes, full=True,
                        first_gene=len(SPECIAL_TOKENS), values=value_rules(manifest), stats=stats)
    del arrays  # close the maps before the obs reads
    for column in manifest.obs_columns:
        codes = read_obs_codes(shard_dir, column.name)
        if len(codes) != entry.n_cells:
            raise ShardCorruptError(
                f"{shard_dir}: obs/{column.name}/codes holds {len(codes)} entries; the shard has "
                f"{entry.n_cells} cells"
            )
        check_obs_codes(str(shard_dir), column.name, codes, len(column.categories))


def iter_problems(
    dataset_dir: str | os.PathLike[str],
    manifest: Manifest,
    *,
    level: Level = "checksum",
    structure: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> Iterator[ScmfError]:
    """Check a whole dataset and yield one error per problem found: the vocabulary, then each
    shard (its first problem; a shard is checked no further once one is found).
    ``structure`` adds :func:`check_shard_structure` to shards whose files check out.
    ``progress(1)`` is called after each shard."""
    root = Path(dataset_dir)
    try:
        check_manifest_arrays(manifest, root)
        check_vocab(root, manifest)
    except ScmfError as exc:
        yield exc
    for i, entry in enumerate(manifest.shards):
        try:
            check_shard(root, entry, level, index=i)
            if structure:
                check_shard_structure(root, manifest, i)
        except ScmfError as exc:
            yield exc
        if progress is not None:
            progress(1)


def check_dataset(
    dataset_dir: str | os.PathLike[str], manifest: Manifest, *, level: Level = "checksum",
    structure: bool = True,
) -> None:
    """:func:`iter_problems`, raising the first problem found."""
    for problem in iter_problems(dataset_dir, manifest, level=level, structure=structure):
        raise problem
