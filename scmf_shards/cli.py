"""``scmf-convert``: a thin click layer over :mod:`scmf_shards` library functions."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from scmf_loader.errors import ScmfError

__all__ = ["main"]


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _explicit(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src != click.core.ParameterSource.DEFAULT


def _merge(ctx: click.Context, config: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """CLI values given explicitly win over the config file, which wins over defaults."""
    merged: dict[str, Any] = {}
    for name in names:
        value = ctx.params.get(name)
        if _explicit(ctx, name) or name not in config:
            if value is not None:
                merged[name] = value
        else:
            merged[name] = config[name]
    return merged


def _split_columns(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(c.strip() for c in value.split(",") if c.strip())
    return tuple(str(c) for c in value)


def _handle_errors(fn: Callable[..., None]) -> Callable[..., None]:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except ScmfError as exc:
            _fail(exc)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scmodelforge-data")
def main() -> None:
    """Convert single-cell data into vocabulary-aligned Zarr shard datasets."""


COMMON_OPTIONS = [
    click.option("--output", "-o", type=str, default=None, help="Dataset directory to write."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                 help="YAML file whose data: section sets any of these options."),
    click.option("--vocab", type=str, default=None,
                 help="human_protein_coding (default), union, or a vocabulary file (.json/.tsv)."),
    click.option("--obs-columns", type=str, default=None, help="Comma-separated obs columns to keep."),
    click.option("--shard-size", type=click.IntRange(min=1), default=None, help="Cells per shard [50000]."),
    click.option("--chunk-size", type=click.IntRange(min=1), default=None,
                 help="Cells read per task; bounds memory [16384]."),
    click.option("--shuffle/--no-shuffle", default=None, help="Global seeded shuffle [on]."),
    click.option("--seed", type=click.IntRange(min=0), default=None, help="Shuffle seed [0]."),
    click.option("--dtype", type=click.Choice(["float32", "float64", "int32", "uint16", "uint32"]),
                 default=None, help="Stored value dtype [float32]."),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="Local worker processes (dask) [1: in-process]."),
    click.option("--scheduler", type=str, default=None, help="Address of a dask.distributed scheduler."),
    click.option("--scratch-dir", type=click.Path(file_okay=False), default=None,
                 help="Where the shuffle's temporary buckets go (fast local disk, /dev/shm) "
                      "[inside --output]; every worker must see it."),
    click.option("--overwrite", is_flag=True, default=None, help="Replace an existing scmf dataset."),
    click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bars."),
]

OPTION_NAMES = ["vocab", "obs_columns", "shard_size", "chunk_size", "shuffle", "seed", "dtype",
                "workers", "scheduler", "scratch_dir", "overwrite", "quiet"]


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Apply the options shared by every converting command."""
    for opt in reversed(COMMON_OPTIONS):
        fn = opt(fn)
    return fn


# Values are validated by the library (one-line errors), not by click types.
PREPROCESSING_OPTIONS = [
    click.option("--normalize", type=str, default=None,
                 help="library_size (scale cells to --target-sum), scran (pooled size factors) or "
                      "none. Any preprocessing option turns preprocessing on [library_size]."),
    click.option("--target-sum", type=float, default=None, help="Counts per cell after library_size "
                 "normalisation [10000]."),
    click.option("--log1p/--no-log1p", default=None, help="Natural log(1 + x) after normalising [on]."),
    click.option("--hvg", "hvg_selection", type=int, default=None,
                 help="Keep this many highly variable genes (chosen on all inputs together)."),
    click.option("--hvg-flavor", type=str, default=None, help="seurat (default), cell_ranger or seurat_v3 "
                 "(scanpy's flavors; seurat_v3 needs scikit-misc)."),
    click.option("--hvg-batch-key", type=str, default=None,
                 help="obs column: select HVGs within each batch and merge (scanpy's batch_key)."),
    click.option("--bake/--no-bake", default=None, help="Store preprocessed values (bake) or raw counts "
                 "plus per-cell library_size/size_factor that the loader applies per batch [no-bake]."),
    click.option("--assume-normalized", is_flag=True, default=None,
                 help="The input is already normalised: no counts check, no normalisation."),
]
PREPROCESSING_NAMES = ["normalize", "target_sum", "log1p", "hvg_selection", "hvg_flavor",
                       "hvg_batch_key", "bake", "assume_normalized"]


def preprocessing_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Apply the preprocessing options (``--normalize``, ``--hvg``, ``--bake`` ...)."""
    for opt in reversed(PREPROCESSING_OPTIONS):
        fn = opt(fn)
    return fn


def preprocessing_from(ctx: click.Context, config: dict[str, Any]) -> dict[str, Any]:
    """The ``preprocessing`` mapping: the config's ``preprocessing:`` section, overridden by
    the preprocessing options given explicitly on the command line."""
    from scmf_shards.preprocess.stats import PREPROCESSING_ALIASES

    section = config.get("preprocessing") or {}
    if not isinstance(section, dict):
        raise ScmfError("the config's 'preprocessing' must be a mapping")
    merged = {PREPROCESSING_ALIASES.get(k, k): v for k, v in section.items()}
    for name in PREPROCESSING_NAMES:
        if _explicit(ctx, name):
            merged[name] = ctx.params[name]
    return merged


@main.command("h5ad")
@click.argument("inputs", nargs=-1, type=str)
@common_options
@click.option("--gene-column", type=str, default=None, help="var column holding gene ids [var_names].")
@click.option("--matrix", type=str, default=None, help="X (default), raw, or layer:NAME.")
@preprocessing_options
@click.pass_context
@_handle_errors
def h5ad_cmd(ctx: click.Context, inputs: tuple[str, ...], config_path: str | None, **_: Any) -> None:
    """Convert one or more .h5ad files (paths or fsspec URLs) into a dataset directory."""
    from scmf_shards.config import load_config
    from scmf_shards.convert import convert_h5ad
    from scmf_shards.options import ConvertOptions

    config = load_config(config_path) if config_path else {}
    if config.get("source", "local") not in ("local", "h5ad"):
        raise ScmfError(f"{config_path}: source is {config['source']!r}; use 'scmf-convert census'")
    paths = list(inputs) or list(config.get("inputs", []))
    output = ctx.params["output"] if _explicit(ctx, "output") else config.get("output")
    if not paths:
        raise ScmfError("no input files: give INPUT... or 'paths:' in --config")
    if not output:
        raise ScmfError("no output directory: give --output or 'output:' in --config")
    opts = _merge(ctx, config, [*OPTION_NAMES, "gene_column", "matrix"])
    opts["obs_columns"] = _split_columns(opts.get("obs_columns"))
    opts["preprocessing"] = preprocessing_from(ctx, config)
    options = ConvertOptions(**opts)
    manifest = convert_h5ad(paths, output, options)
    if not options.quiet:
        click.echo(
            f"wrote {output}: {manifest.n_cells:,} cells, {len(manifest.shards)} shards, "
            f"nnz {manifest.nnz:,}, id {manifest.dataset_id}"
        )


CENSUS_SOURCES = ("cellxgene_census", "census")


@main.command("census")
@common_options
@click.option("--organism", type=str, default=None, help="homo_sapiens (default) or mus_musculus.")
@click.option("--census-version", type=str, default=None,
              help="Census release: a date (2025-11-08), or stable/latest (resolved and recorded) "
                   "[stable; with --uri, the root's own build date].")
@click.option("--obs-filter", type=str, default=None,
              help="SOMA obs value filter, e.g. \"tissue in ['lung','heart'] and is_primary_data == True\".")
@click.option("--var-filter", type=str, default=None, help="SOMA var value filter (genes to keep).")
@click.option("--uri", type=str, default=None,
              help="A Census-shaped SOMA root (local path or s3://) instead of the public Census.")
@preprocessing_options
@click.pass_context
@_handle_errors
def census_cmd(ctx: click.Context, config_path: str | None, **_: Any) -> None:
    """Convert the cells of a CELLxGENE Census query into a dataset directory."""
    import os

    from scmf_shards.config import load_config
    from scmf_shards.options import ConvertOptions
    from scmf_shards.sources.census import DEFAULT_OBS_COLUMNS, convert_census

    config = load_config(config_path) if config_path else {}
    if config.get("source", CENSUS_SOURCES[0]) not in CENSUS_SOURCES:
        raise ScmfError(f"{config_path}: source is {config['source']!r}; use 'scmf-convert h5ad'")
    output = ctx.params["output"] if _explicit(ctx, "output") else config.get("output")
    if not output:
        raise ScmfError("no output directory: give --output or 'output:' in --config")
    query = _merge(ctx, config, ["organism", "census_version", "obs_filter", "var_filter", "uri"])
    if "uri" in query and not _explicit(ctx, "uri") and config_path:
        uri = str(query["uri"])
        if "://" not in uri and not os.path.isabs(uri):  # relative to the config file
            query["uri"] = os.path.join(os.path.dirname(os.path.abspath(config_path)), uri)
    filters = config.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise ScmfError(f"{config_path}: 'filters' must be a mapping of obs column -> value(s)")
    opts = _merge(ctx, config, OPTION_NAMES)
    opts["obs_columns"] = _split_columns(opts.get("obs_columns")) or DEFAULT_OBS_COLUMNS
    opts["preprocessing"] = preprocessing_from(ctx, config)
    options = ConvertOptions(**opts)
    manifest = convert_census(output, options, filters=filters, **query)
    if not options.quiet:
        src = manifest.sources[0].extra
        click.echo(
            f"wrote {output}: {manifest.n_cells:,} cells from Census {src.get('census_version')} "
            f"{src.get('organism')}, {len(manifest.shards)} shards, nnz {manifest.nnz:,}, "
            f"id {manifest.dataset_id}"
        )


@main.command("preprocess")
@click.argument("input", type=str)
@click.option("--output", "-o", type=str, default=None, help="Processed .h5ad to write.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML file whose data: section has a preprocessing: mapping.")
@click.option("--matrix", type=str, default=None, help="X (default), raw, or layer:NAME holding the counts.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Cells read at a time; bounds memory [16384].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of scran's pre-clustering [0].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output file.")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bars.")
@preprocessing_options
@click.pass_context
@_handle_errors
def preprocess_cmd(ctx: click.Context, input: str, config_path: str | None, **_: Any) -> None:
    """Write a preprocessed copy of INPUT.h5ad (config and selected genes in .uns)."""
    from scmf_shards.config import load_config
    from scmf_shards.preprocess.h5ad import preprocess_h5ad

    config = load_config(config_path) if config_path else {}
    output = ctx.params["output"] if _explicit(ctx, "output") else config.get("output")
    if not output:
        raise ScmfError("no output file: give --output OUT.h5ad")
    prep = preprocessing_from(ctx, config)
    prep.pop("bake", None)  # the output always holds processed values
    opts = _merge(ctx, config, ["matrix", "chunk_size", "seed", "overwrite", "quiet"])
    pipe = preprocess_h5ad(input, output, prep, **opts)
    if not opts.get("quiet"):
        n = "all genes" if pipe.hvg_genes is None else f"{len(pipe.hvg_genes)} HVGs"
        click.echo(f"wrote {output}: {n}, normalize={pipe.normalize}, log1p={pipe.log1p}")


@main.command("verify")
@click.argument("directory", type=str)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify_cmd(directory: str, quiet: bool) -> None:
    """Recompute every checksum; exit 1 with one line per problem."""
    from tqdm.auto import tqdm

    from scmf_shards.verify import verify_dataset

    try:
        from scmf_loader.format import read_manifest

        total = len(read_manifest(directory).shards)
    except ScmfError:
        total = 0
    with tqdm(total=total, desc="verify", unit="shard", disable=quiet or not total, leave=False) as bar:
        problems = verify_dataset(directory, progress=bar.update)
    if problems:
        for p in problems:
            click.echo(p)
        sys.exit(1)
    click.echo(f"OK: {directory}: {total} shard(s) verified")


@main.command("info")
@click.argument("directory", type=str)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON.")
@_handle_errors
def info_cmd(directory: str, as_json: bool) -> None:
    """Summarise a dataset directory: cells, genes, nnz, sources, preprocessing, shards."""
    from scmf_shards.verify import dataset_info, format_info

    info = dataset_info(directory)
    click.echo(json.dumps(info, indent=1) if as_json else format_info(info))


if __name__ == "__main__":  # pragma: no cover
    main()
