"""A fork server for crash tests of ``scmf-convert``.

Killing conversions at a dozen points needs a dozen processes; starting each from scratch
costs seconds of imports. :class:`ForkServer` starts one helper interpreter that imports the
converter once, then forks a child per request that runs the ``scmf-convert`` command line
(``scmf_shards.cli.main``) with the crash hook ``SCMF_FAULT_AFTER`` set as asked. The helper
never touches zarr or dask itself and refuses to fork while it has more than one thread, so
children start from a clean single-threaded state. Children are the helper's, so it also
waits for them and reports their exit status (negative: killed by that signal).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

_SERVER = r"""
import json, os, sys, threading, traceback
import anndata, h5py, zarr  # noqa: F401  (imported once, before any fork)
import scmf_shards.cli, scmf_shards.convert.driver, scmf_shards.faults, scmf_shards.sources.h5ad  # noqa: F401
FAULT = scmf_shards.faults.FAULT_ENV
os.environ.pop(FAULT, None)
reply = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        reply.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()
        continue
    if threading.active_count() != 1:
        reply.write(json.dumps({"error": f"{threading.active_count()} threads; not forking"}) + "\n")
        reply.flush()
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if req["fault"]:
                os.environ[FAULT] = req["fault"]
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            scmf_shards.cli.main(req["args"], prog_name="scmf-convert")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    reply.write(json.dumps({"pid": pid}) + "\n")
    reply.flush()
"""


class ForkServer:
    """Run ``scmf-convert`` commands in forked children of one pre-imported helper process.

    Use as a context manager; :meth:`start` returns a child's pid, :meth:`wait` its exit
    status (``-9`` when SIGKILLed), :meth:`run` both at once. A child's stdout and stderr go
    to the ``log`` file given to :meth:`start`.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ForkServer:
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.stdin.close()  # type: ignore[union-attr]
        self._proc.wait(timeout=60)
        self._proc.stdout.close()  # type: ignore[union-attr]

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit {self._proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def start(self, args: list[str], log: Path, fault: str | None = None) -> int:
        """Fork a child running ``scmf-convert ARGS`` (crash hook armed with ``fault``)."""
        return int(self._ask({"op": "run", "args": args, "fault": fault, "log": str(log)})["pid"])

    def wait(self, pid: int) -> int:
        """Exit status of child ``pid``: its exit code, or ``-signal`` if a signal ended it."""
        return int(self._ask({"op": "wait", "pid": pid})["status"])

    def run(self, args: list[str], log: Path, fault: str | None = None) -> int:
        """:meth:`start` then :meth:`wait`."""
        return self.wait(self.start(args, log, fault))
