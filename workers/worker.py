"""The worker process: one loop for every job; what a step computes is its task's.

Started by :class:`paramserver.server.Server` with the spawn start method; the
entry point is :func:`worker_main`, the loop's step :func:`prepare`. Each step:

1. note the global version (for staleness): ``store.version()``;
2. ``task.forward()``: the task's loss on the shared parameters, read in place
   (supervised training: a batch sliced out of the shared data; A3C: a rollout;
   DQN: an environment step and, when due, a replay sample);
3. stale-first gate (when enabled): a worker past the threshold goes first;
4. ``store.push(rank, backward, apply)``: ``task.backward()`` fills the local
   flat gradient, then the update rule runs over the shared vector, each part
   locked as the store's consistency rule (its locking policy) says; the
   update's staleness, attenuation and scheduled learning rate are settled just
   before it is applied (inside the policy's lock, so exact under po1/po2);
5. bump this worker's own counter row (no lock: nobody else writes it).

A worker restarted by the server after a crash has the same rank and counter
row: it continues from the steps, samples and position its row records.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing.forkserver as forkserver
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.asynchrony import StaleFirst
from paramserver.config import RunConfig
from paramserver.data import TrainingData, epoch_orders, num_samples, shard, take
from paramserver.layout import Layout
from paramserver.optim import Updater, coalesce, finite_check, values_finite
from paramserver.store import STATUS, Gradient, SparseRows, Store, row_span
from paramserver.supervise import START_TIMEOUT as START_TIMEOUT

from .backends import Backend, ModelSpec, backend_class

FINISHED = object()
"""What :meth:`Task.forward` returns when the task has no more work (its epochs are done)."""


@dataclass(frozen=True)
class WorkerPlan:
    """What the server decided for one worker."""

    rank: int
    workers: int
    cores: tuple[int, ...] | None
    """CPUs to pin to (one per thread), or None to leave the affinity alone."""
    threads: int
    parent_pid: int
    steps: int = 0
    """Updates this worker applies at most (0 = no limit)."""
    samples: int = 0
    """Samples (RL: environment steps) this worker consumes at most (0 = no limit)."""
    total_updates: int = 0
    """Expected length of the whole run in updates (for the cosine schedule)."""
    life: int = 0
    """0 for the first start, n for the n-th restart (a restart does not wait for the others)."""
    first_epoch: int = 0
    """Epoch to start in (a resumed checkpoint's position)."""
    first_batch: int = 0
    """Batches of ``first_epoch`` already done."""


@dataclass
class Context:
    """What a task is given when its worker starts."""

    rank: int
    workers: int
    config: RunConfig
    layout: Layout
    params: np.ndarray
    """The shared parameters (the live view)."""
    grad: np.ndarray
    """This worker's flat gradient buffer (``backward`` writes it)."""
    position: tuple[int, int]
    """(epoch, batch) to continue from."""
    samples: int
    """Samples this rank consumed in earlier lives (a restarted worker counts on)."""


class Task(ABC):
    """What a worker computes each step. Built by the server (small and picklable:
    segments travel as handles), started in the worker."""

    loss_smoothing = 0.1
    """Weight of the newest loss in the smoothed loss a worker reports."""
    backend = "torch"
    """The backend whose process settings (threads, seed) the worker applies."""
    samples_taken = 0
    """Samples (RL: environment steps) the last ``forward`` consumed."""
    sparse: tuple[str, ...] = ()
    """Tensors whose gradient ``backward`` returns as rows (set by ``start``)."""

    @abstractmethod
    def start(self, ctx: Context) -> None:
        """Build the model on ``ctx.params`` and ``ctx.grad`` (in the worker)."""

    @abstractmethod
    def forward(self) -> Any:
        """The loss of the next step (a float), None when this step makes no update
        (DQN before its pool is full), or :data:`FINISHED`."""

    @abstractmethod
    def backward(self) -> Gradient:
        """This step's gradient (into ``ctx.grad``), finite or not."""

    def position(self) -> tuple[int, int] | None:
        """(epoch, batch) reached, for the counter row; None for tasks without epochs."""
        return None

    def stepped(self, applied: bool) -> None:
        """Called after each push (DQN refreshes its target network here)."""

    def close(self) -> None:
        """Release what ``start`` built (environments, views of segments)."""


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

    A worker forked by a forkserver has the forkserver for parent, which exits when
    the end of its "alive" pipe held by its clients closes. multiprocessing hands that
    end to every child it forks, so a worker holding it kept the forkserver alive, and
    so itself, after a SIGKILL of the server: both trained on as orphans. The worker
    starts no processes, so it lets go of its copy and only the server keeps the
    forkserver, and through it the worker, alive.
    """
    fork_server = forkserver._forkserver
    if fork_server._forkserver_alive_fd is not None:  # forked by a forkserver
        with contextlib.suppress(OSError):
            os.close(fork_server._forkserver_alive_fd)
        fork_server._forkserver_alive_fd = None
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before we asked
        os._exit(1)


def worker_main(
    plan: WorkerPlan,
    store: Store,
    task: Task,
    config: RunConfig,
    start: Any,
    stale_first: StaleFirst | None = None,
) -> None:
    """Entry point of a worker process (spawned; ``store`` arrives attached).

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
    backend_class(task.backend).configure(plan.threads, config.seed + plan.rank)
    # Overflow and NaN in a step are counted, skipped and reported (a non-finite step);
    # NumPy's warnings would only repeat that once per worker among the run's lines.
    # Set once here: an errstate per step would cost the hot loop microseconds.
    np.seterr(over="ignore", invalid="ignore", divide="ignore")
    row = store.counters.row(plan.rank)
    row.pid = os.getpid()
    try:
        step = prepare(plan, store, task, config, start, stale_first)
        while step():
            pass
        del step
        row.status = STATUS["done"]
    except BaseException:
        row.status = STATUS["failed"]
        raise
    finally:
        row.finished = time.time()
        del row
        task.close()
        store.unbind()
        if stale_first is not None:
            stale_first.bind(None)
        # After an exception its traceback can still hold views of the segments;
        # the mapping then goes away when this process exits a moment later.
        with contextlib.suppress(BufferError):
            store.close()


def prepare(
    plan: WorkerPlan,
    store: Store,
    task: Task,
    config: RunConfig,
    start: Any = None,
    stale_first: StaleFirst | None = None,
    probe: Callable[[str], None] | None = None,
) -> Callable[[], bool]:
    """Set the worker up (gradient buffer, update rule, task, barrier) and return its
    step: one forward, push and count; False once the worker is to stop (the task is
    done, a limit is reached or the server said stop). Uses nothing of ``store`` but the
    :class:`Store` interface. The benchmarks time this very function; ``probe(phase)``,
    if given, is called as each phase of a step ends ("forward", "backward", "check",
    "update", "count")."""
    params = store.params
    rule = config.update_rule()
    shared_state = config.shared_state and rule.state_slots > 0
    state = store.state if shared_state else np.zeros((rule.state_slots, params.size), params.dtype)
    assert state.shape[0] == rule.state_slots, "the store has the wrong number of state slots"
    # np.zeros, not zeros_like: calloc'd pages stay unmapped until written, and the part of
    # a row-sparse table (never written) must cost no private memory. zeros_like fills.
    grad = np.zeros(params.shape, params.dtype)
    assert config.lr is not None
    update = Updater(rule, params, grad, state, config.lr)
    # Load the compiled kernels now (0.3-0.5 s, more on a loaded machine), not in the first
    # step: from the first step on, hang_timeout counts, and a worker that spent it loading
    # kernels while another was being spawned next to it was taken for hung.
    rule.warm_up(params.dtype.type)
    schedule = config.lr_schedule_for(max(1, plan.total_updates))
    attenuation = config.attenuation_rule()
    damped = attenuation.active
    counters = store.counters
    row = counters.row(plan.rank)
    if plan.life == 0:
        row.epoch, row.batch = plan.first_epoch, plan.first_batch
    layout = store.model_layout
    task.start(Context(
        plan.rank, plan.workers, config, layout, params, grad,
        (int(row.epoch), int(row.batch)), int(row.samples),
    ))  # fmt: skip
    if task.sparse and not rule.supports_rows:
        raise ValueError(f"{', '.join(task.sparse)} get row gradients; {config.optimizer} cannot update rows")
    # The dense part of the vector, and each row-sparse table with its state (same offsets).
    dense = layout.ranges_without(task.sparse) if task.sparse else [(0, params.size)]
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    # Row gradients arrive as the model gives them; sorted rows are needed only by a rule
    # that is not a plain sum (adagrad, adam) or by a store that applies a push in parts.
    ids_ok = rule.takes_ids and store.whole_pushes
    dense_finite = [finite_check(grad[a:b]) for a, b in dense]  # of this buffer, bound once
    for name in task.sparse:
        f = layout[name]
        o = f.offset // params.itemsize
        shape = (f.shape[0], f.size // f.shape[0])
        tables[o] = (params[o : o + f.size].reshape(shape), state[:, o : o + f.size].reshape(-1, *shape))
    store.bind(plan.rank)
    if stale_first is not None:
        stale_first.bind(counters.column("urgent"))
    if plan.life == 0 and start is not None:
        # Built and waiting for the others: the server must not take this wait for a
        # start-up hang (the one it waits for is the worker still starting).
        row.heartbeat = time.time()
        row.status = STATUS["ready"]
        try:  # a StartBarrier, or a multiprocessing Barrier (the benchmarks')
            start.wait(START_TIMEOUT)  # the others are still importing: begin together
        except threading.BrokenBarrierError:
            pass  # one failed to start; the server sees it and restarts it or stops the run
    now = time.time()
    row.heartbeat = now
    if not row.started:
        row.started = now
    row.status = STATUS["running"]
    # A restarted worker continues its row: its steps, its samples, its place in the data.
    local_steps = int(row.steps)
    samples = int(row.samples)
    smoothed = float(row.loss) if local_steps else None
    smoothing = task.loss_smoothing
    loss: Any = 0.0
    gradient = Gradient()
    version = 0
    applied = False

    def backward() -> Gradient:
        nonlocal gradient
        gradient = task.backward()
        if gradient.sparse and not ids_ok:
            gradient.sparse = [
                s if s.coalesced else SparseRows(s.offset, s.dim, *coalesce(s.rows, s.values))
                for s in gradient.sparse
            ]
        if probe is not None:
            probe("backward")
        # One cheap pass over the bits (values_finite): a bad step must never reach the
        # store. Only the dense ranges: the tables' part of the buffer is never written.
        flat = gradient.dense
        finite = gradient.finite and math.isfinite(loss)
        if finite and flat is grad:
            finite = all(check() for check in dense_finite)
        elif finite and flat is not None:
            finite = all(values_finite(flat[a:b]) for a, b in dense)
        gradient.finite = finite and all(values_finite(s.values) for s in gradient.sparse)
        if task.sparse and gradient.ranges is None:
            gradient.ranges = dense
        if probe is not None:
            probe("check")
        return gradient

    def settle() -> None:
        """Staleness, attenuation and learning rate of this update, just before it lands."""
        now_version = counters.version()
        staleness = now_version - version
        grad_factor, lr_factor = attenuation.factors(staleness) if damped else (1.0, 1.0)
        if grad_factor != 1.0:
            np.multiply(grad, np.float32(grad_factor), out=grad)
            for s in gradient.sparse:
                np.multiply(s.values, s.values.dtype.type(grad_factor), out=s.values)
        update.lr = schedule(now_version) * lr_factor
        # Adam's bias correction counts the updates made to the state it uses.
        update.t = now_version + 1 if shared_state else local_steps + 1
        row.staleness = staleness
        row.staleness_sum += staleness
        if staleness > row.staleness_max:
            row.staleness_max = staleness
        row.lr = update.lr

    def apply(g: Gradient, a: int, b: int) -> None:
        nonlocal applied
        if not g.finite:
            return
        if not applied:  # striped calls apply once per stripe: settle on the first
            applied = True
            settle()
        if g.dense is not None:
            for lo, hi in g.ranges or dense:
                lo, hi = max(lo, a), min(hi, b)
                if lo < hi:
                    update(lo, hi)
        for s in g.sparse:
            table, table_state = tables[s.offset]
            if not s.coalesced:  # only where ids_ok: one apply over the whole vector
                rule.apply_ids(table, s.rows, s.values, update.lr)
                continue
            # The rows that start in [a, b): each row is updated under exactly one stripe.
            i, j = row_span(s, a, b)
            if j > i:
                rule.apply_rows(table, table_state, s.rows[i:j], s.values[i:j], update.t, update.lr)

    stop = store.stop_word()
    parent = plan.parent_pid

    def step() -> bool:
        nonlocal version, loss, applied, local_steps, samples, smoothed
        if stop[0] or os.getppid() != parent:
            return False
        version = counters.version()
        row.pulled_version = version
        loss = task.forward()
        if probe is not None:
            probe("forward")
        if loss is FINISHED:
            return False
        samples += task.samples_taken
        row.samples = samples
        if loss is not None:
            urgent = False
            if stale_first is not None:
                # Before the store's locks: waiting inside po1's lock would block the
                # very worker that is meant to go first.
                urgent = stale_first.before(plan.rank, counters.version() - version)
            applied = False
            try:
                store.push(plan.rank, backward, apply)
            finally:
                if urgent:
                    stale_first.after(plan.rank)  # type: ignore[union-attr]
            if probe is not None:
                probe("update")
            finite = gradient.finite
            if finite:
                local_steps += 1
                row.steps = local_steps
                smoothed = loss if smoothed is None else smoothed + smoothing * (loss - smoothed)
                row.loss = smoothed
            else:
                row.nonfinite += 1
            task.stepped(finite)
        position = task.position()
        if position is not None:
            row.epoch, row.batch = position
        row.heartbeat = time.time()
        if probe is not None:
            probe("count")
        if plan.steps and local_steps >= plan.steps:
            return False
        return not (plan.samples and samples >= plan.samples)

    return step


# -- supervised training ----------------------------------------------------------------


class SupervisedTask(Task):
    """A batch of the worker's shard of the shared training data: loss, then gradient.

    Each batch is a contiguous slice (a view) of the data segment or of a mapped file; the batches of a
    shard are visited in a new order each epoch (``seed + rank``)."""

    def __init__(self, spec: ModelSpec, data: TrainingData, batch_size: int, epochs: int):
        self.spec = spec
        self.data = data
        self.batch_size = batch_size
        self.epochs = epochs
        self.backend = spec.backend
        self.model: Backend | None = None

    def start(self, ctx: Context) -> None:
        cls = backend_class(self.spec.backend)
        self.model = cls(self.spec, ctx.layout, ctx.params, ctx.grad, config=ctx.config, rank=ctx.rank)
        self.sparse = self.model.sparse
        self.grad = ctx.grad
        self.x, self.y = self.data.arrays()
        lo, self.hi = shard(num_samples(self.x), ctx.rank, ctx.workers)
        self._batches = self._walk(lo, ctx.config.seed + ctx.rank, *ctx.position)
        self._position = ctx.position

    def _walk(self, lo: int, seed: int, first_epoch: int, skip: int) -> Any:
        """(epoch, index, first sample) of every batch from the given position on."""
        orders = epoch_orders(lo, self.hi, self.batch_size, seed)
        for _ in range(first_epoch):
            next(orders)  # the same order a first life would have drawn
        for epoch in range(first_epoch, self.epochs):
            order = next(orders)
            for i in range(skip, len(order)):
                yield epoch, i, len(order), order[i]
            skip = 0

    def forward(self) -> Any:
        assert self.model is not None
        item = next(self._batches, None)
        if item is None:
            return FINISHED
        epoch, i, n, first = item
        end = min(first + self.batch_size, self.hi)
        self._position = (epoch, i + 1) if i + 1 < n else (epoch + 1, 0)
        self.samples_taken = end - first
        batch = slice(first, end)
        return self.model.forward(take(self.x, batch), None if self.y is None else self.y[batch])

    def backward(self) -> Gradient:
        assert self.model is not None
        rows = self.model.backward() or []
        return Gradient(self.grad, rows)

    def position(self) -> tuple[int, int]:
        return self._position

    def close(self) -> None:
        self.model = None
        self.x = self.y = self.grad = None  # type: ignore[assignment]
        self._batches = None
        with contextlib.suppress(BufferError):
            self.data.close()
