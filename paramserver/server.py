"""The server: one lifecycle for every job. It owns the store and the other segments,
starts the workers, watches them, stops them, checkpoints and writes the results.

    with Server(job, config) as server:     # start: segments, policy, workers
        result = server.run()               # watch until a stop criterion holds

What a run trains is its :class:`Job`: :class:`SupervisedJob` (here) for
supervised training, :class:`paramserver.rl.RLJob` for A3C and DQN. The
lifecycle (store, policy, start barrier, placement, supervision and restarts,
signals, checkpoints and ``--resume``, ``metrics.jsonl``, the stop on time or
non-finite steps, results written atomically) is the same for both.

It never blocks the workers: it reads their counter rows (each written by one
worker only) a few times a second, and its only write they see is the stop word.

Supervision (:mod:`paramserver.supervise`): a worker that dies (killed,
crashed, or silent for longer than ``hang_timeout``) is restarted with the same
rank and counter row, up to ``max_restarts`` times in a run; locks it held are
given back first. A worker that raised a Python exception is not restarted
(the same code would raise again): the run stops and its traceback is shown.
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .asynchrony import StaleFirst
from .checkpoint import FILENAME as CHECKPOINT_FILENAME
from .checkpoint import PARAMS_FILENAME, Checkpoint, load_checkpoint, save_checkpoint, save_params
from .config import RunConfig, TrainConfig
from .data import Dataset, num_samples, shard, share_training_data, take
from .layout import Layout
from .machine import machine_info, usable_cores
from .metrics import COLLAPSED, Metric, resolve
from .progress import Progress
from .store import (
    PREFIX,
    Counters,
    ShmStore,
    Store,
    make_private_dir,
    semaphore_names,
    staleness,
    sweep_stale,
)
from .supervise import StartBarrier, Supervisor, run_span, worker_context
from .supervise import WorkerError as WorkerError  # raised by runs; importable from here as before

POLL_SECONDS = 0.1
FAST_POLL_SECONDS = 0.005
"""Polling interval when evaluations are due every so many updates."""
METRICS_EVERY = 0.5
DIVERGED_STEPS, DIVERGED_RATIO = 100, 10
"""A run has diverged once this many steps, and this many times the finite ones, were
non-finite (a worker with a bad batch now and then is not a diverged run)."""
SCAN_DUTY = 100
"""The divergence check scans the parameters at most once per ``SCAN_DUTY`` times its own
duration: at most 1% of one core."""
TRAIN_EVAL_SAMPLES = 2048
"""Training samples the server scores for ``target_train_accuracy``."""


def params_finite(params: np.ndarray) -> bool:
    """No NaN or Inf in ``params``: NumPy's max and min carry a NaN through and cannot
    overflow (a sum can), and they need no compiled kernel (the server loads no numba:
    0.3-0.5 s of a core that the workers would lose). 32M float32: about 8 ms."""
    return params.size == 0 or bool(np.isfinite(params.max()) and np.isfinite(params.min()))


class Job(ABC):
    """What a run trains: the part of the lifecycle that differs between jobs.

    The server calls, in order: :meth:`prepare` (its segments; the store exists),
    :meth:`task` (what each worker computes), :meth:`plan` for each rank, then
    :meth:`begin`, :meth:`poll` a few times a second, :meth:`end`, and after the
    workers stopped :meth:`result` and (with a run directory) :meth:`write`.
    """

    layout: Layout
    """The model's layout."""
    init: np.ndarray
    """The initial flat parameter vector."""
    backend: str = "torch"
    kind: str = "train"

    def prepare(self, server: Server) -> None:
        """Create this job's own segments (with ``server.own``)."""

    @abstractmethod
    def task(self, server: Server) -> Any:
        """The (picklable) task every worker runs."""

    def plan(self, server: Server, rank: int) -> dict[str, Any]:
        """This rank's limits and starting point (fields of ``WorkerPlan``)."""
        return {}

    def resume(self, ckpt: Checkpoint) -> None:
        """Take what the job needs from a checkpoint (positions in the data)."""

    def run_dir_name(self) -> str:
        cfg = self.config  # type: ignore[attr-defined]
        return f"{cfg.policy}-w{cfg.workers}"

    def release(self) -> None:
        """Drop what holds views of the run's segments (an evaluator): called by
        ``result`` and by the server's ``close``, so that an error on the way does not
        keep a segment mapped. Safe to call twice."""

    def begin(self, server: Server) -> None:
        """Before the watch, with the workers started: set up what the job watches with. What
        costs CPU (an evaluator) is built in :meth:`prepare`, before they start."""

    @abstractmethod
    def poll(self, server: Server, elapsed: float, rows: Counters) -> str | None:
        """Once a poll: this job's stop criteria and figures; a reason to stop, or None."""

    def progress(self) -> Progress:
        cfg = self.config  # type: ignore[attr-defined]
        return Progress(enabled=cfg.progress, total_samples=0)

    def poll_seconds(self) -> float:
        return POLL_SECONDS

    def metrics(self) -> dict[str, Any]:
        """This job's figures for the next ``metrics.jsonl`` line."""
        return {}

    def done_reason(self) -> str:
        """Why the run stopped when every worker finished its share."""
        return "steps"

    def end(self, server: Server) -> None:
        """After the watch (whatever ended it): close logs."""

    @abstractmethod
    def result(self, server: Server, reason: str) -> Any:
        """The run's result, once every worker has stopped."""

    def write(self, server: Server, result: Any) -> None:
        """Write the job's files into ``server.run_dir`` (results.json and more)."""


class Server(Supervisor):
    """Owns the store, the job's segments and the worker processes of one run.

    Use as a context manager: segments and processes are released on exit,
    whatever happened::

        with Server(job, config) as server:
            result = server.run()
    """

    _tmpdir: str | None = None
    _tmp_lock: int | None = None
    _sem_locks: list[int] = []  # noqa: RUF012 (a class-level default for close() after a failed start)

    def __init__(self, job: Job, config: RunConfig, *, store_factory: Callable[..., Store] | None = None):
        super().__init__(config)
        self.job = job
        self.store_factory = store_factory or ShmStore.create_for
        """``factory(layout, workers=, state_slots=, meta=)`` makes the run's store (a
        :class:`Store`); the server and the workers use only that interface."""
        self.stale_first: StaleFirst | None = None
        self.run_dir: str | None = None
        self.resumed: Checkpoint | None = None
        self.started = 0.0
        """time.time() when start() began (start-up is measured from it)."""
        self.t0: float | None = None
        """time.time() when the first worker began training."""
        self.tensorboard: Any = None
        """The run's :class:`paramserver.tensorboard.ScalarLog` while it is watched (``--tensorboard``)."""
        self._checkpoint_wanted = False
        self._next_scan = 0.0  # monotonic time of the next scan of the parameters (_diverged)
        if config.resume:
            self.resumed = self._check_resume(load_checkpoint(config.resume))
            job.resume(self.resumed)

    def _check_resume(self, ckpt: Checkpoint) -> Checkpoint:
        """The checkpoint, once it is known to fit this model and update rule."""
        cfg, layout = self.config, self.job.layout
        if ckpt.layout.fingerprint != layout.fingerprint:
            # Equal counts can still differ (names, shapes, dtypes): say where.
            differ = next(
                (
                    f"tensor {a.name!r} is {a.shape} {np.dtype(a.dtype).name} there, "
                    f"{b.name!r} {b.shape} {np.dtype(b.dtype).name} here"
                    for a, b in zip(ckpt.layout, layout, strict=False)
                    if (a.name, a.shape, a.dtype) != (b.name, b.shape, b.dtype)
                ),
                None,
            )
            if differ is not None and len(ckpt.layout) == len(layout):
                raise ValueError(
                    f"checkpoint {cfg.resume!r} does not match the model: {differ}; "
                    "resume with the model it was trained with"
                )
            raise ValueError(
                f"checkpoint {cfg.resume!r} does not match the model: it holds "
                f"{len(ckpt.layout)} tensors / {ckpt.layout.num_params} parameters, the model has "
                f"{len(layout)} / {layout.num_params}; resume with the model it was trained with"
            )
        slots = cfg.update_rule().state_slots if cfg.shared_state else 0
        if ckpt.state.shape[0] not in (0, slots):
            was = ckpt.config.get("optimizer")
            raise ValueError(
                f"checkpoint {cfg.resume!r} holds state for optimizer {was!r} ({ckpt.state.shape[0]} "
                f"slots), this run's {cfg.optimizer!r} needs {slots}; resume with --optimizer {was}"
            )
        return ckpt

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        from paramserver.workers.worker import WorkerPlan, worker_main

        cfg, job = self.config, self.job
        self.started = time.time()
        if cfg.out_dir:  # before anything is spawned: finding out at the end loses the run
            check_writable_dir(cfg.out_dir, "out_dir")
        sweep_stale()
        slots = cfg.update_rule().state_slots if cfg.shared_state else 0
        meta = {"config": cfg.to_dict(), "server_pid": os.getpid(), "backend": job.backend, "job": job.kind}
        self._store = self.own(
            self.store_factory(job.layout, workers=cfg.workers, state_slots=slots, meta=meta)
        )
        store = self.store
        store.params[...] = job.init
        if self.resumed is not None:
            ckpt = self.resumed
            store.params[...] = ckpt.params
            if ckpt.state.shape[0] == slots:
                store.state[...] = ckpt.state
            store.set_base_version(ckpt.version)
        job.prepare(self)
        # Named after this process and locked while it runs, so that `paramserver clean`
        # can remove it if we are killed.
        self._tmpdir, self._tmp_lock = make_private_dir()
        task = job.task(self)

        # Never forked from this process: TensorFlow hangs after fork, and an OpenMP pool
        # here can hang forked children. Spawned, or forked by a clean forkserver.
        ctx, workers_parent = worker_context(job.backend, cfg.start_method)
        with semaphore_names(f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}") as self._sem_locks:
            store.prepare(ctx, cfg)  # the store's consistency rule: its locking policy
            if cfg.stale_first:
                self.stale_first = StaleFirst(cfg.stale_first)
            # Workers start their first step together, once every one has built its model:
            # spawning and importing take long enough that staggered starts would skew
            # every figure of the first second.
            self.start_barrier = StartBarrier(ctx, cfg.workers)
        cores = usable_cores()
        threads = cfg.threads_per_worker(len(cores))
        pin = cfg.pins(len(cores))
        plans = [job.plan(self, rank) for rank in range(cfg.workers)]

        # Worker r gets `threads` cores of its own (wrapping round when oversubscribed):
        # pinning a multi-threaded worker to a single core makes its threads fight.
        def cores_of(rank: int) -> tuple[int, ...]:
            return tuple(cores[(rank * threads + i) % len(cores)] for i in range(threads))

        def launch(rank: int, life: int) -> mp.process.BaseProcess:
            plan = WorkerPlan(
                rank=rank, workers=cfg.workers, cores=cores_of(rank) if pin else None,
                threads=threads, parent_pid=workers_parent, life=life, **plans[rank],
            )  # fmt: skip
            args = (plan, store, task, cfg, self.start_barrier, self.stale_first)
            return self._spawn(ctx, worker_main, args, name=f"paramserver-worker-{rank}", threads=threads)

        self._start_workers(launch)

    @property
    def tmpdir(self) -> str:
        """The run's private temporary directory (removed by :meth:`close`)."""
        assert self._tmpdir is not None, "server not started"
        return self._tmpdir

    def close(self) -> None:
        """Stop and join every worker, then unlink the segments and remove the private
        directory. Safe to call twice."""
        self.job.release()  # its views of the segments go before they close
        super().close()
        # The semaphores are unlinked when their objects are collected: drop ours now.
        self.start_barrier = self.stale_first = None
        for fd in self._sem_locks:
            os.close(fd)
        self._sem_locks = []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if self._tmp_lock is not None:
            os.close(self._tmp_lock)
            self._tmp_lock = None

    # -- checkpoints --------------------------------------------------------------

    def checkpoint(self, path: str | None = None) -> str:
        """Write a checkpoint of the live state now (workers keep going); return its path.

        Default path: the checkpoint file in the run's directory. Under po3 the copy
        may include half-applied updates, as any read of live parameters does.
        """
        if path is None:
            if not self.run_dir:
                raise ValueError("this run has no output directory: pass a path, or set out_dir")
            path = os.path.join(self.run_dir, CHECKPOINT_FILENAME)
        store = self.store
        return save_checkpoint(
            path, layout=self.job.layout, params=store.params, state=store.state,
            counters=store.counters.array, version=store.version(), config=self.config.to_dict(),
            extra={"backend": self.job.backend, "job": self.job.kind},
        )  # fmt: skip

    def _want_checkpoint(self, signum: int, frame: Any) -> None:
        self._checkpoint_wanted = True

    # -- the run --------------------------------------------------------------

    def run(self) -> Any:
        """Watch the workers until a stop criterion holds; return the job's result.

        From the main thread, from start-up on (handlers installed on entering the
        ``with``), SIGTERM and SIGINT stop the run with its results written, and
        SIGUSR1 writes a checkpoint now (at the next poll once the run is watched).
        """
        return self._run()

    def _signal_handlers(self) -> dict[int, Callable[[int, Any], None]]:
        return {signal.SIGUSR1: self._want_checkpoint}

    def _run(self) -> Any:
        cfg, job, store = self.config, self.job, self.store
        if cfg.out_dir:
            self.run_dir = new_run_dir(cfg.out_dir, job.run_dir_name())
        metrics = None
        if self.run_dir:  # line-buffered: the log is readable while the run goes on
            metrics = open(os.path.join(self.run_dir, "metrics.jsonl"), "w", buffering=1)  # noqa: SIM115
        scalars: Any = None
        if cfg.tensorboard:
            from .tensorboard import ScalarLog, train_scalars

            scalars = train_scalars
            name = os.path.basename(self.run_dir) if self.run_dir else job.run_dir_name()
            self.tensorboard = ScalarLog(os.path.join(cfg.tensorboard, name))
        previous: dict[str, Any] | None = None
        job.begin(self)
        progress = job.progress()
        counters = store.counters
        poll = job.poll_seconds()
        last_metrics = 0.0
        reason = job.done_reason()
        last_ckpt_time = time.time()
        last_ckpt_version = store.version()
        try:
            while True:
                if self.stop_signal is not None:
                    reason = self.stop_signal
                    break
                time.sleep(poll)
                self._supervise()
                if self.t0 is None:
                    started = counters.column("started")
                    if not started.any():
                        continue  # still starting
                    self.t0 = float(started[started > 0].min())
                now = time.time()
                elapsed = now - self.t0
                rows = counters.copy()
                loss = rows.mean_loss()
                progress.update(elapsed, rows, loss)
                if (metrics is not None or scalars is not None) and now - last_metrics >= METRICS_EVERY:
                    last_metrics = now
                    line = {**metrics_line(elapsed, rows, loss), **job.metrics()}
                    if metrics is not None:
                        metrics.write(json.dumps(line) + "\n")
                    if scalars is not None:
                        self.tensorboard.add(rows.version(), scalars(line, previous), wall_time=now)
                        previous = line
                if self._checkpoint_wanted and self.run_dir:
                    self._checkpoint_wanted = False
                    self.checkpoint()
                version = rows.version()
                if self.run_dir and (
                    (cfg.checkpoint_every and version - last_ckpt_version >= cfg.checkpoint_every)
                    or (cfg.checkpoint_seconds and now - last_ckpt_time >= cfg.checkpoint_seconds)
                ):
                    last_ckpt_time, last_ckpt_version = now, version
                    self.checkpoint()
                if rows.all_done():
                    reason = "diverged" if self._diverged(final=True) else job.done_reason()
                    break
                if cfg.max_seconds and elapsed >= cfg.max_seconds:
                    reason = "time"
                    break
                if cfg.on_nonfinite == "stop" and rows.column("nonfinite").any():
                    reason = "nonfinite"
                    break
                stop = job.poll(self, elapsed, rows)  # first: its callback sees every poll
                if stop is not None:
                    reason = stop
                    break
                if self._diverged():
                    reason = "diverged"
                    break
        finally:
            store.request_stop()
            progress.close()
            job.end(self)
            if metrics is not None:
                metrics.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        self._join_workers()
        result = job.result(self, reason)
        if self.run_dir:
            result.checkpoint = self.checkpoint()
            job.write(self, result)
        return result

    def _diverged(self, final: bool = False) -> bool:
        """Whether the parameters hold a NaN or Inf, or nearly every step was non-finite
        (said once, on stderr). The scan of the parameters runs at most ``1 / SCAN_DUTY``
        of the time (a float64 sum of a 32M-parameter table, at every poll, took 18 ms of
        every 100 from the workers), and always when ``final``."""
        # Finite gradients can still overflow the parameters, or leave them finite but so
        # large that every later loss is non-finite (a huge learning rate): each step is
        # then skipped and the run would look healthy.
        rows = self.store.counters
        bad, good = int(rows.column("nonfinite").sum()), int(rows.column("steps").sum())
        now = time.monotonic()
        finite = True
        if final or now >= self._next_scan:
            finite = params_finite(self.store.params)
            self._next_scan = now + SCAN_DUTY * (time.monotonic() - now)
        if not finite:
            what = f"the parameters became non-finite after {self.store.version()} updates"
        elif bad >= DIVERGED_STEPS and bad >= DIVERGED_RATIO * good:
            what = f"{bad} of {bad + good} steps were non-finite and skipped"
        else:
            return False
        note(f"{what} (learning rate {self.config.lr:g} too high?); the run was stopped")
        return True

    def span(self) -> tuple[float, float]:
        """``time.time()`` when the first worker began and when the last one finished."""
        return run_span(self.worker_rows())


# -- supervised training ---------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced. ``params`` are the final parameters by name (copies)."""

    params: dict[str, np.ndarray]
    stop_reason: str
    test_accuracy: float | None
    final_loss: float | None
    updates: int
    samples: int
    train_seconds: float
    startup_seconds: float
    workers: list[dict[str, float]] = field(default_factory=list)
    run_dir: str | None = None
    model: Any = None
    """The caller's model with the trained parameters copied in (torch), or the NumPy model."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation made while training: elapsed seconds, updates, accuracies."""
    restarts: int = 0
    """Workers restarted after a crash or a hang."""
    checkpoint: str | None = None
    """The final checkpoint's path (when the run had an output directory)."""
    version: int = 0
    """Global update count at the end, including a resumed checkpoint's updates."""
    metric: str | None = None
    """The name of the metric scored on the test split (``target_metric``)."""
    test_metric: float | None = None
    """Its value at the end (None without a test split)."""
    warnings: list[str] = field(default_factory=list)
    """What looks wrong with the outcome (a collapsed model), also warned of
    (:class:`paramserver.metrics.CollapseWarning`) and shown by :meth:`summary`."""

    @property
    def staleness(self) -> dict[str, float]:
        """Mean and max staleness of the updates of this run, over all workers."""
        return staleness_of(self.workers)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0

    def summary(self) -> str:
        if self.metric in (None, "accuracy"):
            acc = "n/a" if self.test_accuracy is None else f"{100 * self.test_accuracy:.2f}%"
            score = f"test accuracy {acc}"
        else:
            score = f"test {self.metric} " + (
                "n/a" if self.test_metric is None else f"{self.test_metric:.4g}"
            )
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        out = (
            f"stopped by {self.stop_reason}: {score}, loss {loss}, "
            f"{self.updates} updates, {self.samples} samples in {self.train_seconds:.2f} s "
            f"({self.samples_per_second:,.0f} samples/s; start-up {self.startup_seconds:.2f} s)"
        )
        stale = self.staleness
        nonfinite = int(sum(w["nonfinite"] for w in self.workers))
        out += f"\nstaleness mean {stale['mean']:.2f}, max {stale['max']:.0f}"
        if nonfinite:
            out += f"; {nonfinite} non-finite steps skipped"
        out += summary_tail(self.restarts, None)  # on the staleness line
        out += "".join(f"\nwarning: {w}" for w in self.warnings)
        return out + summary_tail(0, self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stop_reason": self.stop_reason,
            "test_accuracy": self.test_accuracy,
            "metric": self.metric,
            "test_metric": self.test_metric,
            "final_loss": self.final_loss,
            "updates": self.updates,
            "samples": self.samples,
            "train_seconds": self.train_seconds,
            "startup_seconds": self.startup_seconds,
            "samples_per_second": self.samples_per_second,
            "workers": self.workers,
            "run_dir": self.run_dir,
            "evaluations": self.evaluations,
            "restarts": self.restarts,
            "staleness": self.staleness,
            "checkpoint": self.checkpoint,
            "version": self.version,
            "warnings": self.warnings,
        }


class SupervisedJob(Job):
    """Supervised training: the training split in a data segment (or its mapped files),
    each worker a shard of it; stops on epochs, steps, a target loss, accuracy or metric;
    evaluates on the test split."""

    def __init__(
        self,
        spec: Any,
        layout: Layout,
        init: np.ndarray,
        data: Dataset,
        config: TrainConfig,
        *,
        callback: Callable[[dict[str, Any]], bool | None] | None = None,
    ):
        if len(data) < config.workers:
            raise ValueError(
                f"{config.workers} workers need at least one training sample each, "
                f"the data has {len(data)}; use fewer workers"
            )
        if config.task != "auto" and config.task != data.task:
            raise ValueError(f"the data is for task {data.task!r}, the config asks for {config.task!r}")
        self.metric = resolve(config.target_metric, data.task, config.target_direction)
        if config.target_accuracy is not None and data.task != "classify":
            raise ValueError(
                f"target_accuracy applies to classification; the task is {data.task!r}: "
                "use target_metric (r2, mse, mae, loss) with target"
            )
        if init.shape != (layout.flat_size,) or init.dtype != layout.dtype:
            raise ValueError(f"initial parameters must be a flat {layout.dtype} vector of {layout.flat_size}")
        self.spec, self.layout, self.init, self.data, self.config = spec, layout, init, data, config
        self.evaluator: Evaluator | None = None
        """Built in ``prepare`` when the run is watched, in ``result`` otherwise."""
        self.backend = spec.backend
        self.callback = callback
        self.positions = [(0, 0)] * config.workers
        self.evaluations: list[dict[str, Any]] = []

    def resume(self, ckpt: Checkpoint) -> None:
        rows = Counters(ckpt.counters)
        epochs, batches = rows.column("epoch"), rows.column("batch")
        if len(rows) == self.config.workers:  # each worker continues where its rank was
            self.positions = [(int(e), int(b)) for e, b in zip(epochs, batches, strict=True)]
        elif len(rows):  # other shards: every worker starts the least advanced epoch
            self.positions = [(int(epochs.min()), 0)] * self.config.workers

    def _batches_per_epoch(self, rank: int) -> int:
        lo, hi = shard(len(self.data), rank, self.config.workers)
        return -(-(hi - lo) // self.config.batch_size)

    def prepare(self, server: Server) -> None:
        self.training_data = share_training_data(self.data)
        if self.training_data.segment is not None:
            server.own(self.training_data.segment)
        cfg = self.config
        base = server.store.version()
        self.remaining = max(0, cfg.steps - base) if cfg.steps else 0
        if cfg.steps and self.remaining == 0:
            raise ValueError(
                f"checkpoint {cfg.resume!r} already made {base} updates, --steps is {cfg.steps}; "
                "raise --steps to train on"
            )
        per_epoch = sum(map(self._batches_per_epoch, range(cfg.workers)))
        self.total_updates = cfg.steps or cfg.epochs * per_epoch
        # Built before any worker starts when the watch needs it: building one imports the
        # model's framework and sets it up (0.7 s of CPU for torch in a fresh process, a node
        # agent's case), which, once the workers train, comes out of their cores.
        if self.evaluating:
            self.evaluator = self._evaluator(server)

    def release(self) -> None:
        self.evaluator = None

    def _evaluator(self, server: Server) -> Evaluator:
        return Evaluator(self.spec, self.layout, server.store.params, self.data, self.config.seed)

    def task(self, server: Server) -> Any:
        from paramserver.workers.worker import SupervisedTask

        cfg = self.config
        return SupervisedTask(
            self.spec.via_file(server.tmpdir), self.training_data, cfg.batch_size, cfg.epochs
        )

    def plan(self, server: Server, rank: int) -> dict[str, Any]:
        workers, remaining = self.config.workers, self.remaining
        steps = remaining // workers + (rank < remaining % workers) if remaining else 0
        epoch, batch = self.positions[rank]
        return {
            "steps": steps,
            "total_updates": self.total_updates,
            "first_epoch": epoch,
            "first_batch": batch,
        }

    def progress(self) -> Progress:
        cfg = self.config
        self.progress_line = Progress(
            enabled=cfg.progress, total_samples=cfg.epochs * len(self.data), steps=cfg.steps
        )
        return self.progress_line

    def poll_seconds(self) -> float:
        cfg = self.config
        if not self.evaluating:
            return POLL_SECONDS
        return FAST_POLL_SECONDS if cfg.eval_every_updates else min(POLL_SECONDS, cfg.eval_every)

    @property
    def evaluating(self) -> bool:
        cfg = self.config
        return (
            cfg.target_accuracy is not None or cfg.target_train_accuracy is not None or cfg.target is not None
        )

    def done_reason(self) -> str:
        return "steps" if self.config.steps else "epochs"

    def begin(self, server: Server) -> None:
        self.last_acc: float | None = None
        self.last_train_acc: float | None = None
        self.last_metric: float | None = None
        self.last_eval_time = 0.0
        self.last_eval_updates = 0

    def metrics(self) -> dict[str, Any]:
        out = {"test_accuracy": self.last_acc, "train_accuracy": self.last_train_acc}
        if self.config.target is not None:
            out[f"test_{self.metric.name}"] = self.last_metric
        return out

    def poll(self, server: Server, elapsed: float, rows: Counters) -> str | None:
        cfg = self.config
        now = time.time()
        updates = rows.updates()
        loss = rows.mean_loss()
        if cfg.target_loss is not None and loss is not None and loss <= cfg.target_loss:
            return "target_loss"
        due = (
            updates - self.last_eval_updates >= cfg.eval_every_updates
            if cfg.eval_every_updates
            else now - self.last_eval_time >= cfg.eval_every
        )
        if self.evaluator is not None and due:
            self.last_eval_time, self.last_eval_updates = now, updates
            record: dict[str, Any] = {"t": round(elapsed, 4), "updates": updates}
            if cfg.target_accuracy is not None:
                self.last_acc = record["test_accuracy"] = self.evaluator.accuracy(while_training=True)
            if cfg.target_train_accuracy is not None:
                self.last_train_acc = self.evaluator.accuracy(while_training=True, split="train")
                record["train_accuracy"] = self.last_train_acc
            if cfg.target is not None:
                self.last_metric = self.evaluator.score(self.metric, while_training=True)
                record[f"test_{self.metric.name}"] = self.last_metric
            self.evaluations.append(record)
            shown = [f"{k} {v:.4g}" for k, v in record.items() if k not in ("t", "updates") and v is not None]
            self.progress_line.note = ", ".join(shown)
            if self.last_metric is not None and self.metric.reached(self.last_metric, cfg.target):  # type: ignore[arg-type]
                return "target_metric"
            if self.last_acc is not None and self.last_acc >= cfg.target_accuracy:  # type: ignore[operator]
                return "target_accuracy"
            if self.last_train_acc is not None and self.last_train_acc >= cfg.target_train_accuracy:  # type: ignore[operator]
                return "target_train_accuracy"
        if self.callback is not None and self.callback(
            {
                "elapsed": elapsed, "updates": updates, "samples": int(rows.column("samples").sum()),
                "loss": loss, "test_accuracy": self.last_acc, "train_accuracy": self.last_train_acc,
                "test_metric": self.last_metric,
                "staleness": rows.staleness(), "restarts": server.restarts,
                "pids": [p.pid for p in server.processes], "steps": rows.column("steps").astype(int).tolist(),
            }
        ):  # fmt: skip
            return "callback"
        return None

    def result(self, server: Server, reason: str) -> TrainResult:
        rows = server.worker_rows()
        t_first, t_last = run_span(rows)
        active = [r["loss"] for r in rows if r["steps"] > 0]
        store = server.store
        accuracy = score = None
        collapsed = False
        if self.evaluator is not None or num_samples(self.data.x_test):
            # Without a watch, the evaluator is built now that the workers are done.
            self.evaluator = self.evaluator or self._evaluator(server)
            accuracy, score, collapsed = self.evaluator.final(self.metric, self.init)
        result = TrainResult(
            params={k: v.copy() for k, v in self.layout.unflatten(store.params).items()},
            stop_reason=reason,
            test_accuracy=accuracy,
            final_loss=float(np.mean(active)) if active else None,
            updates=int(sum(r["steps"] for r in rows)),
            samples=int(sum(r["samples"] for r in rows)),
            train_seconds=max(0.0, t_last - t_first),
            startup_seconds=t_first - server.started,
            workers=rows,
            run_dir=server.run_dir,
            evaluations=self.evaluations,
            restarts=server.restarts,
            version=store.version(),
            metric=self.metric.name,
            test_metric=score,
            warnings=[COLLAPSED] if collapsed else [],
        )
        self.release()
        return result

    def write(self, server: Server, result: TrainResult) -> None:
        assert server.run_dir is not None
        doc = {
            "result": result.to_dict(),
            "config": self.config.to_dict(),
            "data": self.data.describe(),
            "model": {
                "backend": self.spec.backend,
                "parameters": self.layout.num_params,
                "tensors": len(self.layout),
                "fingerprint": self.layout.fingerprint,
            },
            "machine": machine_info(),
        }
        write_json(os.path.join(server.run_dir, "results.json"), doc)
        save_params(
            os.path.join(server.run_dir, PARAMS_FILENAME), result.params,
            {"fingerprint": self.layout.fingerprint, "backend": self.spec.backend},
        )  # fmt: skip


class ParameterServer(Server):
    """A supervised training run: ``Server(SupervisedJob(spec, layout, init, data, config,
    callback=...), config)``; ``store_factory`` as for :class:`Server`.

    Use as a context manager: segments and processes are released on exit,
    whatever happened::

        with ParameterServer(spec, layout, init, data, config) as server:
            result = server.run()
    """

    config: TrainConfig

    def __init__(self, *args: Any, store_factory: Callable[..., Store] | None = None, **kwargs: Any):
        job = SupervisedJob(*args, **kwargs)
        super().__init__(job, job.config, store_factory=store_factory)

    @property
    def layout(self) -> Layout:
        return self.job.layout


class Evaluator:
    """Scores of the live shared parameters on held-out data, without pausing the workers
    (PO3 and striped may show a half-applied update: fine for a progress figure).

    ``split="test"``: the held-out split; ``"train"``: a fixed random sample of
    at most :data:`TRAIN_EVAL_SAMPLES` training samples. While workers run it
    uses one thread: a BLAS or OpenMP pool in the server spins between
    evaluations and takes cores from the workers."""

    def __init__(self, spec: Any, layout: Layout, params: np.ndarray, data: Dataset, seed: int = 0):
        from threadpoolctl import ThreadpoolController

        from paramserver.workers.backends import make_backend

        self.spec, self.layout = spec, layout
        self.backend = make_backend(spec, layout, params)
        self.backend.for_evaluation(data)
        self.data = data
        self.pools = ThreadpoolController()
        n = len(data)
        pick = np.sort(np.random.default_rng(seed).permutation(n)[:TRAIN_EVAL_SAMPLES])
        y = None if data.y_train is None else data.y_train[pick]
        self.train_sample = (take(data.x_train, pick), y)

    def _split(self, split: str) -> tuple[Any, Any]:
        x, y = (self.data.x_test, self.data.y_test) if split == "test" else self.train_sample
        return x, x if y is None else y  # unsupervised: the inputs are the targets

    def outputs(self, x: Any, *, while_training: bool = False, chunk: int = 2048, backend: Any = None) -> Any:
        """The model's outputs for ``x``, in chunks (concatenated); ``backend``: another
        backend of this model than the one on the live parameters."""
        backend = backend or self.backend
        threads = 1 if while_training else None
        parts = []
        with self.pools.limit(limits=threads):
            for i in range(0, num_samples(x), chunk):
                parts.append(backend.predict(take(x, slice(i, i + chunk)), threads=threads))
        return np.concatenate(parts)

    def accuracy(self, *, while_training: bool = False, split: str = "test") -> float:
        from .metrics import accuracy

        x, y = self._split(split)
        return accuracy(self.outputs(x, while_training=while_training), np.asarray(y))

    def score(self, metric: Metric, *, while_training: bool = False, split: str = "test") -> float | None:
        """``metric`` of the current parameters on ``split`` (None: no such split)."""
        x, y = self._split(split)
        if not num_samples(x):
            return None
        return self._score(metric, self.outputs(x, while_training=while_training), y)

    def _score(self, metric: Metric, outputs: Any, y: Any) -> float:
        if metric.fn is None:  # the backend's own loss
            return self.backend.loss_of(outputs, y)
        return float(metric.fn(outputs, y if isinstance(y, dict) else np.asarray(y)))

    def final(self, metric: Metric, init: np.ndarray) -> tuple[float | None, float | None, bool]:
        """At the end of a run, from one pass over the test split: the accuracy (for
        classification), ``metric``'s score and whether the model has collapsed: it gives
        every test sample the same output, and with the ``init`` parameters it did not
        (a model that starts so, zero-initialized and barely trained, or a test split of
        equal inputs, has not collapsed). Without a test split: None, None, False."""
        from .metrics import accuracy, constant_outputs

        x, y = self._split("test")
        if not num_samples(x):
            return None, None, False
        outputs = self.outputs(x)
        acc = accuracy(outputs, np.asarray(y)) if self.data.task == "classify" else None
        score = acc if metric.name == "accuracy" else self._score(metric, outputs, y)
        return acc, score, constant_outputs(outputs) and not constant_outputs(self._outputs_with(init, x))

    def _outputs_with(self, params: np.ndarray, x: Any) -> np.ndarray:
        from paramserver.workers.backends import make_backend

        backend = make_backend(self.spec, self.layout, np.array(params, dtype=self.layout.dtype))
        backend.for_evaluation(self.data)
        return self.outputs(x, backend=backend)


# -- figures and files, for every job ----------------------------------------------------------


def staleness_of(workers: list[dict[str, float]]) -> dict[str, float]:
    """Mean and max staleness from the workers' rows (as dicts)."""
    return staleness(
        *(np.array([w.get(k, 0.0) for w in workers]) for k in ("steps", "staleness_sum", "staleness_max"))
    )


def warn_of(result: TrainResult, stacklevel: int) -> None:
    """Warn of what ``result.warnings`` holds, naming the code ``stacklevel`` frames up
    from the caller (1: the caller itself)."""
    import warnings

    from .metrics import CollapseWarning

    for text in result.warnings:
        warnings.warn(text, CollapseWarning, stacklevel=stacklevel + 1)


def summary_tail(restarts: int, run_dir: str | None) -> str:
    """The end of every result's summary: restarts, and where the results are."""
    out = f"; {restarts} worker restart(s)" if restarts else ""
    return out + (f"\nresults written to {run_dir}" if run_dir else "")


def metrics_line(elapsed: float, rows: Counters, loss: float | None) -> dict[str, Any]:
    """The figures every job writes to ``metrics.jsonl`` twice a second."""
    return {
        "t": round(elapsed, 3),
        "updates": rows.updates(),
        "samples": int(rows.column("samples").sum()),
        "loss": loss,
        "steps": rows.column("steps").tolist(),
        "staleness_mean": [round(float(v), 3) for v in rows.mean_staleness()],
        "staleness_max": rows.column("staleness_max").tolist(),
        "lr": rows.column("lr").tolist(),
        "nonfinite": rows.column("nonfinite").tolist(),
        "restarts": rows.column("restarts").tolist(),
    }


def new_run_dir(out_dir: str, name: str) -> str:
    """A new directory ``<out_dir>/<time>-<name>`` (``-2``, ``-3``... if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"{stamp}-{name}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    os.makedirs(path)
    return path


def check_writable_dir(path: str, what: str) -> None:
    """Create ``path`` if need be and prove a file can be written there, or raise
    ValueError naming ``what``."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror
        if e.errno == errno.ENOENT and os.path.isdir(path):  # /proc, /sys: ENOENT for a new file
            reason = "it takes no new files"
        raise ValueError(f"{what} {path!r} is not a writable directory ({reason}); pass another") from None


def write_json(path: str, doc: Any) -> None:
    """Write ``doc`` atomically: a temporary file, then a rename over ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def note(message: str) -> None:
    """A one-line note on stderr."""
    print(f"paramserver: {message}", file=sys.stderr, flush=True)
