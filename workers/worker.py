"""The worker process: attach, place itself, then read - compute - update until told to stop.

Started by :class:`paramserver.server.ParameterServer` with the spawn start
method; the entry point is :func:`worker_main`. Each step:

1. note the global version (for staleness) and slice a batch out of the
   shared training data (a view, no copy);
2. forward pass on the shared parameters, in place (no lock, ever);
3. stale-first gate (when enabled): a worker past the threshold goes first;
4. ``policy.step``: backward into the local flat gradient, then the update
   rule over the shared vector, each locked as the policy says; the update's
   staleness, attenuation and scheduled learning rate are settled just before
   it is applied (inside the policy's lock, so exact under po1/po2);
5. bump this worker's own counter row (no lock: nobody else writes it).

A worker restarted by the server after a crash has the same rank, shard and
counter row: it continues from the epoch and batch its row records.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.asynchrony import StaleFirst
from paramserver.config import TrainConfig
from paramserver.data import epoch_orders, shard
from paramserver.optim import Updater
from paramserver.policy import Policy
from paramserver.store import CONTROL, COUNTER, STATUS, ParamStore, Segment

from .backends import ModelSpec, make_backend, set_threads_and_seed

START_TIMEOUT = 120.0
"""Seconds a worker waits for the others to be ready before starting alone."""
LOSS_SMOOTHING = 0.1
"""Weight of the newest batch in the smoothed loss a worker reports."""


@dataclass(frozen=True)
class WorkerPlan:
    """What the server decided for one worker."""

    rank: int
    workers: int
    cores: tuple[int, ...] | None
    """CPUs to pin to (one per thread), or None to leave the affinity alone."""
    threads: int
    steps: int
    """Updates this worker applies at most (0 = no limit)."""
    parent_pid: int
    total_updates: int = 0
    """Expected length of the whole run in updates (for the cosine schedule)."""
    life: int = 0
    """0 for the first start, n for the n-th restart (a restart does not wait for the others)."""
    first_epoch: int = 0
    """Epoch to start in (a resumed checkpoint's position)."""
    first_batch: int = 0
    """Batches of ``first_epoch`` already done."""


def place(cores: tuple[int, ...] | None, nice: int) -> list[str]:
    """Pin this process to ``cores`` and set its niceness; return warnings, never raise.

    Must run before the framework starts its thread pools: on Linux, affinity
    and niceness are per thread and only threads created later inherit them.
    """
    import psutil

    warnings = []
    me = psutil.Process()
    if cores is not None:
        try:
            me.cpu_affinity(list(cores))
        except (psutil.Error, OSError, ValueError) as e:
            warnings.append(f"could not pin to cores {list(cores)}: {e}")
    if nice:
        try:
            me.nice(nice)
        except psutil.AccessDenied:
            warnings.append(f"nice {nice} needs privileges (CAP_SYS_NICE); left at {me.nice()}")
        except (psutil.Error, OSError) as e:
            warnings.append(f"could not set nice {nice}: {e}")
    return warnings


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A worker blocked on a lock or a barrier cannot poll for its parent; without
    this, a server killed with SIGKILL would leave its workers running.
    """
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before we asked
        os._exit(1)


def worker_main(
    spec: ModelSpec,
    plan: WorkerPlan,
    store: ParamStore,
    data: Segment,
    policy: Policy,
    start: Any,
    config: TrainConfig,
    stale_first: StaleFirst | None = None,
) -> None:
    """Entry point of a worker process (spawned; ``store`` and ``data`` arrive attached).

    Everything here is small: the arguments travel in a start-up pipe that the
    server fills inside ``Process.start()``, and a large model is passed as a
    file (``ModelSpec.via_file``), so a worker that dies while reading them can
    never leave the server blocked there.
    """
    # Ctrl-C reaches the whole process group; the server decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(plan.parent_pid)
    for w in place(plan.cores, config.nice):
        print(f"paramserver worker {plan.rank}: warning: {w}", flush=True)
    set_threads_and_seed(spec.backend, plan.threads, config.seed + plan.rank)
    row = store.counters[plan.rank]
    row[COUNTER["pid"]] = os.getpid()
    try:
        _train(plan, store, data, policy, spec, start, config, stale_first)
        row[COUNTER["status"]] = STATUS["done"]
    except BaseException:
        row[COUNTER["status"]] = STATUS["failed"]
        raise
    finally:
        row[COUNTER["finished"]] = time.time()
        del row
        policy.unbind()
        if stale_first is not None:
            stale_first.bind(None)
        # After an exception its traceback can still hold views of the segments;
        # the mapping then goes away when this process exits a moment later.
        with contextlib.suppress(BufferError):
            store.close()
            data.close()


def _train(
    plan: WorkerPlan,
    store: ParamStore,
    data: Segment,
    policy: Policy,
    spec: ModelSpec,
    start: Any,
    config: TrainConfig,
    stale_first: StaleFirst | None,
) -> None:
    layout = store.model_layout
    params = store.params
    rule = config.update_rule()
    shared_state = config.shared_state and rule.state_slots > 0
    state = store.state if shared_state else np.zeros((rule.state_slots, params.size), params.dtype)
    assert state.shape[0] == rule.state_slots, "segment has the wrong number of state slots"
    grad = np.zeros_like(params)
    update = Updater(rule, params, grad, state, config.lr)
    backend = make_backend(spec, layout, params, grad, config=config, rank=plan.rank)
    schedule = config.lr_schedule_for(max(1, plan.total_updates))
    attenuation = config.attenuation_rule()

    x, y = data["x"], data["y"]
    lo, hi = shard(len(x), plan.rank, plan.workers)
    orders = epoch_orders(lo, hi, config.batch_size, config.seed + plan.rank)
    row = store.counters[plan.rank]
    policy.bind(row)
    if stale_first is not None:
        stale_first.bind(store.counters[:, COUNTER["urgent"]])
    c_steps, c_samples, c_loss, c_batch = (
        COUNTER["steps"], COUNTER["samples"], COUNTER["loss"], COUNTER["batch"]
    )  # fmt: skip
    c_pulled, c_beat, c_nonfinite = COUNTER["pulled_version"], COUNTER["heartbeat"], COUNTER["nonfinite"]
    c_stale, c_stale_sum, c_stale_max, c_lr = (
        COUNTER["staleness"], COUNTER["staleness_sum"], COUNTER["staleness_max"], COUNTER["lr"]
    )  # fmt: skip
    if plan.life == 0:
        try:
            start.wait(START_TIMEOUT)  # the others are still importing: begin together
        except threading.BrokenBarrierError:
            pass  # one failed to start; the server sees it and stops the run
        row[c_batch] = plan.first_batch
        row[COUNTER["epoch"]] = plan.first_epoch
    now = time.time()
    row[c_beat] = now
    if not row[COUNTER["started"]]:
        row[COUNTER["started"]] = now
    row[COUNTER["status"]] = STATUS["running"]
    # A restarted worker continues its row: its steps, its place in the data.
    local_steps = int(row[c_steps])
    smoothed = float(row[c_loss]) if local_steps else None
    first_epoch, skip = int(row[COUNTER["epoch"]]), int(row[c_batch])
    loss = 0.0
    finite = True
    version = 0
    applied = False

    def backward() -> None:
        nonlocal finite
        backend.backward()
        # One cheap pass: the sum of the gradient is finite iff every element is
        # (barring overflow of the sum itself). A bad step must never reach the segment.
        finite = bool(np.isfinite(loss)) and bool(np.isfinite(grad.sum()))

    def settle() -> None:
        """Staleness, attenuation and learning rate of this update, just before it lands."""
        now_version = int(base_version + steps_column.sum())
        staleness = now_version - version
        grad_factor, lr_factor = attenuation.factors(staleness)
        if grad_factor != 1.0:
            np.multiply(grad, np.float32(grad_factor), out=grad)
        update.lr = schedule(now_version) * lr_factor
        # Adam's bias correction counts the updates made to the state it uses.
        update.t = now_version + 1 if shared_state else local_steps + 1
        row[c_stale] = staleness
        row[c_stale_sum] += staleness
        if staleness > row[c_stale_max]:
            row[c_stale_max] = staleness
        row[c_lr] = update.lr

    def apply(a: int, b: int) -> None:
        nonlocal applied
        if not finite:
            return
        if not applied:  # striped calls apply once per stripe: settle on the first
            applied = True
            settle()
        update(a, b)

    # Views taken once: the step below reads them without building new arrays.
    steps_column = store.counters[:, c_steps]
    control = store.control
    c_stop = CONTROL["stop"]
    base_version = int(control[CONTROL["base_version"]])
    for _ in range(first_epoch):
        next(orders)  # the same order a first life would have drawn
    for epoch in range(first_epoch, config.epochs):
        order = next(orders)
        for i in range(skip, len(order)):
            if control[c_stop] or os.getppid() != plan.parent_pid:
                return
            first = order[i]
            xb = x[first : min(first + config.batch_size, hi)]
            yb = y[first : min(first + config.batch_size, hi)]
            version = int(base_version + steps_column.sum())  # the global version, as store.version()
            row[c_pulled] = version
            loss = backend.forward(xb, yb)
            urgent = False
            if stale_first is not None:
                # Before the policy's locks: waiting inside po1's lock would block the
                # very worker that is meant to go first.
                urgent = stale_first.before(plan.rank, int(base_version + steps_column.sum()) - version)
            applied = False
            try:
                policy.step(backward, apply, plan.rank)
            finally:
                if urgent:
                    stale_first.after(plan.rank)  # type: ignore[union-attr]
            if finite:
                local_steps += 1
                row[c_steps] = local_steps
                smoothed = loss if smoothed is None else smoothed + LOSS_SMOOTHING * (loss - smoothed)
                row[c_loss] = smoothed
            else:
                row[c_nonfinite] += 1
            row[c_samples] += len(xb)
            row[c_batch] = i + 1
            row[c_beat] = time.time()
            if plan.steps and local_steps >= plan.steps:
                return
        skip = 0
        row[c_batch] = 0
        row[COUNTER["epoch"]] = epoch + 1
