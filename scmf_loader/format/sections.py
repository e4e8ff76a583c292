"""Typed sections of the manifest: ``vocab``, ``preprocessing`` and ``shuffle``.

Each section is a read-only mapping over exactly the JSON object the manifest holds (so
``manifest.vocab["path"]``, ``dict(manifest.shuffle)`` and the written bytes stay what they
were) plus typed properties for the keys the format defines. The keys the format defines are
type-checked when a section is built; other keys are kept as they are (a newer writer's extra
keys survive a read-write round trip).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from scmf_loader.errors import ManifestError
from scmf_loader.format._common import check_relpath, check_type

__all__ = ["PreprocessingSection", "ShuffleSection", "VocabSection"]


class _Section(Mapping[str, Any]):
    """A validated, read-only JSON object of the manifest."""

    section: ClassVar[str] = "section"
    required: ClassVar[tuple[str, ...]] = ()
    fields: ClassVar[Mapping[str, type | tuple[type, ...]]] = {}

    def __init__(self, raw: Mapping[str, Any] | None = None, *, what: str = "manifest") -> None:
        if isinstance(raw, _Section):
            raw = raw._raw
        where = f"{what} {self.section}"
        if not isinstance(raw, Mapping):
            raise ManifestError(f"{where}: must be a JSON object, found {type(raw).__name__}")
        self._raw: dict[str, Any] = dict(raw)
        for key in self.required:
            if key not in self._raw:
                raise ManifestError(f"{where}: missing required key {key!r}")
        for key, typ in self.fields.items():
            if key in self._raw:
                check_type(self._raw[key], typ, key, where)
        self._validate(where)

    def _validate(self, where: str) -> None:
        """Checks beyond the key types (overridden by sections that need them)."""

    def __getitem__(self, key: str) -> Any:
        return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._raw!r})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in its original key order (a copy)."""
        return dict(self._raw)


class VocabSection(_Section):
    """``vocab``: where the vocabulary file is and what it must hash to.

    ``sha256`` is THE vocabulary hash: the content hash of tokens and symbols
    (:meth:`scmf_loader.vocab.GeneVocab.sha256`), the one every reader checks and the one the
    ``dataset_id`` is built from. ``file_sha256`` (the file's bytes) is informative only."""

    section = "vocab"
    required = ("path",)
    fields = {"path": str, "sha256": str, "file_sha256": str, "name": (str, type(None)),
              "n_tokens": int}

    def _validate(self, where: str) -> None:
        check_relpath(self._raw["path"], where)

    @property
    def path(self) -> str:
        """Path of the vocabulary file, relative to the dataset directory."""
        return str(self._raw["path"])

    @property
    def sha256(self) -> str | None:
        """Content hash of tokens and symbols (see ``docs/format.md`` section 4), if recorded."""
        return self._raw.get("sha256")

    @property
    def file_sha256(self) -> str | None:
        """sha256 of the vocabulary file's bytes (informative; readers check :attr:`sha256`)."""
        return self._raw.get("file_sha256")

    @property
    def name(self) -> str | None:
        """The vocabulary's name (``human_protein_coding``, ``union``, ...)."""
        return self._raw.get("name")

    @property
    def n_tokens(self) -> int | None:
        """Number of tokens, special tokens included, if recorded."""
        return self._raw.get("n_tokens")


class ShuffleSection(_Section):
    """``shuffle``: whether cells were shuffled across shards, and with which parameters."""

    section = "shuffle"
    fields = {"enabled": bool, "seed": int, "chunk_size": int, "shard_size": int}

    @property
    def enabled(self) -> bool | None:
        """Whether the converter shuffled cells across shards (``None``: not recorded)."""
        return self._raw.get("enabled")

    @property
    def seed(self) -> int | None:
        """The shuffle seed."""
        return self._raw.get("seed")

    @property
    def chunk_size(self) -> int | None:
        """Rows per input chunk of the shuffle."""
        return self._raw.get("chunk_size")

    @property
    def shard_size(self) -> int | None:
        """The maximum number of cells per shard that was asked for."""
        return self._raw.get("shard_size")


class PreprocessingSection(_Section):
    """``preprocessing``: every parameter of what was (``baked``) or is to be applied to the
    stored values; ``docs/preprocessing.md`` defines the keys. ``{"normalize": null,
    "log1p": false, "hvg": null}`` means raw values."""

    section = "preprocessing"
    fields = {"normalize": (str, type(None)), "log1p": bool, "baked": bool,
              "hvg_genes": (list, type(None))}

    @property
    def normalize(self) -> str | None:
        """The normalisation (``"library_size"``, ...), or ``None``."""
        return self._raw.get("normalize")

    @property
    def log1p(self) -> bool:
        """Whether ``log1p`` is part of the pipeline."""
        return bool(self._raw.get("log1p", False))

    @property
    def hvg_genes(self) -> list[str] | None:
        """The highly variable genes kept (vocabulary tokens), or ``None``."""
        return self._raw.get("hvg_genes")

    @property
    def baked(self) -> bool:
        """Whether the stored values already hold the result (the default when not recorded)."""
        return bool(self._raw.get("baked", True))
