"""Locking policies: what is locked while a worker computes its gradient and updates.

=========  ========  ========================  ====================  ==================================
policy     forward   gradient (backward)       update                buys
=========  ========  ========================  ====================  ==================================
po1        parallel  under the update lock     under the update lock consistent updates, least parallel
po2        parallel  at most k at once         under the update lock bounded backward memory/CPU
po3        parallel  parallel                  no lock (Hogwild!)    most throughput; updates may be lost
striped    parallel  parallel                  per-stripe locks      consistent per element, updates of
                                                                     different stripes run at once
=========  ========  ========================  ====================  ==================================

A policy is the shared-memory store's business (:class:`paramserver.store.ShmStore`
holds it and travels with it to each worker when the worker starts; locks
cannot be sent later). Each push of a worker runs :meth:`Policy.step` with two
callbacks: ``backward()`` computes the gradient and ``apply(gradient, lo, hi)``
applies the update rule to the part of it in ``params[lo:hi]``.

A worker killed while it holds a lock would block every other worker for ever.
So each worker records in its own counter row which lock or slot it holds
(:meth:`Policy.bind`), and the server, which sees the worker die, gives the
lock back (:meth:`Policy.recover`). A kill can land between the acquire and the
record (a few bytecodes); ``recover`` also frees a lock that has been taken
with no live worker claiming it for longer than ``LEAK_SECONDS``.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

POLICIES = ("po1", "po2", "po3", "striped")
LEAK_SECONDS = 1.0
"""A lock taken while no live worker claims it for this long was leaked by a dead one."""

Backward = Callable[[], Any]
"""Computes the gradient (a :class:`paramserver.store.Gradient`)."""
Apply = Callable[[Any, int, int], None]
"""``apply(gradient, lo, hi)``: the update rule over ``params[lo:hi]``."""
_LOCK, _SLOT = "held_lock", "held_slot"
"""The counter columns where a worker records what it holds."""


class _NoClaims:
    """Stands in for a counter row until a worker binds its own."""

    held_lock = 0.0
    held_slot = 0.0


class Policy(ABC):
    name: str
    splits: bool = False
    """Whether :meth:`step` applies a gradient in parts (calls ``apply`` once per range)."""

    def __init__(self, size: int):
        self.size = size
        """Length of the flat parameter vector."""
        self.row: Any = _NoClaims()
        self._unclaimed_since: dict[int, float] = {}

    def bind(self, row: Any) -> None:
        """Record this worker's claims (``held_lock``, ``held_slot``) in its counter ``row``
        (a :class:`paramserver.store.Row`)."""
        self.row = row

    def unbind(self) -> None:
        """Drop the row view (before the segment closes: a live view makes close() fail)."""
        self.row = _NoClaims()

    @abstractmethod
    def step(self, backward: Backward, apply: Apply, rank: int = 0) -> None:
        """Run ``backward()`` then ``apply`` over the whole vector, locked as the policy says."""

    @contextlib.contextmanager
    def hold_all(self) -> Iterator[None]:
        """Hold every update lock (none under po3), in order, so that a write from outside
        the workers (a multi-machine sync) loses no update. A worker holds at most one of
        them at a time, so taking all of them in order cannot deadlock."""
        with contextlib.ExitStack() as stack:
            for sem, _capacity, name, _value in self._semaphores():
                if name == _LOCK:
                    stack.enter_context(sem)
            yield

    # -- recovery, on the server's side --------------------------------------------

    def _semaphores(self) -> list[tuple[Any, int, str, int]]:
        """(semaphore, capacity, counter column, claim value) of every lock and slot."""
        return []

    def recover(self, counters: Any, alive: np.ndarray, dead: list[int] | None = None) -> int:
        """Give back what dead workers held; return how many locks or slots were freed.

        ``counters`` are the workers' rows (:class:`paramserver.store.Counters`),
        ``alive`` a mask of live workers and
        ``dead`` the ranks that just died (their claims are freed at once; other
        shortfalls only once they outlast :data:`LEAK_SECONDS`). Called by the
        server only, and never while the dead workers' rows are being reused.
        """
        freed = 0
        now = time.monotonic()
        for i, (sem, capacity, name, value) in enumerate(self._semaphores()):
            col = counters.column(name)
            for r in dead or []:
                if col[r] == value:
                    col[r] = 0
                    if sem._semlock._get_value() < capacity:
                        sem.release()
                        freed += 1
            claimed = int(np.count_nonzero(col[alive] == value))
            missing = capacity - claimed - sem._semlock._get_value()
            if missing <= 0:
                self._unclaimed_since.pop(i, None)
                continue
            since = self._unclaimed_since.setdefault(i, now)
            if now - since >= LEAK_SECONDS:
                for _ in range(missing):
                    sem.release()
                freed += missing
                self._unclaimed_since.pop(i, None)
        return freed


class PO1(Policy):
    """Gradient and update under one lock: one worker at a time past the forward pass."""

    name = "po1"

    def __init__(self, size: int, ctx: Any):
        super().__init__(size)
        self.lock = ctx.Lock()

    def step(self, backward, apply, rank=0):  # type: ignore[no-untyped-def]
        with self.lock:
            self.row.held_lock = 1
            try:
                apply(backward(), 0, self.size)
            finally:
                self.row.held_lock = 0

    def _semaphores(self):  # type: ignore[no-untyped-def]
        return [(self.lock, 1, _LOCK, 1)]


class PO2(Policy):
    """At most ``k`` backward passes at once; updates under the update lock."""

    name = "po2"

    def __init__(self, size: int, ctx: Any, k: int = 1):
        super().__init__(size)
        if k < 1:
            raise ValueError(f"po2 needs at least one gradient slot, got k={k}")
        self.k = k
        self.slots = ctx.BoundedSemaphore(k)
        self.lock = ctx.Lock()

    def step(self, backward, apply, rank=0):  # type: ignore[no-untyped-def]
        with self.slots:
            self.row.held_slot = 1
            try:
                gradient = backward()
            finally:
                self.row.held_slot = 0
        with self.lock:
            self.row.held_lock = 1
            try:
                apply(gradient, 0, self.size)
            finally:
                self.row.held_lock = 0

    def _semaphores(self):  # type: ignore[no-untyped-def]
        return [(self.lock, 1, _LOCK, 1), (self.slots, self.k, _SLOT, 1)]


class PO3(Policy):
    """Hogwild!: no lock at all.

    Two workers updating the same element at once can lose one of the two
    updates (NumPy's in-place ops are read-modify-write, not atomic), and a
    reader can see a half-applied update. This is the contract: aligned
    elements are never torn, and sparse or small updates rarely collide.
    """

    name = "po3"

    def step(self, backward, apply, rank=0):  # type: ignore[no-untyped-def]
        apply(backward(), 0, self.size)


class Striped(Policy):
    """Per-stripe update locks: the vector is cut into ``stripes`` ranges, each locked
    on its own. Worker ``rank`` starts at stripe ``rank`` so that workers begin on
    different stripes and rarely wait for each other."""

    name = "striped"
    splits = True

    def __init__(self, size: int, ctx: Any, stripes: int = 8, align: int = 16):
        super().__init__(size)
        if stripes < 1:
            raise ValueError(f"striped needs at least one stripe, got {stripes}")
        # Stripe bounds on multiples of `align` elements (64 bytes of float32), so
        # that two stripes never share a cache line.
        step = -(-size // stripes)
        step = -(-step // align) * align
        self.bounds = [(lo, min(lo + step, size)) for lo in range(0, size, step)] or [(0, 0)]
        self.locks = [ctx.Lock() for _ in self.bounds]

    def step(self, backward, apply, rank=0):  # type: ignore[no-untyped-def]
        gradient = backward()
        n = len(self.bounds)
        for i in range(n):
            j = (i + rank) % n
            lo, hi = self.bounds[j]
            if not gradient.touches(lo, hi):
                continue  # sparse: nothing of this gradient lies here, so no wait for its lock
            with self.locks[j]:
                self.row.held_lock = j + 1
                try:
                    apply(gradient, lo, hi)
                finally:
                    self.row.held_lock = 0

    def _semaphores(self):  # type: ignore[no-untyped-def]
        return [(lock, 1, _LOCK, j + 1) for j, lock in enumerate(self.locks)]


def make_policy(name: str, size: int, ctx: Any, *, k: int = 1, stripes: int = 8) -> Policy:
    """The policy called ``name`` (one of :data:`POLICIES`) for a vector of ``size``."""
    if name == "po1":
        return PO1(size, ctx)
    if name == "po2":
        return PO2(size, ctx, k)
    if name == "po3":
        return PO3(size)
    if name == "striped":
        return Striped(size, ctx, stripes)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
