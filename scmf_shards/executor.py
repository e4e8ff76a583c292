"""Where conversion tasks run: in this process, a local dask cluster, or a remote scheduler.

Results never depend on where tasks ran: every task is a pure function of its arguments
and writes its own files; the driver merges the results in task order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["TaskRunner"]

T = TypeVar("T")


class TaskRunner:
    """Runs batches of independent tasks with a progress bar.

    ``scheduler``: address of a running dask.distributed scheduler (``tcp://HOST:PORT``);
    otherwise ``workers > 1`` starts a local cluster of ``workers`` single-threaded processes,
    and ``workers == 1`` runs tasks in this process. Use as a context manager.
    """

    def __init__(self, workers: int = 1, scheduler: str | None = None, quiet: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.scheduler = scheduler
        self.quiet = quiet
        self._client: Any = None
        self._cluster: Any = None

    def __enter__(self) -> TaskRunner:
        if self.scheduler is not None:
            from distributed import Client

            self._client = Client(self.scheduler, timeout="30s")
        elif self.workers > 1:
            from distributed import Client, LocalCluster

            self._cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # any free port: None still binds 8787 and warns if taken
                silence_logs=logging.CRITICAL,  # task errors reach the driver and are reported once
            )
            self._client = Client(self._cluster)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None

    @property
    def description(self) -> str:
        """Human-readable description of where tasks run."""
        if self.scheduler:
            return f"dask scheduler {self.scheduler}"
        return f"local dask cluster ({self.workers} processes)" if self.workers > 1 else "in-process"

    def map(self, fn: Callable[..., T], items: Sequence[Any], desc: str) -> list[T]:
        """``[fn(item) for item in items]``, run where configured, results in item order.
        The first task error is raised after cancelling the rest."""
        bar = tqdm(total=len(items), desc=desc, unit="task", disable=self.quiet, leave=False)
        try:
            if self._client is None:
                out = []
                for item in items:
                    out.append(fn(item))
                    bar.update(1)
                return out
            from distributed import as_completed

            futures = self._client.map(fn, list(items), pure=False)
            try:
                for fut in as_completed(futures):
                    if fut.status == "error":
                        fut.result()  # raises the task's exception
                    bar.update(1)
                return self._client.gather(futures)
            finally:
                self._client.cancel(futures)
        finally:
            bar.close()
