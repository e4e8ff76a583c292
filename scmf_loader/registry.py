"""A dataset registry: names and versions for dataset directories, pinned by ``dataset_id``.

A registry is a YAML file mapping a name to its versions, each a location and the
``dataset_id`` its manifest must carry::

    atlas:
      v1: {uri: /data/atlas_v1, dataset_id: "sha256:4f1c..."}
      v2: {uri: atlas_v2, dataset_id: "sha256:9a07..."}

``CellDataset("atlas@v2", registry="datasets.yaml")`` opens the location of ``atlas@v2``
and refuses it when the manifest found there has another ``dataset_id``: the data changed
under the name, and a run that names ``atlas@v2`` must never silently read other cells. A
relative ``uri`` is relative to the registry file's directory; a URL (``s3://...``) is read
through fsspec. ``scmf-convert register`` (or :func:`register`) adds entries. A version,
once registered, names one ``dataset_id`` for good: registering another id under it is
refused unless ``overwrite=True``.

PyYAML is imported when a registry is read or written (the ``registry`` extra), never when
:mod:`scmf_loader` is imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scmf_loader.errors import (
    ConfigurationError,
    DatasetChangedError,
    ManifestError,
    RegistryError,
    UnknownDatasetError,
)

__all__ = [
    "DatasetChangedError",
    "Registry",
    "RegistryEntry",
    "RegistryError",
    "UnknownDatasetError",
    "check_dataset_id",
    "load_registry",
    "open_registered",
    "parse_spec",
    "register",
    "resolve",
]


@dataclass(frozen=True)
class RegistryEntry:
    """One registered version: ``name@version`` at ``uri`` (as written in the registry),
    ``location`` (``uri`` resolved against the registry's directory) and its ``dataset_id``."""

    name: str
    version: str
    uri: str
    dataset_id: str
    location: str

    @property
    def spec(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - exercised by a test that hides yaml
        raise RegistryError(
            "reading a dataset registry needs PyYAML: pip install 'scmodelforge-data[registry]' "
            "(or pip install pyyaml)"
        ) from None
    return yaml


def parse_spec(spec: str) -> tuple[str, str]:
    """``"atlas@v2"`` -> ``("atlas", "v2")``; anything else is a ConfigurationError."""
    if not isinstance(spec, str) or spec.count("@") != 1:
        raise ConfigurationError(f"{spec!r} is not a registry name: expected 'name@version', e.g. 'atlas@v2'")
    name, version = spec.split("@")
    if not name or not version:
        raise ConfigurationError(f"{spec!r} is not a registry name: expected 'name@version', e.g. 'atlas@v2'")
    return name, version


def _is_url(uri: str) -> bool:
    return "://" in uri


class Registry:
    """A registry file, read and validated. ``entries[name][version]`` is a
    :class:`RegistryEntry`; names and versions keep the file's order."""

    def __init__(self, path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, RegistryEntry]] = {}
        for name, versions in data.items():
            name = str(name)
            if "@" in name or not name:
                raise RegistryError(f"{self.path}: dataset name {name!r} must be non-empty and hold no '@'")
            if not isinstance(versions, Mapping):
                raise RegistryError(f"{self.path}: {name!r} must map versions to entries, found {type(versions).__name__}")
            self.entries[name] = {}
            for version, entry in versions.items():
                self.entries[name][str(version)] = self._entry(name, str(version), entry)

    def _entry(self, name: str, version: str, entry: Any) -> RegistryEntry:
        where = f"{self.path}: {name}@{version}"
        if "@" in version or not version:
            raise RegistryError(f"{where}: a version must be non-empty and hold no '@'")
        if not isinstance(entry, Mapping):
            raise RegistryError(f"{where}: expected a mapping with 'uri' and 'dataset_id', found {type(entry).__name__}")
        for key in ("uri", "dataset_id"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise RegistryError(f"{where}: {key!r} must be a non-empty string, found {entry.get(key)!r}")
        uri = entry["uri"]
        location = uri if _is_url(uri) or os.path.isabs(uri) else str(self.path.parent / uri)
        return RegistryEntry(name, version, uri, entry["dataset_id"], location)

    def resolve(self, spec: str) -> RegistryEntry:
        """The entry of ``"name@version"``; an unknown name or version is an
        :class:`UnknownDatasetError` listing what the registry holds."""
        name, version = parse_spec(spec)
        versions = self.entries.get(name)
        if versions is None:
            raise UnknownDatasetError(
                f"{self.path}: no dataset named {name!r}; registered names: {sorted(self.entries) or 'none'}"
            )
        entry = versions.get(version)
        if entry is None:
            raise UnknownDatasetError(
                f"{self.path}: {name!r} has no version {version!r}; registered versions: {list(versions)}"
            )
        return entry

    def to_dict(self) -> dict[str, dict[str, dict[str, str]]]:
        """The registry as plain data (what :meth:`save` writes)."""
        return {
            name: {v: {"uri": e.uri, "dataset_id": e.dataset_id} for v, e in versions.items()}
            for name, versions in self.entries.items()
        }

    def save(self) -> Path:
        """Write the registry atomically (temporary file, then rename)."""
        yaml = _yaml()
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)
        return self.path


def load_registry(path: str | os.PathLike[str], *, missing_ok: bool = False) -> Registry:
    """Read and validate the registry file ``path`` (``missing_ok``: an absent file is an
    empty registry, for :func:`register`)."""
    p = Path(path)
    if not p.is_file():
        if missing_ok and not p.exists():
            return Registry(p, {})
        raise RegistryError(f"{p}: no such registry file")
    yaml = _yaml()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RegistryError(f"{p}: not a valid YAML registry ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RegistryError(f"{p}: a registry maps dataset names to versions; found a {type(data).__name__}")
    return Registry(p, data)


def resolve(spec: str, registry: str | os.PathLike[str] | Registry) -> RegistryEntry:
    """The :class:`RegistryEntry` of ``"name@version"`` in ``registry`` (a path or a
    loaded :class:`Registry`)."""
    reg = registry if isinstance(registry, Registry) else load_registry(registry)
    return reg.resolve(spec)


def _remote_dataset_id(url: str) -> str:
    """The ``dataset_id`` of the manifest at ``url`` (read through fsspec)."""
    try:
        import fsspec
    except ImportError:
        raise ConfigurationError(f"{url}: a dataset at a URL needs fsspec: pip install 'scmodelforge-data[remote]'") from None
    from scmf_loader.format import MANIFEST_NAME, manifest_from_dict

    where = url.rstrip("/") + "/" + MANIFEST_NAME
    try:
        with fsspec.open(where, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{where}: no manifest; not an scmf dataset") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{where}: cannot read the manifest ({exc})") from None
    return manifest_from_dict(raw).dataset_id


def check_dataset_id(entry: RegistryEntry, found: str) -> None:
    """Refuse a dataset whose ``dataset_id`` is not the one the registry pins."""
    if found != entry.dataset_id:
        raise DatasetChangedError(
            f"{entry.location}: registered as {entry.spec} with dataset_id {entry.dataset_id}, but its "
            f"manifest has dataset_id {found}: the data changed under the name. Register the new data "
            f"under a new version (scmf-convert register) or point {entry.spec} back at the original."
        )


def open_registered(spec: str, registry: str | os.PathLike[str] | Registry, **open_kwargs: Any) -> Any:
    """What ``CellDataset(spec, registry=...)`` opens: a local dataset as an opened
    :class:`~scmf_loader.store.DatasetStore` (``open_kwargs`` go to
    :func:`~scmf_loader.store.open_dataset`), a URL as the URL itself, in both cases after
    checking the manifest's ``dataset_id`` against the registry's."""
    entry = resolve(spec, registry)
    if _is_url(entry.location):
        check_dataset_id(entry, _remote_dataset_id(entry.location))
        return entry.location
    from scmf_loader.format import read_manifest
    from scmf_loader.opening import open_dataset

    check_dataset_id(entry, read_manifest(entry.location).dataset_id)  # before anything is mapped
    store = open_dataset(entry.location, **open_kwargs)
    check_dataset_id(entry, store.manifest.dataset_id)  # the manifest may have changed since
    return store


def register(
    dataset: str | os.PathLike[str],
    name: str,
    version: str,
    registry: str | os.PathLike[str],
    *,
    uri: str | None = None,
    overwrite: bool = False,
) -> RegistryEntry:
    """Register the dataset directory ``dataset`` as ``name@version`` in the registry file
    (created if absent), pinned to its manifest's ``dataset_id``.

    ``uri`` is what the registry records (default: ``dataset``'s path relative to the
    registry's directory when it lies below it, else absolute). Re-registering the same
    ``dataset_id`` is a no-op; another one under an existing version is refused unless
    ``overwrite``.
    """
    from scmf_loader.format import read_manifest

    spec = f"{name}@{version}"
    parse_spec(spec)
    dataset_id = read_manifest(dataset).dataset_id
    reg = load_registry(registry, missing_ok=True)
    if uri is None:
        target, base = Path(dataset).resolve(), reg.path.resolve().parent
        uri = str(target.relative_to(base)) if target.is_relative_to(base) else str(target)
    old = reg.entries.get(name, {}).get(version)
    if old is not None and old.dataset_id != dataset_id and not overwrite:
        raise RegistryError(
            f"{reg.path}: {spec} is already registered with dataset_id {old.dataset_id}; {dataset} has "
            f"{dataset_id}. A version names one dataset for good: register a new version (or overwrite)"
        )
    entry = reg._entry(name, str(version), {"uri": uri, "dataset_id": dataset_id})
    reg.entries.setdefault(name, {})[str(version)] = entry
    reg.save()
    return entry
