"""Imports have no side effects: no Census library pulled in by the converter's h5ad path, and
no fork hook, exit hook or pinned reference installed by importing any module of ours. The
Census handle cache installs its hooks on the first open of a root, once per process.

Each check runs in a fresh interpreter whose ``os.register_at_fork``, ``atexit.register`` and
``ctypes.pythonapi.Py_IncRef`` are wrapped, before anything of ours is imported, by spies that
record the module of the caller (third-party libraries may register their own hooks; only
ours are asserted on)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from census_fixtures import CensusRoot

pytest_plugins = ["census_fixtures"]

#: installed first in the child: every call records (hook, calling module, callback module)
_SPIES = """
import atexit, ctypes, json, os, sys
CALLS = []

def _spy(kind, real):
    def spy(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        target = args[0] if args else next(iter(kwargs.values()), None)
        CALLS.append([kind, caller, getattr(target, "__module__", None)])
        return real(*args, **kwargs)
    return spy

os.register_at_fork = _spy("register_at_fork", os.register_at_fork)
atexit.register = _spy("atexit", atexit.register)
ctypes.pythonapi.Py_IncRef = _spy("Py_IncRef", ctypes.pythonapi.Py_IncRef)

def ours():
    return [c for c in CALLS
            if any(str(m).startswith(("scmf_loader", "scmf_shards")) for m in c[1:])]
"""

_HEAVY = ("tiledbsoma", "cellxgene_census", "somacore")


def _run(body: str) -> Any:
    """Run the spies then ``body`` in a fresh interpreter; ``body`` prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", _SPIES + body], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_our_modules_installs_no_hook_and_no_census_library() -> None:
    body = f"""
import scmf_shards, scmf_loader
import scmf_shards.sources.h5ad
after_h5ad = [m for m in {_HEAVY!r} if m in sys.modules]
import scmf_shards.sources.census
after_source = [m for m in {_HEAVY!r} if m in sys.modules]
import scmf_loader.census, scmf_loader.labels
import scmf_loader.census.filters, scmf_loader.census.query, scmf_loader.census.reads
import scmf_loader.census.handles, scmf_loader.census.dataset
from scmf_loader import CensusDataset
from scmf_loader.census import CensusQuery
after_all = [m for m in {_HEAVY!r} if m in sys.modules]
print(json.dumps(dict(h5ad=after_h5ad, source=after_source, all=after_all, calls=ours(),
                      census_query="scmf_loader.census_query" in sys.modules)))
"""
    got = _run(body)
    assert got["h5ad"] == []  # the h5ad path never imports the Census libraries
    assert got["source"] == []  # neither does the converter's Census source, until opened
    assert got["all"] == []
    assert got["calls"] == []  # no register_at_fork / atexit / Py_IncRef from our code
    assert got["census_query"] is False


def test_the_first_open_installs_the_hooks_once(census_root: CensusRoot) -> None:
    # the positive control of the spies above: opening roots installs the hooks, once
    body = f"""
from scmf_loader.census import CensusQuery, CensusSpec
before = ours()
queries = [CensusQuery(CensusSpec(uri={census_root.uri!r}, obs_filter=f))
           for f in ("tissue == 'lung'", "tissue == 'heart'")]
after = ours()
for q in queries:
    q.close()
print(json.dumps(dict(before=before, after=after)))
"""
    got = _run(body)
    assert got["before"] == []
    kinds = sorted(c[0] for c in got["after"])
    assert kinds == ["Py_IncRef", "atexit", "register_at_fork"]
    assert {c[1] for c in got["after"]} == {"scmf_loader.census.handles"}
