"""``scmf-convert``: a thin click layer over :mod:`scmf_shards` library functions.

Every option is built from :data:`scmf_shards.options.OPTIONS` (the one list of option
names the YAML keys and the Python API share). Errors raised on purpose print one line,
``error: ...``, on stderr and exit 1; config warnings print ``warning: ...`` on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from scmf_loader.errors import ScmfError
from scmf_loader.preprocess.schema import CONFIG_KEYS, PREPROCESSING_ALIASES
from scmf_shards.options import OPTIONS, ConvertOptions, Option, options_in

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


_RESUMABLE = ("h5ad_cmd", "census_cmd")  # commands whose re-run resumes an interrupted run


def _interrupted(output: Any) -> None:
    """Ctrl-C: say what is left and how to resume (instead of click's bare ``Aborted!``)."""
    where = f"{output}: " if output else ""
    click.echo(f"\ninterrupted: {where}the conversion stopped before its manifest was written, so "
               "this is not a dataset yet; re-run the same command to resume (finished shards "
               "are verified and kept)", err=True)
    sys.stderr.flush()
    # background threads (zarr's event loop) may still complain while the interpreter shuts
    # down; the line above is all a user needs
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- closed by the exit
    sys.exit(130)


def _warning_lines() -> Any:
    """While converting, warnings about disk space print as one ``warning: ...`` line."""
    import contextlib

    from scmf_shards.convert.diskspace import LowSpaceWarning

    previous = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, LowSpaceWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            previous(message, category, *args, **kwargs)

    @contextlib.contextmanager
    def scope() -> Any:
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = previous

    return scope()


def _handle_errors(fn: Callable[..., None]) -> Callable[..., None]:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            with _warning_lines():
                fn(*args, **kwargs)
        except ScmfError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            if fn.__name__ not in _RESUMABLE:
                raise
            _interrupted(kwargs.get("output"))

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _load_config(path: str | None) -> dict[str, Any]:
    """The config's options (empty without one); its warnings as ``warning:`` lines."""
    if not path:
        return {}
    from scmf_shards.config import load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(path)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    return config


# ---- options, built from the one list -------------------------------------------------------
def _help(o: Option) -> str:
    """The option's help with its :class:`ConvertOptions` default, e.g. ``[50000]``."""
    default = ConvertOptions.default(o.name)
    text = o.help.rstrip(".")
    if "[" in o.help or default in (None, ()) or o.kind == "flag":
        return text + "."
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return f"{text} [{shown}]."


def cli_option(o: Option, help: str | None = None) -> Callable[[Any], Any]:
    """The click option of one :class:`Option` (values validated by the library, which
    gives one-line errors; click checks only types and ranges)."""
    text = help or _help(o)
    names = [o.cli_flag, *([o.short] if o.short else [])]
    if o.kind == "bool":
        flag = o.cli_flag[2:]
        return click.option(f"--{flag}/--no-{flag}", o.name, default=None, help=text)
    if o.kind == "flag":
        return click.option(*names, o.name, is_flag=True, default=None, help=text)
    kinds: dict[str, Any] = {
        "str": str, "float": float, "dir": click.Path(file_okay=False),
        "int": int if o.min is None else click.IntRange(min=o.min),
        "choice": click.Choice(list(o.choices)),
    }
    return click.option(*names, o.name, type=kinds[o.kind], default=None, help=text)


def _by_name(name: str) -> Option:
    return next(o for o in OPTIONS if o.name == name)


def with_options(*groups: str, **helps: str) -> Callable[[Any], Any]:
    """Apply the options of ``groups`` (``helps``: per-command help by option name)."""
    def apply(fn: Any) -> Any:
        for o in reversed(options_in(*groups)):
            fn = cli_option(o, helps.get(o.name))(fn)
        return fn

    return apply


def _config_option(help: str) -> Callable[[Any], Any]:
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help=help)


CONFIG_HELP = ("YAML file whose data: section sets any of these options (same names, underscores); "
               "loader keys there (num_workers, batch_size ...) are ignored with a warning.")
CONVERT_NAMES = [o.name for o in options_in("common")]
#: the preprocessing options: the loader's config keys (a test checks OPTIONS holds the same)
PREPROCESSING_NAMES = list(CONFIG_KEYS)


def preprocessing_from(ctx: click.Context, config: dict[str, Any]) -> dict[str, Any]:
    """The ``preprocessing`` mapping: the config's ``preprocessing:`` section (YAML aliases
    mapped to option names), overridden by the preprocessing options given explicitly."""
    section = config.get("preprocessing") or {}
    if not isinstance(section, dict):
        raise ScmfError("the config's 'preprocessing' must be a mapping")
    merged = {PREPROCESSING_ALIASES.get(k, k): v for k, v in section.items()}
    for name in PREPROCESSING_NAMES:
        if _explicit(ctx, name):
            merged[name] = ctx.params[name]
    return merged


def _output(ctx: click.Context, config: dict[str, Any], what: str) -> str:
    output = ctx.params["output"] if _explicit(ctx, "output") else config.get("output")
    if not output:
        raise ScmfError(f"no output {what}: give --output or 'output:' in --config")
    return str(output)


def _convert_options(ctx: click.Context, config: dict[str, Any], names: list[str],
                     default_columns: tuple[str, ...] = ()) -> ConvertOptions:
    opts = _merge(ctx, config, names)
    opts["obs_columns"] = _split_columns(opts.get("obs_columns")) or default_columns
    opts["preprocessing"] = preprocessing_from(ctx, config)
    return ConvertOptions(**opts)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scmodelforge-data")
def main() -> None:
    """Convert single-cell data into vocabulary-aligned Zarr shard datasets."""


@main.command("h5ad")
@click.argument("inputs", nargs=-1, type=str)
@with_options("output")
@_config_option(CONFIG_HELP)
@with_options("common", "h5ad", "preprocessing")
@click.pass_context
@_handle_errors
def h5ad_cmd(ctx: click.Context, inputs: tuple[str, ...], config_path: str | None, **_: Any) -> None:
    """Convert AnnData inputs (.h5ad files, .zarr stores, directories or globs of them, scmf
    datasets; paths or fsspec URLs) into a dataset directory."""
    from scmf_shards.convert import convert_h5ad

    config = _load_config(config_path)
    if config.get("source", "local") not in ("local", "h5ad"):
        raise ScmfError(f"{config_path}: source is {config['source']!r}; use 'scmf-convert census'")
    paths = list(inputs) or list(config.get("inputs", []))
    if not paths:
        raise ScmfError("no input files: give INPUT... or 'paths:' in --config")
    output = _output(ctx, config, "directory")
    options = _convert_options(ctx, config, [*CONVERT_NAMES, *(o.name for o in options_in("h5ad"))])
    manifest = convert_h5ad(paths, output, options)
    if not options.quiet:
        click.echo(
            f"wrote {output}: {manifest.n_cells:,} cells, {len(manifest.shards)} shards, "
            f"nnz {manifest.nnz:,}, id {manifest.dataset_id}"
        )


main.add_command(h5ad_cmd, "anndata")  # the same command under the name of what it reads


CENSUS_SOURCES = ("cellxgene_census", "census")


@main.command("census")
@with_options("output")
@_config_option(CONFIG_HELP)
@with_options("common", "census", "preprocessing")
@click.pass_context
@_handle_errors
def census_cmd(ctx: click.Context, config_path: str | None, **_: Any) -> None:
    """Convert the cells of a CELLxGENE Census query into a dataset directory."""
    from scmf_shards.sources.census import DEFAULT_OBS_COLUMNS, convert_census

    config = _load_config(config_path)
    if config.get("source", CENSUS_SOURCES[0]) not in CENSUS_SOURCES:
        raise ScmfError(f"{config_path}: source is {config['source']!r}; use 'scmf-convert h5ad'")
    output = _output(ctx, config, "directory")
    query = _merge(ctx, config, [o.name for o in options_in("census")])
    filters = config.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise ScmfError(f"{config_path}: 'filters' must be a mapping of obs column -> value(s)")
    options = _convert_options(ctx, config, CONVERT_NAMES, DEFAULT_OBS_COLUMNS)
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
@with_options("output", output="Processed .h5ad to write.")
@_config_option("YAML file whose data: section has a preprocessing: mapping.")
@cli_option(_by_name("matrix"), "X (default), raw, or layer:NAME holding the counts.")
@cli_option(_by_name("chunk_size"), "Cells read at a time; bounds memory [16384].")
@cli_option(_by_name("seed"), "Seed of scran's pre-clustering [0].")
@cli_option(_by_name("overwrite"), "Replace an existing output file.")
@cli_option(_by_name("quiet"))
@with_options("preprocessing")
@click.pass_context
@_handle_errors
def preprocess_cmd(ctx: click.Context, input: str, config_path: str | None, **_: Any) -> None:
    """Write a preprocessed copy of INPUT.h5ad (config and selected genes in .uns)."""
    from scmf_shards.preprocess.h5ad import preprocess_h5ad
    from scmf_shards.upload import refuse_url

    config = _load_config(config_path)
    output = _output(ctx, config, "file")
    refuse_url("--output", output, "preprocess writes a local .h5ad file (upload it afterwards)")
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
@_handle_errors
def verify_cmd(directory: str, quiet: bool) -> None:
    """Recompute every checksum; exit 1 with one line per problem (on stderr). DIRECTORY
    may be a URL (s3://bucket/prefix ...): every shard is downloaded and checked."""
    from tqdm.auto import tqdm

    from scmf_shards.upload import is_output_url
    from scmf_shards.verify import verify_dataset

    if is_output_url(directory):
        _verify_url(directory, quiet)
        return
    try:
        from scmf_loader.format import read_manifest

        total = len(read_manifest(directory).shards)
    except ScmfError:
        total = 0
    with tqdm(total=total, desc="verify", unit="shard", disable=quiet or not total, leave=False) as bar:
        problems = verify_dataset(directory, progress=bar.update)
    from scmf_shards.versions import reference_problems

    problems += reference_problems(directory)  # shards reused from a parent version
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)
    click.echo(f"OK: {directory}: {total} shard(s) verified")


def _verify_url(url: str, quiet: bool) -> None:
    """``verify`` of a dataset at a URL (credentials from the environment)."""
    from tqdm.auto import tqdm

    from scmf_shards.upload import redact, url_info, verify_url

    total = int(url_info(url)["n_shards"])  # a missing dataset: one error line
    with tqdm(total=total, desc="verify", unit="shard", disable=quiet or not total, leave=False) as bar:
        problems, total = verify_url(url, progress=bar.update)
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)
    click.echo(f"OK: {redact(url.rstrip('/'))}: {total} shard(s) verified")


#: lists longer than this are summarised by ``info`` (``--json`` prints them whole)
INFO_LIST_LIMIT = 10
_LIST_LABELS = {"hvg_genes": "HVG genes"}


def summarise_lists(value: Any, key: str = "") -> Any:
    """``value`` with every list longer than :data:`INFO_LIST_LIMIT` replaced by a short
    line, e.g. ``2000 HVG genes: A, B, C, … (use --json for all)``."""
    if isinstance(value, dict):
        return {k: summarise_lists(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) <= INFO_LIST_LIMIT:
            return [summarise_lists(v) for v in value]
        label = _LIST_LABELS.get(key, key.replace("_", " ") or "items")
        head = ", ".join(str(v) for v in value[:3])
        return f"{len(value)} {label}: {head}, … (use --json for all)"
    return value


@main.command("info")
@click.argument("directory", type=str)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON (every list in full).")
@_handle_errors
def info_cmd(directory: str, as_json: bool) -> None:
    """Summarise a dataset directory: cells, genes, nnz, sources, preprocessing, shards.

    Lists longer than 10 items (e.g. the HVG genes) are shown as their length and first
    items; --json prints everything."""
    from scmf_shards.upload import is_output_url, url_info
    from scmf_shards.verify import dataset_info, format_info

    info = url_info(directory) if is_output_url(directory) else dataset_info(directory)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    shown = {k: [summarise_lists(s) for s in v] if k == "sources" else summarise_lists(v, k)
             for k, v in info.items()}  # one line per source, however many
    click.echo(format_info(shown))


@main.command("append")
@click.argument("base", type=str)
@click.argument("inputs", nargs=-1, required=True, type=str)
@cli_option(_by_name("output"), "The new version's dataset directory.")
@click.option("--link", type=click.Choice(["symlink", "hard", "copy"]), default="symlink", show_default=True,
              help="How BASE's shards are reused: relative symbolic links (a reference to BASE), hard links, or a copy.")
@with_options("h5ad")
@cli_option(_by_name("workers"))
@cli_option(_by_name("scheduler"))
@cli_option(_by_name("overwrite"))
@cli_option(_by_name("quiet"))
@_handle_errors
def append_cmd(base: str, inputs: tuple[str, ...], output: str | None, link: str, **opts: Any) -> None:
    """A new version: BASE's cells (shards reused, never rewritten) plus those of INPUTS."""
    from scmf_shards.upload import refuse_url
    from scmf_shards.versions import append_dataset

    if not output:
        raise ScmfError("give the new version's directory with --output")
    refuse_url("--output", output, "append links BASE's shards into a local directory (convert, then upload)")
    refuse_url("--scratch-dir", opts.get("scratch_dir"), "scratch space must be a local (or shared) file system")
    manifest = append_dataset(base, list(inputs), output, link=link, **opts)
    if not opts.get("quiet"):
        click.echo(f"wrote {output}: {manifest.n_cells:,} cells, {len(manifest.shards)} shards, id {manifest.dataset_id}")


@main.command("log")
@click.argument("directory", type=str)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON.")
@_handle_errors
def log_cmd(directory: str, as_json: bool) -> None:
    """The versions DIRECTORY descends from, newest first."""
    from scmf_shards.versions import format_lineage, lineage

    chain = lineage(directory)
    click.echo(json.dumps(chain, indent=1) if as_json else format_lineage(chain))


@main.command("diff")
@click.argument("a", type=str)
@click.argument("b", type=str)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON.")
@_handle_errors
def diff_cmd(a: str, b: str, as_json: bool) -> None:
    """What differs between datasets A and B: sources, cells, vocabulary, preprocessing, shards."""
    from scmf_shards.versions import diff_datasets, format_diff

    diff = diff_datasets(a, b)
    click.echo(json.dumps(diff, indent=1) if as_json else format_diff(diff))


@main.command("register")
@click.argument("directory", type=str)
@click.option("--name", required=True, help="Dataset name, e.g. atlas.")
@click.option("--version", "version_", required=True, help="Version, e.g. v2.")
@click.option("--registry", required=True, help="Registry YAML file (created if absent).")
@click.option("--overwrite", is_flag=True, help="Re-point an existing name@version at another dataset_id.")
@_handle_errors
def register_cmd(directory: str, name: str, version_: str, registry: str, overwrite: bool) -> None:
    """Register DIRECTORY as NAME@VERSION, pinned to its dataset_id."""
    from scmf_loader.registry import register

    entry = register(directory, name, version_, registry, overwrite=overwrite)
    click.echo(f"registered {entry.spec} -> {entry.uri} ({entry.dataset_id}) in {registry}")


if __name__ == "__main__":  # pragma: no cover
    main()
