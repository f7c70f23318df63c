"""Soak: 4 workers for several minutes while a random worker is SIGKILLed every few
seconds. The run must go on, the loss must fall, and /dev/shm must end clean.

    .venv/bin/python -m pytest -m slow tests/faults/test_soak.py
"""

from __future__ import annotations

import os
import random
import signal

import pytest
from helpers import config

import paramserver as ps
from paramserver.models.numpy_models import NumpyMLP

MINUTES = 3.0
KILL_EVERY = 5.0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["po3", "po1"])
def test_random_kills_for_minutes(policy):
    rng = random.Random(0)
    kills: list[float] = []
    losses: list[float] = []

    def chaos(info):
        if info["loss"] is not None:
            losses.append(info["loss"])
        if info["elapsed"] >= (len(kills) + 1) * KILL_EVERY:
            os.kill(rng.choice(info["pids"]), signal.SIGKILL)
            kills.append(info["elapsed"])

    cfg = config(
        workers=4, policy=policy, epochs=10**6, lr=0.01, max_seconds=MINUTES * 60,
        max_restarts=10**6, hang_timeout=30,
    )  # fmt: skip
    result = ps.train(NumpyMLP(64, 10, 32), ps.load_digits(), cfg, callback=chaos)
    assert result.stop_reason == "time", result.summary()
    assert len(kills) >= MINUTES * 60 / KILL_EVERY - 2
    assert result.restarts == len(kills)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert result.test_accuracy > 0.9, result.summary()
