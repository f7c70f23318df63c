"""The worker process: attach, place itself, then read - compute - update until told to stop.

Started by :class:`paramserver.server.ParameterServer` with the spawn start
method; the entry point is :func:`worker_main`. Each step:

1. note the global version (for staleness) and slice a batch out of the
   shared training data (a view, no copy);
2. forward pass on the shared parameters, in place (no lock, ever);
3. ``policy.step``: backward into the local flat gradient, then the update
   rule over the shared vector, each locked as the policy says;
4. bump this worker's own counter row (no lock: nobody else writes it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

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


def worker_main(
    spec: ModelSpec,
    plan: WorkerPlan,
    store: ParamStore,
    data: Segment,
    policy: Policy,
    start: Any,
    config: TrainConfig,
) -> None:
    """Entry point of a worker process (spawned; ``store`` and ``data`` arrive attached).

    Everything here is small: the arguments travel in a start-up pipe that the
    server fills inside ``Process.start()``, and a large model is passed as a
    file (``ModelSpec.via_file``), so a worker that dies while reading them can
    never leave the server blocked there.
    """
    # Ctrl-C reaches the whole process group; the server decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for w in place(plan.cores, config.nice):
        print(f"paramserver worker {plan.rank}: warning: {w}", flush=True)
    set_threads_and_seed(spec.backend, plan.threads, config.seed + plan.rank)
    row = store.counters[plan.rank]
    try:
        _train(plan, store, data, policy, spec, start, config)
        row[COUNTER["status"]] = STATUS["done"]
    except BaseException:
        row[COUNTER["status"]] = STATUS["failed"]
        raise
    finally:
        row[COUNTER["finished"]] = time.time()
        del row
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

    x, y = data["x"], data["y"]
    lo, hi = shard(len(x), plan.rank, plan.workers)
    orders = epoch_orders(lo, hi, config.batch_size, config.seed + plan.rank)
    row = store.counters[plan.rank]
    c_steps, c_samples, c_loss = COUNTER["steps"], COUNTER["samples"], COUNTER["loss"]
    c_pulled, c_beat, c_nonfinite = (
        COUNTER["pulled_version"],
        COUNTER["heartbeat"],
        COUNTER["nonfinite"],
    )
    try:
        start.wait(START_TIMEOUT)  # the others are still importing: begin together
    except threading.BrokenBarrierError:
        pass  # one failed to start; the server sees it and stops the run
    row[COUNTER["heartbeat"]] = row[COUNTER["started"]] = time.time()
    row[COUNTER["status"]] = STATUS["running"]
    local_steps = 0
    smoothed = None
    loss = 0.0
    finite = True

    def backward() -> None:
        nonlocal finite
        backend.backward()
        # One cheap pass: the sum of the gradient is finite iff every element is
        # (barring overflow of the sum itself). A bad step must never reach the segment.
        finite = bool(np.isfinite(loss)) and bool(np.isfinite(grad.sum()))

    def apply(a: int, b: int) -> None:
        if finite:
            update(a, b)

    # Views taken once: the step below reads them without building new arrays.
    steps_column = store.counters[:, COUNTER["steps"]]
    control = store.control
    c_stop = CONTROL["stop"]
    for epoch in range(config.epochs):
        for first in next(orders):
            if control[c_stop] or os.getppid() != plan.parent_pid:
                return
            xb = x[first : min(first + config.batch_size, hi)]
            yb = y[first : min(first + config.batch_size, hi)]
            version = int(steps_column.sum())  # the global version, as store.version()
            row[c_pulled] = version
            # Adam's bias correction counts the updates made to the state it uses.
            update.t = version + 1 if shared_state else local_steps + 1
            loss = backend.forward(xb, yb)
            policy.step(backward, apply, plan.rank)
            if finite:
                local_steps += 1
                row[c_steps] = local_steps
                smoothed = loss if smoothed is None else smoothed + LOSS_SMOOTHING * (loss - smoothed)
                row[c_loss] = smoothed
            else:
                row[c_nonfinite] += 1
            row[c_samples] += len(xb)
            row[c_beat] = time.time()
            if plan.steps and local_steps >= plan.steps:
                return
        row[COUNTER["epoch"]] = epoch + 1
