"""Asynchrony controls: staleness, gradient attenuation, learning-rate schedules, stale-first order.

Staleness of an update = the number of updates anyone applied between the moment
its worker read the parameters (the global version it noted before the forward
pass) and the moment its update is applied. The global version is the sum of
the workers' step counters, so measuring it takes no lock. With one worker it
is always 0.

Attenuation damps stale updates:

- ``none``: every update at full strength (the default; Hogwild!).
- ``exp``: the gradient is multiplied by ``base ** staleness`` before the
  update rule sees it (so it also enters momentum and Adam's moments scaled).
  Under Adam/RMSProp the scale mostly cancels (they divide by the gradient's
  own magnitude): use ``inverse`` there.
- ``inverse``: the learning rate of the update is divided by the staleness
  (``lr / max(1, staleness)``; Zhang et al. 2016, "Staleness-aware async-SGD").
- a callable ``f(staleness) -> factor`` (API only; picklable, defined at module
  level): the learning rate is multiplied by ``factor``.

Learning-rate schedules are functions of the global update count, so every
worker sees the same rate at the same point of training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ATTENUATIONS = ("none", "exp", "inverse")
LR_SCHEDULES = ("constant", "step", "exp", "cosine")


@dataclass(frozen=True)
class Attenuation:
    """How a stale update is damped: ``factors(staleness) -> (grad factor, lr factor)``."""

    mode: str | Callable[[int], float] = "none"
    base: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.mode, str) and self.mode not in ATTENUATIONS:
            raise ValueError(
                f"unknown attenuation {self.mode!r}; choose one of {', '.join(ATTENUATIONS)} "
                "(or pass a callable staleness -> factor from Python)"
            )
        if not isinstance(self.mode, str) and not callable(self.mode):
            raise TypeError(f"attenuation must be a name or a callable, got {type(self.mode).__name__}")
        if not 0 < self.base <= 1:
            raise ValueError(f"attenuation_base must be in (0, 1], got {self.base}")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def factors(self, staleness: int) -> tuple[float, float]:
        if self.mode == "none" or (isinstance(self.mode, str) and staleness <= 0):
            return 1.0, 1.0
        if self.mode == "exp":
            return self.base**staleness, 1.0
        if self.mode == "inverse":
            return 1.0, 1.0 / staleness
        assert callable(self.mode)
        factor = float(self.mode(staleness))
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"the attenuation callable returned {factor} for staleness {staleness}")
        return 1.0, factor


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the global update count ``t`` (0-based).

    ``constant``: ``lr``. ``step``: ``lr * gamma ** (t // step)``. ``exp``:
    ``lr * gamma ** (t / step)``. ``cosine``: from ``lr`` down to ``lr_min``
    over ``total`` updates, then ``lr_min``. With ``warmup`` > 0 the rate rises
    linearly from ``lr / warmup`` to the schedule's value over the first
    ``warmup`` updates.
    """

    lr: float
    name: str = "constant"
    warmup: int = 0
    step: int = 1000
    gamma: float = 0.5
    lr_min: float = 0.0
    total: int = 0

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.name!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.warmup < 0:
            raise ValueError(f"lr_warmup must be >= 0 updates, got {self.warmup}")
        if self.step < 1:
            raise ValueError(f"lr_step must be at least 1 update, got {self.step}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr], got {self.lr_min} with lr {self.lr}")
        if self.name == "cosine" and self.total < 1:
            raise ValueError("the cosine schedule needs its length: set lr_total (updates) or steps")

    def __call__(self, t: int) -> float:
        if self.name == "constant":
            lr = self.lr
        elif self.name == "step":
            lr = self.lr * self.gamma ** (t // self.step)
        elif self.name == "exp":
            lr = self.lr * self.gamma ** (t / self.step)
        else:
            frac = min(t, self.total) / self.total
            lr = self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * frac))
        if t < self.warmup:
            lr *= (t + 1) / self.warmup
        return lr


class StaleFirst:
    """Stale-first order of updates, without spinning and without a shared lock.

    A worker whose staleness reached ``threshold`` marks itself urgent (its
    staleness in its own counter row) and goes ahead of every non-urgent worker
    and of less stale urgent ones; the others wait until no more urgent worker
    is ahead of them, looking at the urgent column after sleeps that grow from
    ``POLL_MIN`` to ``POLL_MAX`` seconds (asleep, not spinning: after its first
    few looks a waiter wakes ``1 / POLL_MAX`` times a second). A waiter gives up after
    ``timeout`` seconds, so a worker that dies while urgent delays the others by
    at most that.

    There is deliberately no lock or condition variable: a worker SIGKILLed
    while holding one, or while counted as a condition's sleeper, would leave
    the others blocked for good. The column is the only shared state, and the
    server clears a dead worker's mark.

    Cost: one lock-free read of the urgent column per step; when someone is
    urgent, the waiters sleep (their cores idle) and see the urgent update land
    within ``POLL_MAX``. A worker calls :meth:`bind` with its view of the urgent
    column before the first step.
    """

    POLL_MIN = 50e-6
    POLL_MAX = 2e-3

    def __init__(self, threshold: int, timeout: float = 0.5):
        if threshold < 1:
            raise ValueError(f"stale_first threshold must be at least 1, got {threshold}")
        self.threshold = threshold
        self.timeout = timeout
        self.urgent: np.ndarray | None = None
        self.waits = 0
        """Times this worker slept because others went first."""

    def bind(self, urgent: np.ndarray | None) -> None:
        """Use ``urgent`` (a view of the counters' urgent column); None drops the view."""
        self.urgent = urgent

    def _ahead(self, rank: int, staleness: int) -> bool:
        """Is an urgent worker waiting ahead of ``rank`` (staleness 0: not urgent)?"""
        col = self.urgent
        assert col is not None, "StaleFirst used before bind()"
        for r in np.flatnonzero(col):
            s = col[r]
            if r != rank and (s > staleness or (s == staleness and r < rank)):
                return True
        return False

    def before(self, rank: int, staleness: int) -> bool:
        """Wait for this worker's turn; True when it went as urgent (call ``after``)."""
        col = self.urgent
        assert col is not None, "StaleFirst used before bind()"
        urgent = staleness >= self.threshold
        if urgent:
            col[rank] = staleness
        else:
            staleness = 0
            if not col.any():
                return False  # the common case: nobody urgent, nothing to wait for
        if self._ahead(rank, staleness):
            self.waits += 1
            deadline = time.monotonic() + self.timeout
            pause = self.POLL_MIN
            while self._ahead(rank, staleness):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(pause, left))
                pause = min(pause * 2, self.POLL_MAX)
        return urgent

    def after(self, rank: int) -> None:
        assert self.urgent is not None
        self.urgent[rank] = 0
