"""A loader's worker threads get their share of the spare cores for the output kernels
(scmf_loader.outputs._threads.worker_thread_default)."""

from __future__ import annotations

import threading

import pytest

from scmf_loader.outputs import _threads


def _in_thread(fn):  # noqa: ANN001, ANN202
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.fixture
def two_idle_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_threads, "_usable_cpus", lambda: 2)
    monkeypatch.setattr(_threads, "_busy", lambda cpus: False)
    monkeypatch.delenv("SCMF_OUTPUT_THREADS", raising=False)
    _threads.set_threads(None)


def _share(n_workers: int) -> int:
    _threads.worker_thread_default(n_workers)
    return _threads.resolve_threads(None)


def test_a_lone_worker_thread_gets_the_spare_core(two_idle_cores: None) -> None:
    assert _in_thread(lambda: _threads.resolve_threads(None)) == 1  # any other thread: 1
    assert _in_thread(lambda: _share(1)) == 2
    assert _in_thread(lambda: _share(2)) == 1  # two workers already use both cores


def test_busy_cores_and_explicit_settings_win(two_idle_cores: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _in_thread(lambda: (_threads.worker_thread_default(1), _threads.resolve_threads(3))[1]) == 3
    _threads.set_threads(1)
    try:
        assert _in_thread(lambda: _share(1)) == 1
    finally:
        _threads.set_threads(None)
    monkeypatch.setattr(_threads, "_busy", lambda cpus: True)
    assert _in_thread(lambda: _share(1)) == 1


def test_the_setting_stays_in_its_thread(two_idle_cores: None) -> None:
    assert _in_thread(lambda: _share(1)) == 2
    assert _in_thread(lambda: _threads.resolve_threads(None)) == 1  # a new thread: back to 1
