"""Shared fixtures. Every test proves it left nothing behind in /dev/shm."""

from __future__ import annotations

import os

import pytest

from paramserver.store import PREFIX, SHM_DIR


def _segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail any test that leaves a paramserver segment in /dev/shm."""
    before = _segments()
    yield
    leaked = _segments() - before
    for name in leaked:  # clean up so one leak does not fail every later test
        os.unlink(os.path.join(SHM_DIR, name))
    assert not leaked, f"test left shared-memory segments behind: {sorted(leaked)}"
