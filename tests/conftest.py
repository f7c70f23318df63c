"""Shared fixtures. Every test proves it left nothing behind in /dev/shm: no segment and
no semaphore that its own processes created."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator

import psutil
import pytest

import paramserver as ps
from paramserver.store import SHM_DIR, list_segments

LOKY_SEMAPHORE = re.compile(r"^sem\.loky-(\d+)-")
"""Semaphores named by joblib's loky (which replaces multiprocessing's naming) carry the pid."""


@pytest.fixture(scope="session")
def digits() -> ps.Dataset:
    """scikit-learn's digits, split as ``ps.load_digits()`` splits it (read-only in tests)."""
    return ps.load_digits()


class _ProcessTree:
    """The pids of this process and of every process it started while the test ran
    (polled: a subprocess of a test lives for seconds at least)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.pids = {self.me.pid}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="test-process-tree", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            self._note()
            if self._done.wait(0.1):
                return

    def _note(self) -> None:
        try:
            self.pids.update(p.pid for p in self.me.children(recursive=True))
        except psutil.Error:
            pass

    def stop(self) -> set[int]:
        self._done.set()
        self._thread.join(5)
        self._note()
        return self.pids


def _ours(names_by_pid: dict[str, int | None], pids: set[int]) -> set[str]:
    return {name for name, pid in names_by_pid.items() if pid in pids}


def _shm_names() -> dict[str, int | None]:
    """Our segments and semaphores, and loky-named semaphores, with their creator's pid."""
    found: dict[str, int | None] = {name: pid for name, pid, _ in list_segments()}
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        entries = []
    for name in entries:
        m = LOKY_SEMAPHORE.match(name)
        if m:
            found[name] = int(m.group(1))
    return found


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fail any test that leaves a paramserver segment or semaphore in /dev/shm.

    Only what this test's own processes created counts: other runs on this machine
    (a second test session, a benchmark) create and leave their own."""
    before = set(_shm_names())
    tree = _ProcessTree()
    yield
    pids = tree.stop()
    leaked = _ours({n: p for n, p in _shm_names().items() if n not in before}, pids)
    for name in leaked:  # clean up so one leak does not fail every later test
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not leaked, f"test left shared-memory segments or semaphores behind: {sorted(leaked)}"
