"""Models and runs shared by several test modules (module level, so workers can unpickle them)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import psutil

import paramserver as ps
from paramserver.models.numpy_models import NumpyMLP, NumpyModel


def config(**kw) -> ps.TrainConfig:
    base = dict(workers=1, epochs=2, batch_size=32, lr=0.05, momentum=0.9, out_dir="", progress=False)
    return ps.TrainConfig(**{**base, **kw})


def small(data: ps.Dataset, n: int = 320) -> ps.Dataset:
    """The first ``n`` training samples of ``data``, with its whole test split."""
    return ps.Dataset(data.x_train[:n], data.y_train[:n], data.x_test, data.y_test, data.classes)


def tiny_data(n: int = 64) -> ps.Dataset:
    rng = np.random.default_rng(0)
    return ps.make_dataset(rng.normal(size=(n, 4)), rng.integers(0, 2, n), classes=2)


class ConstantGrad(NumpyModel):
    """A model whose gradient is 1 everywhere, whatever the batch."""

    def __init__(self, n: int):
        self.n = n

    def shapes(self):
        return {"w": (self.n,)}

    def init(self, rng):
        return {"w": np.zeros(self.n, np.float32)}

    def forward(self, params, x):
        return np.zeros((len(x), 2), np.float32), None

    def backward(self, params, cache, dlogits, grads):
        grads["w"][...] = 1.0


class Faulty(NumpyMLP):
    """An MLP that misbehaves once, in one worker process, at its ``at``-th backward pass.

    ``mode``: ``kill`` (SIGKILL itself mid-step), ``hang`` (sleep for ever),
    ``exit`` (os._exit(3)), ``raise`` (a Python exception) or ``nan`` (a NaN
    gradient, every time from then on). ``marker``: a file created when the fault
    fires, so a restarted worker does not fire it again. ``rank_pid_file``: only
    the first process to create this file misbehaves (one faulty worker).
    """

    def __init__(self, *args, mode: str, at: int, marker: str, **kw):
        super().__init__(*args, **kw)
        self.mode, self.at, self.marker = mode, at, marker
        self.calls = 0
        self.chosen: bool | None = None

    def _is_chosen(self) -> bool:
        if self.chosen is None:
            try:  # the first worker to get here is the faulty one
                fd = os.open(self.marker + ".chosen", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                self.chosen = True
            except FileExistsError:
                self.chosen = False
        return self.chosen

    def backward(self, params, cache, dlogits, grads):
        super().backward(params, cache, dlogits, grads)
        self.calls += 1
        if self.calls < self.at or not self._is_chosen():
            return
        if self.mode == "nan":
            grads["W0"][0, 0] = np.nan
            return
        if os.path.exists(self.marker):
            return  # fired in an earlier life
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.mode == "hang":
            time.sleep(3600)
        elif self.mode == "exit":
            os._exit(3)
        elif self.mode == "raise":
            raise RuntimeError("boom in user code")


def workers_of(pid: int) -> list[psutil.Process]:
    """The spawned worker processes of the process ``pid`` (not its resource tracker)."""
    return [
        c for c in psutil.Process(pid).children()
        if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())
    ]  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """The output of ``proc`` once it exits; killed if it has not within ``timeout``."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class FaultyStart(NumpyMLP):
    """An MLP whose first unpickling in a worker process (before the start barrier)
    misbehaves once: ``mode`` ``kill`` (SIGKILL itself) or ``hang`` (sleep for ever).
    ``marker``: created when it fires, so that only one worker, once, misbehaves."""

    def __init__(self, *args, mode: str, marker: str, **kw):
        super().__init__(*args, **kw)
        self.mode, self.marker = mode, marker

    def __setstate__(self, state):
        import multiprocessing

        self.__dict__.update(state)
        if not multiprocessing.current_process().name.startswith("paramserver-worker"):
            return  # the server's own copy (its evaluator)
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # fired already (another worker, or an earlier life)
        os.close(fd)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)


def wait_at(barrier, marker: str) -> None:
    """A party of ``barrier`` that says (a file) it is about to wait, then waits there."""
    open(marker, "w").close()
    barrier.wait(600)


class DyingReLU(NumpyMLP):
    """Alive at the start, dead within a few steps: its hidden biases get a gradient of
    +100 on top of their own, so SGD drives them far below zero; then every hidden unit
    is dead and the outputs are the last layer's bias, the same for every input."""

    def backward(self, params, cache, dlogits, grads):
        super().backward(params, cache, dlogits, grads)
        grads["b0"] += 100.0
