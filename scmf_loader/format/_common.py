"""Small validation and hashing helpers shared by the format modules (private)."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from scmf_loader.errors import ManifestError

_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB pieces (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of an in-memory buffer."""
    return hashlib.sha256(data).hexdigest()


#: the shard-array checksums a manifest entry may carry: format v1 writes ``sha256``,
#: format v2 ``xxh3_128`` (XXH3, 128-bit, seed 0, digest as 32 hex digits, big-endian as
#: the xxHash reference's canonical form prints it)
CHECKSUM_ALGORITHMS = ("sha256", "xxh3_128")


def _xxh3_128() -> Any:
    try:
        import xxhash  # imported lazily: only checksums of format v2 need it
    except ImportError:  # pragma: no cover - a dependency of the package
        from scmf_loader.errors import ScmfError

        raise ScmfError("format v2 checksums need the 'xxhash' package: pip install xxhash") from None
    return xxhash.xxh3_128()


def hasher(algorithm: str) -> Any:
    """A fresh hash object (``update``, ``hexdigest``) of one of :data:`CHECKSUM_ALGORITHMS`."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        return _xxh3_128()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; expected one of {CHECKSUM_ALGORITHMS}")


def file_checksum(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest of a file's bytes with ``algorithm``, read in 8 MiB pieces (bounded memory)."""
    if algorithm == "sha256":
        return sha256_file(path)
    h = hasher(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return str(h.hexdigest())


def buffer_checksum(data: bytes | memoryview, algorithm: str) -> str:
    """Hex digest of an in-memory buffer with ``algorithm``."""
    h = hasher(algorithm)
    h.update(data)
    return str(h.hexdigest())


def check_relpath(path: str, what: str) -> str:
    """``path`` if it is relative and stays inside the dataset directory, else ManifestError."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what}: path must be a non-empty string, found {path!r}")
    norm = posixpath.normpath(path)
    if path.startswith(("/", "\\")) or ":" in path or norm.startswith("..") or "\\" in path:
        raise ManifestError(
            f"{what}: path {path!r} must be relative and stay inside the dataset directory"
        )
    return path


def type_name(typ: type | tuple[type, ...]) -> str:
    """``int`` or ``int/NoneType`` for messages."""
    return typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)


def check_type(value: Any, typ: type | tuple[type, ...], key: str, what: str) -> Any:
    """``value`` if it is a ``typ`` (a bool is never an int here), else ManifestError."""
    wants_int = typ is int or (isinstance(typ, tuple) and int in typ and bool not in typ)
    if wants_int and isinstance(value, bool):
        raise ManifestError(f"{what}: {key!r} must be {type_name(typ)}, found bool")
    if not isinstance(value, typ):
        raise ManifestError(f"{what}: {key!r} must be {type_name(typ)}, found {type(value).__name__}")
    return value


def req(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    """The required key ``key`` of ``d``, checked to be a ``typ``."""
    if key not in d:
        raise ManifestError(f"{what}: missing required key {key!r}")
    return check_type(d[key], typ, key, what)


def nonneg(value: int, key: str, what: str) -> int:
    """``value`` if it is >= 0, else ManifestError."""
    if value < 0:
        raise ManifestError(f"{what}: {key!r} must be >= 0, found {value}")
    return value
