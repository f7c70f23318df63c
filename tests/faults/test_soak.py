"""Soak: 4 workers for several minutes while a random worker is SIGKILLed every few
seconds (through the API), and a CLI run that also gets SIGTERMs, SIGSTOP+SIGCONT and
checkpoint requests at random. The run must go on, the loss must fall, and /dev/shm
and /tmp must end clean.

    .venv/bin/python -m pytest -m slow tests/faults/test_soak.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import config, workers_of

import paramserver as ps
from paramserver.checkpoint import load_checkpoint
from paramserver.models.numpy_models import NumpyMLP
from paramserver.store import list_segments

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


CLI_SECONDS = 150
ACT_EVERY = (1.5, 3.5)


@pytest.mark.slow
def test_random_signals_to_a_cli_run_for_minutes(tmp_path):
    """SIGKILL or SIGTERM a worker (restarted), SIGSTOP a worker or the server for up
    to 2 s then SIGCONT it (the run goes on; no hang is declared), SIGUSR1 the server
    (a checkpoint): one at random every few seconds, for minutes."""
    rng = random.Random(1)
    out, tmp = tmp_path / "runs", tmp_path / "tmp"
    tmp.mkdir()  # the run's TMPDIR: it must end empty
    log_out, log_err = tmp_path / "stdout", tmp_path / "stderr"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "paramserver", "train", "--backend", "numpy", "--no-progress",
                "--workers", "4", "--epochs", "1000000", "--lr", "0.01",
                "--max-seconds", str(CLI_SECONDS), "--max-restarts", "1000000",
                "--hang-timeout", "30", "--out-dir", str(out),
            ],
            stdout=fo, stderr=fe, text=True, env={**os.environ, "TMPDIR": str(tmp)},
        )  # fmt: skip
    done: dict[str, int] = {"kill": 0, "term": 0, "stop-worker": 0, "stop-server": 0, "usr1": 0}
    try:
        deadline = time.monotonic() + 90
        while not (out.exists() and any((d / "metrics.jsonl").exists() for d in out.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, log_err.read_text()
            time.sleep(0.1)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < CLI_SECONDS - 10:
            time.sleep(rng.uniform(*ACT_EVERY))
            workers = [w for w in workers_of(proc.pid) if w.status() != "zombie"]
            action = rng.choice(list(done))
            if action in ("kill", "term", "stop-worker") and len(workers) < 4:
                continue  # a restart is under way: wait for it
            try:
                if action == "kill":
                    rng.choice(workers).send_signal(signal.SIGKILL)
                elif action == "term":
                    rng.choice(workers).send_signal(signal.SIGTERM)
                elif action == "usr1":
                    proc.send_signal(signal.SIGUSR1)
                else:
                    target = rng.choice(workers).pid if action == "stop-worker" else proc.pid
                    os.kill(target, signal.SIGSTOP)
                    time.sleep(rng.uniform(0.2, 2.0))
                    os.kill(target, signal.SIGCONT)
            except (ProcessLookupError, OSError):
                continue  # it exited in between
            done[action] += 1
        proc.wait(timeout=CLI_SECONDS + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stderr = log_err.read_text()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert done["kill"] + done["term"] >= 5 and done["usr1"] >= 2, done
    (run,) = list(out.iterdir())
    result = json.loads((run / "results.json").read_text())["result"]
    assert result["stop_reason"] == "time", result
    assert result["restarts"] == done["kill"] + done["term"], (result["restarts"], done)
    assert result["test_accuracy"] > 0.9, result
    assert load_checkpoint(str(run)).version == result["version"]
    assert not [n for n, pid, _ in list_segments() if pid == proc.pid]
    assert list(tmp.iterdir()) == []  # no private dir, no pymp-*, nothing of anybody's
