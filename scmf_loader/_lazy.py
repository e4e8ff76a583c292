"""PEP 562 lazy exports, shared by the packages whose public names live in heavier modules.

``__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)`` makes each name of
``_LAZY`` (name -> module) import its module on first access, caches the value in the
package's globals, and makes ``dir(package)`` list the public API (``__all__``) only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, namespace: MutableMapping[str, Any], table: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` (see the module doc)."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(public)

    return __getattr__, __dir__
