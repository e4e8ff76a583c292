"""Lifetimes of the TileDB objects behind Census queries, per process.

TileDB contexts own thread pools; an array must not outlive its context, and no TileDB object
may be used or destroyed in a forked child (its thread pools do not exist there). So:

- one ``SOMATileDBContext`` per process and TileDB configuration (:func:`context`), shared by
  every root opened there and never destroyed, instead of a new context per opened root;
- open roots are :class:`Handles`, shared by the copies of one query in a process and closed
  deterministically: when the last query using them closes, or when the per-process cache
  (:func:`remember`, 4 entries) evicts them and no query uses them, and at exit;
- in a forked child, every handle and context inherited from the parent is set aside, alive,
  untouched and never freed, and the child opens its own.

Nothing happens at import: the fork and exit hooks are installed by :func:`context`, that is
on the first open of a Census root in the process (:func:`install_process_hooks`). Converting
``.h5ad`` files, or importing the loader, never installs them.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Mapping
from typing import Any

__all__ = ["Handles", "context", "install_process_hooks", "lookup", "release", "remember",
           "set_aside"]

#: per process: query key -> (shared SOMA handles or None, (obs joinids, var joinids, genes))
_PROCESS_CACHE: dict[tuple[Any, ...], tuple[Handles | None, Any]] = {}
_CACHE_SIZE = 4
#: per process: TileDB configuration -> the one SOMATileDBContext of this process for it
_CONTEXTS: dict[tuple[tuple[str, str], ...], Any] = {}
#: TileDB objects a forked child inherited from its parent (handles, contexts). They must not
#: be used or destroyed in the child, so they are kept here, unused, for the life of the
#: process (see _after_fork_in_child).
_INHERITED: list[Any] = []
_HOOKS_INSTALLED = False


class Handles:
    """An open Census root and its experiment, owned by the process that opened them. Copies
    of one query in that process may share them (``users``: the live queries using them); they
    are closed when the last user closes, or when the cache drops them and no query uses them."""

    def __init__(self, root: Any, exp: Any) -> None:
        self.root: Any = root
        self.exp: Any = exp
        self.pid = os.getpid()
        self.users: weakref.WeakSet[Any] = weakref.WeakSet()
        self.cached = False

    def usable(self) -> bool:
        """Open, and opened by this process (not inherited through fork)."""
        return self.pid == os.getpid() and self.root is not None

    def close(self) -> None:
        """Close the root (never a parent's handles in a forked child)."""
        if self.pid != os.getpid() or self.root is None:
            return
        root, self.root, self.exp = self.root, None, None
        root.close()

    def drop(self) -> None:
        """No longer cached: close now unless a live query still uses the handles (then its
        close() does, or they are freed with it, their context alive)."""
        self.cached = False
        if not self.users:
            self.close()


def install_process_hooks() -> None:
    """Install, once per process, the hook that sets inherited TileDB objects aside in a
    forked child and the exit hook that closes the cached roots. Called on the first open;
    forked children inherit both hooks (and the flag)."""
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    _pin(_INHERITED)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
    atexit.register(_close_cache_at_exit)


def context(tiledb_config: Mapping[str, Any] | None) -> Any:
    """The ``SOMATileDBContext`` of this process for ``tiledb_config`` (the cellxgene_census
    defaults plus these settings), created once and shared by every root opened here: every
    context owns TileDB thread pools, and arrays must never outlive their context. Installs
    the process hooks first."""
    install_process_hooks()
    key = tuple(sorted((str(k), str(v)) for k, v in (tiledb_config or {}).items()))
    found = _CONTEXTS.get(key)
    if found is None:
        import cellxgene_census

        config = dict(tiledb_config) if tiledb_config else None
        found = cellxgene_census.get_default_soma_context(tiledb_config=config)
        _CONTEXTS[key] = found
    return found


def lookup(key: tuple[Any, ...]) -> tuple[Handles | None, Any] | None:
    """The cache entry of a query key: ``(handles or None, arrays or None)``, or ``None``."""
    return _PROCESS_CACHE.get(key)


def remember(key: tuple[Any, ...], handles: Handles | None, arrays: Any) -> None:
    """Cache ``handles`` and/or ``arrays`` under ``key`` (``None`` keeps what is cached),
    evicting the oldest entries beyond the cache size (their handles dropped)."""
    old = _PROCESS_CACHE.pop(key, None)
    if old is not None:
        if handles is None:
            handles = old[0]
        elif old[0] is not None and old[0] is not handles:
            old[0].drop()
        arrays = arrays if arrays is not None else old[1]
    if handles is not None and not handles.usable():
        handles = None
    while len(_PROCESS_CACHE) >= _CACHE_SIZE:
        evicted = _PROCESS_CACHE.pop(next(iter(_PROCESS_CACHE)))[0]
        if evicted is not None and evicted is not handles:
            evicted.drop()
    if handles is not None:
        handles.cached = True
    _PROCESS_CACHE[key] = (handles, arrays)


def release(key: tuple[Any, ...], handles: Handles) -> None:
    """``handles`` are being closed: keep only the joinids of their cache entry."""
    entry = _PROCESS_CACHE.get(key)
    if entry is not None and entry[0] is handles:
        _PROCESS_CACHE[key] = (None, entry[1])


def set_aside(obj: Any) -> None:
    """Keep a TileDB object inherited through fork alive and untouched for good."""
    _INHERITED.append(obj)


def _after_fork_in_child() -> None:
    """In a forked child: set the parent's cached handles and contexts aside, alive and
    untouched, so that the child opens its own (queries holding a parent's handles notice the
    pid on their next use)."""
    if _PROCESS_CACHE or _CONTEXTS:
        _INHERITED.append((dict(_PROCESS_CACHE), dict(_CONTEXTS)))
        _PROCESS_CACHE.clear()
        _CONTEXTS.clear()


def _pin(obj: Any) -> None:
    """One extra reference to ``obj`` that is never released: not even the interpreter
    shutdown of a forked child that exits normally frees what ``_INHERITED`` holds."""
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    except Exception:  # pragma: no cover - not CPython
        pass


def _close_cache_at_exit() -> None:
    """Close this process's cached handles before interpreter shutdown tears modules down in
    an arbitrary order (forked children leave with ``os._exit`` and never get here)."""
    entries = list(_PROCESS_CACHE.values())
    _PROCESS_CACHE.clear()
    for handles, _ in entries:
        if handles is not None:
            handles.drop()
