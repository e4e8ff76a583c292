"""Obs columns the converter derives per source: ``organism`` and the perturbation schema.

:func:`derive_obs_columns` runs before any work, in the main process:

- **species**: each source's organism is the Census query's, the one ``--organism`` names,
  or the one :func:`~scmf_shards.species.detect_organism` tells from its obs/uns metadata and
  gene ids. The vocabulary must cover it: under a one-organism vocabulary (the human default)
  a source told to be another organism is refused naming ``--vocab human+mouse`` (one that
  cannot be told is left to the gene overlap check). Under a multi-species vocabulary
  (``human+mouse``) every source must be told (else refused naming ``--organism``), no two of
  its genes may land on one token, its genes are aligned with its organism's names only, every
  cell gets an ``organism`` obs column, and the manifest records per source its ``organism``
  and ``gene_mapping`` (:func:`~scmf_shards.species.mapping_counts`);
- **perturbation** (``--perturbation auto|COLUMN[,COLUMN]``): the source's labels are parsed
  (:func:`~scmf_shards.perturbation.parse_perturbations`) into the six schema columns, stored
  whatever ``--obs-columns`` says.

A source with derived columns is wrapped in a :class:`DerivedSource`, which adds them to the
rows its inner source reads. It stays small when pickled to tasks: the organism is one string,
and the perturbation columns a lookup from the distinct tuples of the input columns' values to
the stored strings (the parsed schema is a function of those values).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scmf_loader.errors import InvalidInputError, ScmfError
from scmf_loader.vocab import GeneVocab

__all__ = ["ORGANISM_COLUMN", "DerivedSource", "derive_obs_columns", "perturbation_manifest", "source_organism"]

ORGANISM_COLUMN = "organism"


class DerivedSource:
    """A source plus derived obs columns (forwards everything else to ``inner``).

    ``organism``: the source's canonical organism (``None`` when not told), stored as the
    ``organism`` column when ``organism_column``; ``inputs``/``lookup``: the perturbation
    input columns and the map from their values (a tuple, ``None`` = missing) to the stored
    strings of :data:`~scmf_shards.perturbation.COLUMNS`; ``fields``: extra manifest fields.
    """

    def __init__(self, inner: Any, *, organism: str | None = None, organism_column: bool = False,
                 inputs: Sequence[str] = (), lookup: Mapping[tuple[Any, ...], tuple[Any, ...]] | None = None,
                 fields: Mapping[str, Any] | None = None, perturbation: Mapping[str, Any] | None = None) -> None:
        self.inner = inner
        self.organism = organism
        self.organism_column = organism_column
        self.inputs = tuple(inputs)
        self.lookup = dict(lookup or {})
        self.fields = dict(fields or {})
        self.perturbation = perturbation

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def derived(self) -> tuple[str, ...]:
        """Names of the columns this wrapper adds."""
        from scmf_shards.perturbation import COLUMNS

        return ((ORGANISM_COLUMN,) if self.organism_column else ()) + (COLUMNS if self.inputs else ())

    @property
    def genes(self) -> list[str]:
        """The inner source's genes."""
        return self.inner.genes

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """The inner source's check, for the columns not derived here."""
        self.inner.check_obs_columns([c for c in columns if c not in self.derived])

    def _derive(self, n: int, get: Any) -> dict[str, np.ndarray]:
        """The derived columns of ``n`` rows (``get(column)``: the inner values of a column)."""
        from scmf_shards.perturbation import COLUMNS

        out: dict[str, np.ndarray] = {}
        if self.organism_column:
            out[ORGANISM_COLUMN] = np.full(n, self.organism, dtype=object)
        if self.inputs:
            keys = list(zip(*(get(c).tolist() for c in self.inputs), strict=True))
            rows = [self.lookup.get(k) for k in keys]
            if None in rows:
                bad = keys[rows.index(None)]
                raise InvalidInputError(
                    f"{self.inner.path}: obs columns {list(self.inputs)} hold {bad!r}, which was not "
                    "there when the conversion was planned; the input changed? Re-run the command")
            for j, c in enumerate(COLUMNS):
                col = np.empty(n, dtype=object)
                col[:] = [r[j] for r in rows]
                out[c] = col
        return out

    def obs_values(self, column: str) -> np.ndarray:
        """Every value of one obs column (derived here or the inner source's)."""
        if column not in self.derived:
            return self.inner.obs_values(column)
        return self._derive(self.n_cells, self.inner.obs_values)[column]

    def read_rows(self, start: int, stop: int, obs_columns: Sequence[str] = (), reuse: bool = False) -> Any:
        """The inner source's rows, with the derived columns among ``obs_columns``."""
        derived = self.derived
        wanted = [c for c in obs_columns if c not in derived]
        extra = [c for c in self.inputs if c not in wanted] if any(c in derived for c in obs_columns) else []
        chunk = self.inner.read_rows(start, stop, [*wanted, *extra], reuse=reuse)
        made = self._derive(stop - start, chunk.obs.__getitem__) if len(wanted) < len(obs_columns) else {}
        obs = {c: made[c] if c in made else chunk.obs[c] for c in obs_columns}
        return dataclasses.replace(chunk, obs=obs)

    def prepare(self, work_dir: Any) -> DerivedSource:
        """The inner source's one-time preparation, wrapped again."""
        prepare = getattr(self.inner, "prepare", None)
        return self if prepare is None else _rewrap(self, prepare(work_dir))

    def fingerprint(self) -> dict[str, Any]:
        """The inner source's fingerprint, plus the organism its cells are told to be."""
        fp = dict(self.inner.fingerprint())
        return fp if self.organism is None else {**fp, "organism": self.organism}

    def manifest_fields(self, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        """The inner source's provenance plus ``organism`` and ``gene_mapping``."""
        return {**self.inner.manifest_fields(fingerprint), **self.fields}


def _rewrap(source: DerivedSource, inner: Any) -> DerivedSource:
    """``source`` around another inner source."""
    return DerivedSource(inner, organism=source.organism, organism_column=source.organism_column,
                         inputs=source.inputs, lookup=source.lookup, fields=source.fields,
                         perturbation=source.perturbation)


def _obs_names(source: Any) -> tuple[str, ...]:
    """The obs column names of a source (AnnData / dataset sources, Census queries)."""
    names = getattr(source, "obs_columns", None)
    if names is None and hasattr(source, "query"):
        names = getattr(source.query, "obs_columns_available", None)
    return tuple(names or ())


def _uns_organism(source: Any) -> dict[str, Any]:
    """``uns['organism']`` / ``uns['organism_ontology_term_id']`` of an AnnData source."""
    if getattr(source, "kind", None) not in ("h5ad", "anndata_zarr"):
        return {}
    from anndata.io import read_elem

    from scmf_shards.sources.anndata_source import open_root
    from scmf_shards.species import OBS_KEYS

    out: dict[str, Any] = {}
    with open_root(source.path, source.zarr) as root:
        if "uns" not in root:
            return out
        uns = root["uns"]
        for key in OBS_KEYS:
            if key in uns:
                value = read_elem(uns[key])
                out[key] = value.tolist() if hasattr(value, "tolist") else value
    return out


def source_organism(source: Any, given: Sequence[str] | None) -> str:
    """The organism of one source: the Census query's, the one ``--organism`` names, or the
    one told by its metadata and genes (which must be one of ``given`` when several are)."""
    from scmf_shards.species import OBS_KEYS, detect_organism

    own = getattr(source, "organism", None)  # a Census query's
    if own is not None:
        return str(own)
    if given is not None and len(given) == 1:
        return given[0]
    names = _obs_names(source)
    obs = {k: source.obs_values(k) for k in OBS_KEYS if k in names}
    org = detect_organism(source.path, obs=obs, uns=_uns_organism(source), genes=source.genes)
    if given is not None and org not in given:
        raise InvalidInputError(f"{source.path}: its organism is {org}, not one of --organism {','.join(given)}")
    return org


def _species(source: Any, vocab: GeneVocab, given: Sequence[str] | None) -> tuple[str | None, dict[str, Any]]:
    """(organism, manifest fields) of one source; checks coverage and one gene per token."""
    from scmf_shards.species import check_one_gene_per_token, check_vocab_covers, mapping_counts

    multi = vocab.is_multi_species
    if not vocab.organisms:  # "union", a custom vocabulary: no organism to check against
        return None, {}
    try:
        org = source_organism(source, given)
    except InvalidInputError:
        if multi or given is not None:
            raise
        return None, {}  # one organism's vocabulary and nothing tells: the gene overlap decides
    check_vocab_covers(vocab, org, source.path)
    if not multi:
        return None, {}
    genes = source.genes
    if vocab.is_multi_species:
        check_one_gene_per_token(genes, vocab, org, source.path)
    return org, {"organism": org, "gene_mapping": mapping_counts(genes, vocab, org).to_dict()}


def _stored(value: Any, kind: str) -> str | None:
    """A schema value as the string a shard stores (NaN / missing → ``None``)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if kind == "float":
        return str(float(value))
    if kind == "bool":
        return str(bool(value))
    return str(value)


def _perturbation(source: Any, vocab: GeneVocab, columns: str, strict: bool, quiet: bool
                  ) -> tuple[tuple[str, ...], dict[tuple[Any, ...], tuple[Any, ...]], dict[str, Any]]:
    """(input columns, lookup, manifest summary) of one source's perturbation metadata."""
    import pandas as pd

    from scmf_shards.perturbation import COLUMNS, parse_perturbations
    from scmf_shards.perturbation.detect import _kind, label_role

    names = _obs_names(source)
    if columns == "auto":
        read = [c for c in names if label_role(c) is not None or _kind(c) is not None]
    else:  # a named column the source lacks is refused by parse_perturbations, naming it
        read = [c.strip() for c in columns.split(",") if c.strip()]
    frame = pd.DataFrame({c: source.obs_values(c) for c in read if c in names}, dtype=object)
    table = parse_perturbations(frame, columns, vocab=vocab, strict=strict, source=source.path)
    cols = table.columns
    inputs = tuple(dict.fromkeys([c for c, _ in cols.labels]
                                 + [c for c in (cols.dose, cols.dose_unit, cols.time, cols.time_unit) if c]))
    if not quiet:
        for line in table.report():
            print(f"{source.path}: {line}", file=sys.stderr)
    kinds = ("str", "str", "str", "float", "float", "bool")
    first = pd.DataFrame({c: frame[c] for c in inputs}).assign(_row=np.arange(len(frame)))
    first = first.drop_duplicates(subset=list(inputs))["_row"].to_numpy()
    lookup = {}
    for row in first.tolist():
        key = tuple(None if pd.isna(frame[c].iat[row]) else frame[c].iat[row] for c in inputs)
        lookup[key] = tuple(_stored(table.frame[c].iat[row], k) for c, k in zip(COLUMNS, kinds, strict=True))
    return inputs, lookup, table.to_manifest()


def derive_obs_columns(sources: Sequence[Any], vocab: GeneVocab, options: Any) -> tuple[list[Any], Any]:
    """The sources wrapped with their derived obs columns (see the module docstring) and the
    options whose ``obs_columns`` name them (the user's columns first)."""
    from scmf_shards.perturbation import COLUMNS
    from scmf_shards.species import parse_organisms

    given = parse_organisms(options.organism) if getattr(options, "organism", None) else None
    columns = getattr(options, "perturbation", None)
    out = []
    for s in sources:
        org, fields = _species(s, vocab, given)
        inputs, lookup, summary = (), {}, None
        if columns:
            inputs, lookup, summary = _perturbation(s, vocab, columns, options.strict_perturbation, options.quiet)
        if org is None and not inputs:
            out.append(s)
            continue
        out.append(DerivedSource(s, organism=org, organism_column=org is not None, inputs=inputs,
                                 lookup=lookup, fields=fields, perturbation=summary))
    derived = [c for c in ((ORGANISM_COLUMN,) + (COLUMNS if columns else ()))
               if any(isinstance(s, DerivedSource) and c in s.derived for s in out)]
    if derived:
        partial = [s.path for s in out if not isinstance(s, DerivedSource) or set(derived) - set(s.derived)]
        if partial:  # never: every source is told in species mode, or refused
            raise ScmfError(f"{partial[0]}: no {derived} obs columns derived for this source")
        kept = tuple(dict.fromkeys([*options.obs_columns, *derived]))
        options = dataclasses.replace(options, obs_columns=kept)
    return out, options


def perturbation_manifest(names: Sequence[str], sources: Sequence[Any]) -> dict[str, Any] | None:
    """The manifest's ``perturbation`` section: per source name, its parsed summary."""
    found = {n: s.perturbation for n, s in zip(names, sources, strict=True)
             if getattr(s, "perturbation", None) is not None}
    return found or None
