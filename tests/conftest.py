"""Shared fixtures. Every test proves it left nothing behind in /dev/shm."""

from __future__ import annotations

import os

import pytest

import paramserver as ps
from paramserver.store import SHM_DIR, list_segments


@pytest.fixture(scope="session")
def digits() -> ps.Dataset:
    """scikit-learn's digits, split as ``ps.load_digits()`` splits it (read-only in tests)."""
    return ps.load_digits()


def _ours_or_orphaned() -> set[str]:
    # Segments of this process, or of a dead one (a subprocess a test started, or a
    # crashed worker). A live process other than us is another run on this machine
    # (a second test session, a benchmark): its segments are not this test's to judge.
    me = os.getpid()
    return {name for name, pid, alive in list_segments() if pid == me or not alive}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail any test that leaves a paramserver segment in /dev/shm."""
    before = _ours_or_orphaned()
    yield
    leaked = _ours_or_orphaned() - before
    for name in leaked:  # clean up so one leak does not fail every later test
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not leaked, f"test left shared-memory segments behind: {sorted(leaked)}"
