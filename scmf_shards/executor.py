"""Where conversion tasks run: in this process (one thread, or ``workers`` threads), or on a
dask.distributed scheduler.

Results never depend on where tasks ran: every task is a pure function of its arguments
and writes its own files; the driver merges the results in task order.

Local runs use threads, not processes: the converter's hot loops are numba kernels that
release the GIL (:mod:`scmf_shards.kernels`), file reads and writes release it too, so
``workers`` threads keep that many cores busy while sharing one copy of the sources, the
vocabulary and (one-pass conversions) the shuffled data held in memory. Processes would
pay an interpreter, imports and a copy of every task's arguments and results each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["TaskRunner"]

T = TypeVar("T")


class TaskRunner:
    """Runs batches of independent tasks with a progress bar.

    ``scheduler``: address of a running dask.distributed scheduler (``tcp://HOST:PORT``);
    otherwise tasks run in this process, on ``workers`` threads (``workers == 1``: in the
    calling thread). Use as a context manager.
    """

    def __init__(self, workers: int = 1, scheduler: str | None = None, quiet: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.scheduler = scheduler
        self.quiet = quiet
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> TaskRunner:
        if self.scheduler is not None:
            from distributed import Client

            logging.getLogger("distributed").setLevel(logging.CRITICAL)  # errors reach the driver
            self._client = Client(self.scheduler, timeout="30s")
        elif self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="scmf-task")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._client = self._pool = None

    @property
    def in_process(self) -> bool:
        """Whether tasks run in this process (so they can share memory with the driver)."""
        return self.scheduler is None

    @property
    def threads(self) -> int:
        """How many tasks run at once in this process (0 on a scheduler)."""
        return self.workers if self.in_process else 0

    @property
    def description(self) -> str:
        """Human-readable description of where tasks run."""
        if self.scheduler:
            return f"dask scheduler {self.scheduler}"
        return f"in-process, {self.workers} threads" if self.workers > 1 else "in-process"

    def map(self, fn: Callable[..., T], items: Sequence[Any], desc: str) -> list[T]:
        """``[fn(item) for item in items]``, run where configured, results in item order.
        The first task error is raised after cancelling the tasks not yet started."""
        bar = tqdm(total=len(items), desc=desc, unit="task", disable=self.quiet, leave=False)
        try:
            if self._pool is not None:
                return self._map_threads(fn, items, bar)
            if self._client is None:
                out = []
                for item in items:
                    out.append(fn(item))
                    bar.update(1)
                return out
            return self._map_dask(fn, items, bar)
        finally:
            bar.close()

    def _map_threads(self, fn: Callable[..., T], items: Sequence[Any], bar: Any) -> list[T]:
        assert self._pool is not None
        futures: list[Future[T]] = []
        for item in items:
            fut = self._pool.submit(fn, item)
            fut.add_done_callback(lambda _f: bar.update(1))
            futures.append(fut)
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for f in pending:
                f.cancel()
            wait(pending)  # tasks already running finish (they own their files) before raising
            raise failed[0].exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def _map_dask(self, fn: Callable[..., T], items: Sequence[Any], bar: Any) -> list[T]:
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
