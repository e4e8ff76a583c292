"""fsspec for remote datasets: URL tests, the filesystem of a URL, and retries with backoff.

fsspec (and the protocol's own package: s3fs, gcsfs, ...) is imported when a URL is opened:
it is the optional extra ``scmodelforge-data[remote]``. Shared by the cache (downloads) and
the remote store (manifests); depends on neither.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.streaming.errors import RemoteError

__all__ = ["DEFAULT_RETRIES", "filesystem", "is_url", "local_path", "with_retries"]

DEFAULT_RETRIES = 5
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ScmfError,
              TypeError, AttributeError, NotImplementedError, KeyError, ImportError)
T = TypeVar("T")


def is_url(source: Any) -> bool:
    """Whether ``source`` is a URL (``scheme://...``), as opposed to a local path."""
    return isinstance(source, str) and _URL.match(source) is not None


def local_path(source: Any) -> str | None:
    """The local path of a plain path or ``file://`` URL; ``None`` for any other URL."""
    if not is_url(source):
        return os.fspath(source)
    if source.startswith("file://"):
        return source[len("file://"):]
    return None


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of ``url`` (path without a trailing slash)."""
    try:
        import fsspec
    except ImportError:
        raise ConfigurationError(
            f"{url}: reading a dataset at a URL needs fsspec and the protocol's package "
            "(e.g. s3fs): pip install 'scmodelforge-data[remote]'"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:  # fsspec knows the protocol but its package is missing
        raise ConfigurationError(f"{url}: {exc} (or pip install 'scmodelforge-data[remote]')") from None
    except ValueError as exc:
        raise ConfigurationError(f"{url}: not a URL fsspec can open ({exc})") from None
    return fs, str(path).rstrip("/")


def _permanent(exc: BaseException) -> bool:
    name = type(exc).__name__
    return isinstance(exc, _PERMANENT) or "Credential" in name or name in ("NoSuchBucket", "AccessDenied")


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def with_retries(call: Callable[[], T], url: str, what: str, retries: int = DEFAULT_RETRIES,
                 backoff: float = 0.05) -> T:
    """``call()``, retried with exponential backoff (jittered, at most 2 s apart) on
    transient errors, at most ``retries`` times. Permanent errors (missing object, access
    refused, ...) are raised at once; a transient one still failing at the end raises
    :class:`~scmf_loader.streaming.errors.RemoteError` naming ``url`` and ``what``."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if _permanent(exc):
                raise
            if attempt >= retries:
                raise RemoteError(f"{url}: {what} failed after {attempt + 1} attempt(s); last error: {_describe(exc)}") from exc
        time.sleep(min(2.0, backoff * 2**attempt) * (0.5 + random.random()))
        attempt += 1


