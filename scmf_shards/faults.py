"""Crash-test hook for the converter, inert unless ``SCMF_FAULT_AFTER`` is set.

Every file operation of a conversion is followed by ``fault_point(label)``. With
``SCMF_FAULT_AFTER=N`` in the environment, the N-th call in a process sends that process
SIGKILL (a crash at a deterministic point); with ``SCMF_FAULT_AFTER=N:STOP`` it sends
SIGSTOP instead (the process holds its lock until SIGCONT). Tests use it to kill
conversions at chosen points and check that a re-run finishes byte-identical.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "fault_point"]

FAULT_ENV = "SCMF_FAULT_AFTER"
_calls = 0


def fault_point(label: str) -> None:
    """Count one file operation (``label`` names it); crash here if it is the chosen one."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    global _calls
    _calls += 1
    n, _, how = spec.partition(":")
    if _calls == int(n):
        os.kill(os.getpid(), signal.SIGSTOP if how == "STOP" else signal.SIGKILL)
