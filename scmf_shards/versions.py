"""Dataset versions: append new inputs to a dataset without rewriting it; lineage and diff.

:func:`append_dataset` (``scmf-convert append BASE INPUTS... --output NEW``) makes ``NEW``
hold BASE's cells and the new ones:

- BASE's shards are reused unchanged and never written: ``NEW/shards/<name>.zarr`` is a
  relative symbolic link to BASE's shard (``link="symlink"``, the default: an explicit
  reference to the parent, no bytes copied), a tree of hard links (``"hard"``: same bytes,
  independent of BASE's directory entries) or a copy (``"copy"``). NEW's manifest lists
  them with BASE's checksums, under the same paths inside NEW (a manifest path never leaves
  its dataset directory).
- The new cells are aligned to BASE's vocabulary (its ``vocab.json``), preprocessed as BASE
  was (the same normalisation, ``log1p`` and ``bake``, computed per cell; HVGs selected on
  BASE's cells are BASE's choice for the new cells too: their other genes' non-zeros are
  dropped, as the converter does; scran size factors, fitted on all of BASE's cells
  together, are refused with the reason), shuffled among themselves with BASE's seed and
  shard size, and written as new shards after BASE's.
- The manifest records ``parent`` and ``lineage`` (``docs/format.md`` section 10); the
  content-defined ``dataset_id`` hashes the parent's id, the new inputs' own and the obs
  categories, which grow by appending (BASE's codes stay valid).

:func:`reference_problems` checks a child's reused shards (``scmf-convert verify``),
:func:`lineage` walks the chain, :func:`diff_datasets` compares two versions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scmf_loader.errors import (
    ConfigurationError,
    DatasetExistsError,
    InvalidInputError,
    ScmfError,
    VocabularyError,
)
from scmf_loader.format import (
    MANIFEST_NAME,
    Manifest,
    ObsColumn,
    ShardEntry,
    SourceEntry,
    compute_dataset_id,
    read_manifest,
    shard_relpath,
    write_manifest,
)
from scmf_loader.format.integrity import check_dataset
from scmf_loader.format.shard import map_csr, read_obs_codes, read_obs_index, read_obs_values
from scmf_loader.vocab import GeneVocab

__all__ = [
    "LINKS",
    "append_dataset",
    "diff_datasets",
    "format_diff",
    "format_lineage",
    "lineage",
    "reference_problems",
]

LINKS = ("symlink", "hard", "copy")
WORK_DIR = ".scmf-append"
_HVG_KEYS = ("hvg_selection", "hvg_flavor", "hvg_batch_key", "hvg_genes", "n_hvg_genes", "hvg")


def _raw(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest as JSON (for the ``parent``/``lineage`` keys)."""
    read_manifest(directory)  # validated first: a clear error for anything that is not a dataset
    return json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))


def _append_preprocessing(base: Manifest, where: str) -> dict[str, Any]:
    """The ``preprocessing`` options that process new cells as BASE's were, or a refusal."""
    p = dict(base.preprocessing)
    if p.get("normalize") is None and not p.get("log1p") and not p.get("hvg_selection") and not p.get("hvg"):
        return {}
    if p.get("normalize") == "scran" or p.get("scran"):
        raise ConfigurationError(
            f"{where}: was normalised with scran size factors, fitted on its own cells together; "
            "new cells cannot get factors on the same scale without refitting every cell. Convert "
            "all inputs anew"
        )
    out = {k: p[k] for k in ("target_sum", "log1p", "assume_normalized") if k in p}
    out["normalize"] = p.get("normalize") or "none"
    out["bake"] = bool(p.get("baked", True))
    return out


def _options(base: Manifest, base_dir: Path, **run: Any) -> Any:
    from scmf_shards.options import ConvertOptions

    shuffle = base.shuffle
    kept = [c for c in base.obs_column_names if c != "source"]
    return ConvertOptions(
        vocab=str(base_dir / base.vocab.path), obs_columns=tuple(kept),
        shard_size=shuffle.shard_size or ConvertOptions.default("shard_size"),
        chunk_size=shuffle.chunk_size or ConvertOptions.default("chunk_size"),
        shuffle=True if shuffle.enabled is None else shuffle.enabled, seed=shuffle.seed or 0,
        dtype=base.dtype, preprocessing=_append_preprocessing(base, str(base_dir)),
        # BASE's perturbation columns are parsed from the new inputs too (names may differ)
        perturbation="auto" if base.perturbation else None,
        **{k: v for k, v in run.items() if v is not None},
    )


def _organisms_of(vocab: GeneVocab) -> set[str]:
    from scmf_shards.species import detect_organism

    if vocab.organisms:
        return set(vocab.organisms)
    try:
        return {detect_organism("vocabulary", genes=vocab.genes)}
    except ScmfError:
        return set()


def _genes_of(path: str, gene_column: str) -> list[str] | None:
    """Gene ids of a local ``.h5ad`` (read backed: var only), else ``None``."""
    if not path.endswith(".h5ad") or not os.path.isfile(path):
        return None
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    try:
        names = adata.var_names if gene_column == "var_names" else adata.var.get(gene_column)
        return None if names is None else [str(g) for g in names]
    finally:
        adata.file.close()


def _check_organisms(paths: Sequence[str], options: Any, vocab: GeneVocab, base_dir: Path) -> None:
    """Refuse new inputs whose genes belong to an organism BASE's vocabulary does not hold."""
    from scmf_shards.species import detect_organism

    known = _organisms_of(vocab)
    for p in paths:
        genes = _genes_of(p, options.gene_column)
        if not genes:
            continue  # not a local .h5ad: the vocabulary overlap check decides
        try:
            org = detect_organism(p, genes=genes)
        except InvalidInputError:
            continue  # symbols, no metadata: the vocabulary overlap check decides
        if known and org not in known:
            raise VocabularyError(
                f"{p}: its genes are {org}, but {base_dir} holds {', '.join(sorted(known))} cells "
                f"(vocabulary {vocab.name!r}); append data of the same organism, or convert all "
                "inputs anew with --vocab human+mouse"
            )


def _prepare_output(out: Path, base_dir: Path, overwrite: bool) -> None:
    if out.resolve() == base_dir.resolve() or out.resolve().is_relative_to(base_dir.resolve()):
        raise DatasetExistsError(f"{out}: the new version must not be written inside BASE {base_dir}")
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = {p.name for p in out.iterdir()}
    if WORK_DIR in entries and MANIFEST_NAME not in entries:  # an interrupted append:
        for name in entries - {WORK_DIR}:  # its conversion resumes, the rest is redone
            p = out / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return
    if not entries:
        return
    if (MANIFEST_NAME in entries or WORK_DIR in entries) and overwrite:
        shutil.rmtree(out)
        out.mkdir(parents=True)
        return
    raise DatasetExistsError(
        f"{out}: exists and is not empty; choose a new --output (or --overwrite an scmf dataset)"
    )


def _merged_categories(base: Manifest, new: Manifest) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Child categories (BASE's, then new values) and the new sources' names in the child."""
    cats = {c.name: list(c.categories) for c in base.obs_columns}
    renamed: dict[str, str] = {}
    for name in next(c.categories for c in new.obs_columns if c.name == "source"):
        unique, k = name, 1
        while unique in cats["source"]:
            k += 1
            unique = f"{name}#{k}"
        cats["source"].append(unique)
        renamed[name] = unique
    for col in new.obs_columns:
        if col.name != "source":
            cats[col.name].extend(v for v in col.categories if v not in set(cats[col.name]))
    return cats, renamed


def _restrict(arrays: Any, keep: Any) -> tuple[Any, Any, Any]:
    """CSR arrays with only the non-zeros of vocabulary ids where ``keep`` is True."""
    import numpy as np

    indptr, indices, data = (np.asarray(a) for a in (arrays.indptr, arrays.indices, arrays.data))
    if keep is None:
        return indptr, indices, data
    mask = keep[indices]
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))[mask]
    new_indptr = np.zeros(len(indptr), dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(indptr) - 1), out=new_indptr[1:])
    return new_indptr, indices[mask], data[mask]


def _rewrite_shard(tmp_dir: Path, entry: ShardEntry, new: Manifest, out: Path, relpath: str,
                   cats: Mapping[str, Sequence[str]], renamed: Mapping[str, str], tokens: list[str],
                   keep: Any, var_columns: Mapping[str, Any]) -> ShardEntry:
    """One shard of the new cells written into ``out`` with codes of the child categories
    (and, when BASE selected HVGs, only their non-zeros: ``keep``) and BASE's per-gene
    ``var_columns`` (its non-zero medians)."""
    import numpy as np

    from scmf_shards.write import ShardContent, write_shard

    shard_dir = tmp_dir / entry.path
    indptr, indices, data = _restrict(map_csr(shard_dir, entry, new.dtype), keep)
    codes = {}
    for col in new.obs_columns:
        target = {v: i for i, v in enumerate(cats[col.name])}
        names = [renamed.get(v, v) for v in col.categories] if col.name == "source" else list(col.categories)
        remap = np.array([target[v] for v in names] + [-1], dtype=np.int32)
        codes[col.name] = remap[np.asarray(read_obs_codes(shard_dir, col.name), dtype=np.int64)]
    numeric = {k: read_obs_values(shard_dir, k) for k in new.cell_stats}
    content = ShardContent(
        data=data, indices=indices, indptr=indptr, n_genes=new.n_genes,
        cell_ids=read_obs_index(shard_dir), obs_codes=codes, obs_categories=cats,
        var_names=tokens, numeric_obs=numeric, var_columns=var_columns,
    )
    return write_shard(out / relpath, relpath, content)


def _hvg_mask(base: Manifest, vocab: GeneVocab) -> Any:
    """Vocabulary ids BASE kept (its HVGs), as a mask; ``None`` when it kept every gene."""
    import numpy as np

    genes = base.preprocessing.get("hvg_genes")
    if not genes:
        return None
    keep = np.zeros(len(vocab), dtype=bool)
    keep[vocab.encode(genes)] = True
    return keep


def _link_shard(src: Path, dst: Path, link: str) -> None:
    """Make ``dst`` BASE's shard ``src`` (never writing into ``src``)."""
    if dst.is_symlink() or dst.exists():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    if link == "symlink":
        os.symlink(os.path.relpath(src, dst.parent), dst, target_is_directory=True)
    elif link == "hard":
        shutil.copytree(src, dst, copy_function=os.link)
    else:
        shutil.copytree(src, dst)


def _check_same_processing(base: Manifest, new: Manifest, base_dir: Path) -> None:
    """The new cells' manifest must record BASE's processing (a safety net)."""
    def strip(p: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if k not in _HVG_KEYS}

    found = {"dtype": new.dtype, "cell_stats": list(new.cell_stats), "preprocessing": strip(new.preprocessing),
             "vocab": new.vocab.sha256}
    wanted = {"dtype": base.dtype, "cell_stats": list(base.cell_stats), "preprocessing": strip(base.preprocessing),
              "vocab": base.vocab.sha256}
    diff = {k: (wanted[k], found[k]) for k in wanted if wanted[k] != found[k]}
    if diff:
        raise ConfigurationError(f"{base_dir}: the new cells would not be processed as BASE's were: {diff}")


def append_dataset(
    base: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    link: str = "symlink",
    gene_column: str | None = None,
    matrix: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    quiet: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Write ``output``: the dataset ``base`` plus the cells of ``inputs`` (``.h5ad`` paths
    or URLs), reusing BASE's shards unchanged (see the module docstring). Returns the new
    manifest. Raises a ScmfError subclass naming the file and the reason for anything that
    cannot be appended (another organism, genes outside the vocabulary, a preprocessing
    fitted on BASE's cells, an output that exists)."""
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.medians import VAR_COLUMN, read_dataset_medians
    from scmf_shards.upload import refuse_url

    refuse_url("output", str(output), "append links BASE's shards into a local directory")
    if link not in LINKS:
        raise ConfigurationError(f"link must be one of {LINKS}, got {link!r}")
    base_dir, out = Path(base), Path(output)
    bm = read_manifest(base_dir)
    check_dataset(base_dir, bm, level="size", structure=False)  # every shard file there (stat only)
    vocab = GeneVocab.from_file(base_dir / bm.vocab.path)
    options = _options(bm, base_dir, gene_column=gene_column, matrix=matrix, workers=workers,
                       scheduler=scheduler, quiet=quiet)
    paths = [os.fspath(p) for p in inputs]
    _check_organisms(paths, options, vocab, base_dir)
    _prepare_output(out, base_dir, overwrite)
    tmp_dir = out / WORK_DIR / "new"
    nm = convert_h5ad(paths, tmp_dir, options)
    _check_same_processing(bm, nm, base_dir)
    cats, renamed = _merged_categories(bm, nm)
    taken = {s.path for s in bm.shards}
    new_paths, i = [], len(bm.shards)
    while len(new_paths) < len(nm.shards):
        if shard_relpath(i) not in taken:
            new_paths.append(shard_relpath(i))
        i += 1
    (out / "shards").mkdir(exist_ok=True)
    keep = _hvg_mask(bm, vocab)
    # every shard holds the same medians: BASE's, kept (docs/versions.md); none if BASE has none
    medians = read_dataset_medians(base_dir, bm.shards[0].path if bm.shards else None, bm.n_genes)
    var_columns = {} if medians is None else {VAR_COLUMN: medians}
    new_shards = [_rewrite_shard(tmp_dir, e, nm, out, rel, cats, renamed, vocab.tokens, keep, var_columns)
                  for e, rel in zip(nm.shards, new_paths, strict=True)]
    for e in bm.shards:
        (out / e.path).parent.mkdir(parents=True, exist_ok=True)
        _link_shard(base_dir / e.path, out / e.path, link)
    shutil.copyfile(base_dir / bm.vocab.path, out / bm.vocab.path)
    manifest = _child_manifest(bm, nm, cats, renamed, new_shards)
    _write_with_lineage(out, manifest, _raw(base_dir), base_dir, nm, link)
    shutil.rmtree(out / WORK_DIR)
    return manifest


def _child_manifest(bm: Manifest, nm: Manifest, cats: Mapping[str, list[str]], renamed: Mapping[str, str],
                    new_shards: list[ShardEntry]) -> Manifest:
    from scmf_shards.convert.driver import created_by

    sources = list(bm.sources)
    for s in nm.sources:
        d = s.to_dict()
        d["name"] = renamed.get(d.get("name", ""), d.get("name", ""))
        sources.append(SourceEntry.from_dict(d, len(sources)))
    shards = [*bm.shards, *new_shards]
    return Manifest(
        dataset_id=compute_dataset_id({"parent": bm.dataset_id, "appended": nm.dataset_id, "obs_categories": cats}),
        created_by=created_by(), n_cells=bm.n_cells + nm.n_cells, n_genes=bm.n_genes,
        nnz=sum(s.nnz for s in shards), dtype=bm.dtype, vocab=dict(bm.vocab),
        preprocessing=dict(bm.preprocessing), sources=sources,
        obs_columns=[ObsColumn(name=k, categories=tuple(v)) for k, v in cats.items()],
        cell_stats=tuple(bm.cell_stats), shuffle=dict(bm.shuffle), shards=shards,
        perturbation={**(bm.perturbation or {}),
                      **{renamed.get(k, k): v for k, v in (nm.perturbation or {}).items()}} or None,
    )


def _version_entry(raw: Mapping[str, Any], sources: Sequence[str]) -> dict[str, Any]:
    return {"dataset_id": raw["dataset_id"], "n_cells": raw["n_cells"], "n_shards": len(raw["shards"]),
            "sources": list(sources)}


def _write_with_lineage(out: Path, manifest: Manifest, base_raw: Mapping[str, Any], base_dir: Path,
                        nm: Manifest, link: str) -> None:
    """Write the manifest with ``parent`` and ``lineage`` (after ``created_by``; atomically)."""
    chain = list(base_raw.get("lineage") or [
        _version_entry(base_raw, [s.get("name", s["path"]) for s in base_raw["sources"]])])
    d = manifest.to_dict()
    added = [s.to_dict().get("name", s.path) for s in manifest.sources[len(base_raw["sources"]):]]
    parent = {"dataset_id": base_raw["dataset_id"], "location": os.path.relpath(base_dir.resolve(), out.resolve()),
              "n_shards": len(base_raw["shards"]), "link": link}
    write_manifest(out, dataclasses.replace(manifest, parent=parent, lineage=[*chain, _version_entry(d, added)]))


def reference_problems(directory: str | os.PathLike[str]) -> list[str]:
    """Problems with the shards a version reuses from its parent (empty when it has no
    parent, or all hold): the parent gone or holding another ``dataset_id`` (symbolic links
    only), a reused shard missing, or a link that leaves the parent's shards."""
    d = Path(directory)
    try:
        raw = _raw(d)
    except ScmfError:
        return []  # verify itself reports an unreadable manifest
    parent = raw.get("parent")
    if not isinstance(parent, Mapping):
        return []
    reused = raw["shards"][: int(parent.get("n_shards", 0))]
    where = f"{d}: shards 0-{len(reused) - 1} are reused from its parent {parent.get('dataset_id')}"
    problems = []
    if parent.get("link") == "symlink":
        pdir = (d / str(parent.get("location", ""))).resolve()
        try:
            pid = read_manifest(pdir).dataset_id
        except ScmfError:
            return [f"{where} at {pdir}, which is no longer a dataset (moved or deleted?)"]
        if pid != parent.get("dataset_id"):
            problems.append(f"{where} at {pdir}, which now holds dataset {pid}")
        for s in reused:
            target = (d / s["path"]).resolve()
            if not target.is_relative_to(pdir):
                problems.append(f"{d / s['path']}: links to {target}, outside its parent {pdir}")
    for s in reused:
        if not (d / s["path"]).is_dir():
            problems.append(f"{d / s['path']}: reused shard missing ({where}; was a parent shard deleted?)")
    return problems


def lineage(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The versions ``directory`` descends from, oldest first, itself last: ``dataset_id``,
    ``n_cells``, ``n_shards``, ``sources`` (added by that version) and ``path`` (where the
    chain of ``parent`` locations finds it, ``None`` when that version is not reachable)."""
    d = Path(directory)
    raw = _raw(d)
    chain = [dict(e) for e in raw.get("lineage") or [
        _version_entry(raw, [s.get("name", s["path"]) for s in raw["sources"]])]]
    found: dict[str, str] = {raw["dataset_id"]: str(d)}
    here, current = d, raw
    while isinstance(current.get("parent"), Mapping):
        here = here / str(current["parent"].get("location", ""))
        try:
            current = _raw(here)
        except ScmfError:
            break
        found[current["dataset_id"]] = os.path.normpath(here)
    for e in chain:
        e["path"] = found.get(e["dataset_id"])
    return chain


def format_lineage(chain: Sequence[Mapping[str, Any]]) -> str:
    """Human-readable :func:`lineage`, newest first (like ``git log``)."""
    lines = []
    for i, e in enumerate(reversed(chain)):
        label = "version" if i == 0 else "parent " if i == 1 else "ancestor"
        lines.append(f"{label} {e['dataset_id']}")
        lines.append(f"  at      {e.get('path') or '(not reachable from here)'}")
        lines.append(f"  cells   {e['n_cells']:,} in {e['n_shards']} shard(s)")
        lines.append(f"  added   {', '.join(e['sources']) or '-'}")
    return "\n".join(lines)


def _source_key(s: SourceEntry) -> str:
    return s.sha256 or s.path


def _shard_key(s: ShardEntry) -> tuple[str, ...]:
    """A shard's identity: its arrays' checksums, whichever the format version records."""
    return tuple(f"{k}:{v}" for a in s.arrays.values() for k, v in sorted(a.checksums.items()))


def diff_datasets(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> dict[str, Any]:
    """What differs between two dataset directories (JSON-ready): ids and cells, sources
    (by checksum), vocabulary tokens, preprocessing keys, obs categories, shards (by the
    checksums of their arrays: shared or not), and whether one descends from the other."""
    ma, mb = read_manifest(a), read_manifest(b)
    sa, sb = {_source_key(s): s.path for s in ma.sources}, {_source_key(s): s.path for s in mb.sources}
    va, vb = GeneVocab.from_file(Path(a) / ma.vocab.path), GeneVocab.from_file(Path(b) / mb.vocab.path)
    ta, tb = set(va.tokens), set(vb.tokens)
    pa, pb = dict(ma.preprocessing), dict(mb.preprocessing)
    ka, kb = {_shard_key(s) for s in ma.shards}, {_shard_key(s) for s in mb.shards}
    ca, cb = {c.name: list(c.categories) for c in ma.obs_columns}, {c.name: list(c.categories) for c in mb.obs_columns}
    ids_a = [e["dataset_id"] for e in lineage(a)]
    ids_b = [e["dataset_id"] for e in lineage(b)]
    return {
        "a": str(a), "b": str(b),
        "dataset_id": [ma.dataset_id, mb.dataset_id],
        "relation": ("same" if ma.dataset_id == mb.dataset_id else "b descends from a" if ma.dataset_id in ids_b
                     else "a descends from b" if mb.dataset_id in ids_a else "unrelated"),
        "cells": [ma.n_cells, mb.n_cells],
        "sources": {"common": len(sa.keys() & sb.keys()), "only_a": [sa[k] for k in sa if k not in sb],
                    "only_b": [sb[k] for k in sb if k not in sa]},
        "vocabulary": {"same": va.sha256() == vb.sha256(), "only_a": len(ta - tb), "only_b": len(tb - ta)},
        "preprocessing": {k: [pa.get(k), pb.get(k)] for k in dict.fromkeys([*pa, *pb]) if pa.get(k) != pb.get(k)},
        "obs_columns": {k: {"only_a": [x for x in ca.get(k, []) if x not in set(cb.get(k, []))],
                            "only_b": [x for x in cb.get(k, []) if x not in set(ca.get(k, []))]}
                        for k in dict.fromkeys([*ca, *cb]) if ca.get(k) != cb.get(k)},
        "shards": {"shared": len(ka & kb), "only_a": len(ka - kb), "only_b": len(kb - ka)},
    }


def format_diff(diff: Mapping[str, Any]) -> str:
    """Human-readable :func:`diff_datasets`."""
    s, v, sh = diff["sources"], diff["vocabulary"], diff["shards"]
    lines = [
        f"a         {diff['a']}  ({diff['dataset_id'][0]})",
        f"b         {diff['b']}  ({diff['dataset_id'][1]})",
        f"relation  {diff['relation']}",
        f"cells     {diff['cells'][0]:,} -> {diff['cells'][1]:,} ({diff['cells'][1] - diff['cells'][0]:+,})",
        f"sources   {s['common']} common, {len(s['only_a'])} only in a, {len(s['only_b'])} only in b",
        *(f"  - {p}" for p in s["only_a"]), *(f"  + {p}" for p in s["only_b"]),
        "vocab     " + ("same" if v["same"] else f"differs: {v['only_a']} tokens only in a, {v['only_b']} only in b"),
        "preproc   " + (", ".join(f"{k}: {x!r} -> {y!r}" for k, (x, y) in diff["preprocessing"].items()) or "same"),
        f"shards    {sh['shared']} shared, {sh['only_a']} only in a, {sh['only_b']} only in b",
    ]
    for col, d in diff["obs_columns"].items():
        lines.append(f"obs {col}: {len(d['only_a'])} categories only in a, {len(d['only_b'])} only in b")
    return "\n".join(lines)
