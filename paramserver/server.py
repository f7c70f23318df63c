"""The server: owns the segments, starts the workers, watches them, stops them, cleans up.

It never blocks the workers: it reads their counter rows (each written by
one worker only) a few times a second, and its only write they see is the
``stop`` control word.

Supervision (:mod:`paramserver.supervise`, shared with the RL server): a
worker that dies (killed, crashed, or silent for longer than ``hang_timeout``)
is restarted with the same rank, shard and counter row, up to ``max_restarts``
times in a run; locks it held are given back first. A worker that raised a
Python exception is not restarted (the same code would raise again): the run
stops and its traceback is shown.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .asynchrony import StaleFirst
from .checkpoint import FILENAME as CHECKPOINT_FILENAME
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Dataset, shard, share_training_data
from .layout import Layout
from .machine import machine_info, usable_cores
from .policy import make_policy
from .progress import Progress
from .store import CONTROL, COUNTER, STATUS, TMP_PREFIX, ParamStore, Segment, sweep_stale
from .supervise import Supervisor, Terminated, run_span
from .supervise import WorkerError as WorkerError  # raised by runs; importable from here as before

POLL_SECONDS = 0.1
FAST_POLL_SECONDS = 0.005
"""Polling interval when evaluations are due every so many updates."""
METRICS_EVERY = 0.5
TRAIN_EVAL_SAMPLES = 2048
"""Training samples the server scores for ``target_train_accuracy``."""


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

    @property
    def staleness(self) -> dict[str, float]:
        """Mean and max staleness of the updates of this run, over all workers."""
        steps = sum(w["steps"] for w in self.workers)
        total = sum(w["staleness_sum"] for w in self.workers)
        top = max((w["staleness_max"] for w in self.workers), default=0.0)
        return {"mean": total / steps if steps else 0.0, "max": top}

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0

    def summary(self) -> str:
        acc = "n/a" if self.test_accuracy is None else f"{100 * self.test_accuracy:.2f}%"
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        out = (
            f"stopped by {self.stop_reason}: test accuracy {acc}, loss {loss}, "
            f"{self.updates} updates, {self.samples} samples in {self.train_seconds:.2f} s "
            f"({self.samples_per_second:,.0f} samples/s; start-up {self.startup_seconds:.2f} s)"
        )
        stale = self.staleness
        nonfinite = int(sum(w["nonfinite"] for w in self.workers))
        out += f"\nstaleness mean {stale['mean']:.2f}, max {stale['max']:.0f}"
        if nonfinite:
            out += f"; {nonfinite} non-finite steps skipped"
        if self.restarts:
            out += f"; {self.restarts} worker restart(s)"
        if self.run_dir:
            out += f"\nresults written to {self.run_dir}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "stop_reason": self.stop_reason,
            "test_accuracy": self.test_accuracy,
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
        }


class ParameterServer(Supervisor):
    """Owns the parameter and data segments and the worker processes of one run.

    Use as a context manager: segments and processes are released on exit,
    whatever happened::

        with ParameterServer(spec, layout, init, data, config) as server:
            result = server.run()
    """

    config: TrainConfig
    _data: Segment | None = None
    _tmpdir: str | None = None

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
        super().__init__(config)
        self.spec = spec
        self.layout = layout
        self.init = init
        self.data = data
        self.callback = callback
        self.stale_first: StaleFirst | None = None
        self.run_dir: str | None = None
        self.resumed: Checkpoint | None = None
        self._started = 0.0
        self._checkpoint_wanted = False
        if len(data.x_train) < config.workers:
            raise ValueError(
                f"{config.workers} workers need at least one training sample each, "
                f"the data has {len(data.x_train)}; use fewer workers"
            )
        if init.shape != (layout.flat_size,) or init.dtype != layout.dtype:
            raise ValueError(f"initial parameters must be a flat {layout.dtype} vector of {layout.flat_size}")
        if config.resume:
            self.resumed = self._check_resume(load_checkpoint(config.resume))

    def _check_resume(self, ckpt: Checkpoint) -> Checkpoint:
        """The checkpoint, once it is known to fit this model and update rule."""
        cfg = self.config
        if ckpt.layout.fingerprint != self.layout.fingerprint:
            raise ValueError(
                f"checkpoint {cfg.resume!r} does not match the model: it holds "
                f"{len(ckpt.layout)} tensors / {ckpt.layout.num_params} parameters, the model has "
                f"{len(self.layout)} / {self.layout.num_params}; resume with the model it was trained with"
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

    def _batches_per_epoch(self, rank: int) -> int:
        lo, hi = shard(len(self.data.x_train), rank, self.config.workers)
        return -(-(hi - lo) // self.config.batch_size)

    def start(self) -> None:
        from paramserver.workers.worker import WorkerPlan, worker_main

        cfg = self.config
        self._started = time.time()
        sweep_stale()
        rule = cfg.update_rule()
        slots = rule.state_slots if cfg.shared_state else 0
        self._store = self._own(ParamStore.create_for(
            self.layout, workers=cfg.workers, state_slots=slots,
            meta={"config": cfg.to_dict(), "server_pid": os.getpid(), "backend": self.spec.backend},
        ))  # fmt: skip
        store = self.store
        store.params[...] = self.init
        base_version = 0
        positions = [(0, 0)] * cfg.workers
        if self.resumed is not None:
            ckpt = self.resumed
            store.params[...] = ckpt.params
            if ckpt.state.shape[0] == slots:
                store.state[...] = ckpt.state
            base_version = ckpt.version
            store.control[CONTROL["base_version"]] = base_version
            rows = ckpt.counters
            if rows.shape[0] == cfg.workers:  # each worker continues where its rank was
                positions = [(int(r[COUNTER["epoch"]]), int(r[COUNTER["batch"]])) for r in rows]
            elif len(rows):  # other shards: every worker starts the least advanced epoch
                positions = [(int(rows[:, COUNTER["epoch"]].min()), 0)] * cfg.workers
        self._data = self._own(share_training_data(self.data))
        # Named after this process, so that `paramserver clean` can remove it if we are killed.
        self._tmpdir = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
        worker_spec = self.spec.via_file(self._tmpdir)

        # spawn, not fork: TensorFlow hangs after fork, and an OpenMP pool in this
        # process can hang forked children. A context, not set_start_method().
        ctx = mp.get_context("spawn")
        # Kept for the whole run: a lock's name is unlinked when the object that created
        # it is collected, and a worker still starting would then fail to open it.
        self.policy = make_policy(cfg.policy, self.layout.flat_size, ctx, k=cfg.k, stripes=cfg.stripes)
        if cfg.stale_first:
            self.stale_first = StaleFirst(ctx, cfg.stale_first)
        # Workers start their first step together, once every one has built its model:
        # spawning and importing take long enough that staggered starts would skew
        # every figure of the first second.
        self.start_barrier = ctx.Barrier(cfg.workers)
        cores = usable_cores()
        threads = cfg.threads or max(1, len(cores) // cfg.workers)
        pin = cfg.pin == "on" or (cfg.pin == "auto" and cfg.workers <= len(cores))
        remaining = max(0, cfg.steps - base_version) if cfg.steps else 0
        if cfg.steps and remaining == 0:
            raise ValueError(
                f"the checkpoint already made {base_version} updates, --steps is {cfg.steps}; "
                "raise --steps to train on"
            )
        total_updates = cfg.steps or cfg.epochs * sum(map(self._batches_per_epoch, range(cfg.workers)))

        # Worker r gets `threads` cores of its own (wrapping round when oversubscribed):
        # pinning a multi-threaded worker to a single core makes its threads fight.
        def cores_of(rank: int) -> tuple[int, ...]:
            return tuple(cores[(rank * threads + i) % len(cores)] for i in range(threads))

        def launch(rank: int, life: int) -> mp.process.BaseProcess:
            steps = 0
            if remaining:
                steps = remaining // cfg.workers + (rank < remaining % cfg.workers)
            plan = WorkerPlan(
                rank=rank, workers=cfg.workers, cores=cores_of(rank) if pin else None,
                threads=threads, steps=steps, parent_pid=os.getpid(), total_updates=total_updates,
                life=life, first_epoch=positions[rank][0], first_batch=positions[rank][1],
            )  # fmt: skip
            args = (worker_spec, plan, store, self._data, self.policy, self.start_barrier, cfg,
                    self.stale_first)  # fmt: skip
            return self._spawn(ctx, worker_main, args, name=f"paramserver-worker-{rank}", threads=threads)

        self._start_workers(launch)

    def close(self) -> None:
        """Stop and join every worker, then unlink the segments and remove the private
        directory. Safe to call twice."""
        super().close()
        self._data = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- supervision --------------------------------------------------------------

    def _restarted(self, ranks: list[int]) -> None:
        if self.stale_first is not None:  # a gate may be waiting for a worker that died
            self.stale_first.wake()

    # -- checkpoints --------------------------------------------------------------

    def checkpoint(self, path: str | None = None) -> str:
        """Write a checkpoint of the live state now (workers keep going); return its path.

        Default path: ``checkpoint.npz`` in the run's directory. Under po3 the copy
        may include half-applied updates, as any read of live parameters does.
        """
        if path is None:
            if not self.run_dir:
                raise ValueError("this run has no output directory: pass a path, or set out_dir")
            path = os.path.join(self.run_dir, CHECKPOINT_FILENAME)
        store = self.store
        return save_checkpoint(
            path, layout=self.layout, params=store.params, state=store.state,
            counters=store.counters, version=store.version(), config=self.config.to_dict(),
            extra={"backend": self.spec.backend},
        )  # fmt: skip

    def _want_checkpoint(self, signum: int, frame: Any) -> None:
        self._checkpoint_wanted = True

    # -- the run --------------------------------------------------------------

    def run(self) -> TrainResult:
        """Watch the workers until a stop criterion holds; evaluate; return the result.

        From the main thread it also handles SIGTERM (stops like Ctrl-C, final
        state written) and SIGUSR1 (writes a checkpoint now).
        """
        with self._signals({signal.SIGUSR1: self._want_checkpoint}):
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.config
        store = self.store
        evaluator = _Evaluator(self.spec, self.layout, store.params, self.data, cfg.seed)
        if cfg.out_dir:
            self.run_dir = _new_run_dir(cfg.out_dir, cfg)
        metrics = None
        if self.run_dir:  # line-buffered: the log is readable while the run goes on
            metrics = open(os.path.join(self.run_dir, "metrics.jsonl"), "w", buffering=1)  # noqa: SIM115
        total_samples = cfg.epochs * len(self.data.x_train)
        progress = Progress(enabled=cfg.progress, total_samples=total_samples, steps=cfg.steps)
        counters = store.counters
        base_version = int(store.control[CONTROL["base_version"]])
        last_metrics = 0.0
        reason = "epochs"
        evaluations: list[dict[str, Any]] = []
        last_acc: float | None = None
        last_train_acc: float | None = None
        last_eval_time = 0.0
        last_eval_updates = 0
        last_ckpt_time = time.time()
        last_ckpt_version = store.version()
        evaluating = cfg.target_accuracy is not None or cfg.target_train_accuracy is not None
        poll = POLL_SECONDS
        if evaluating:
            poll = FAST_POLL_SECONDS if cfg.eval_every_updates else min(POLL_SECONDS, cfg.eval_every)
        t0: float | None = None  # time.time() when the first worker began training
        try:
            while True:
                time.sleep(poll)
                self._supervise()
                if t0 is None:
                    started = counters[:, COUNTER["started"]]
                    if not started.any():
                        continue  # still starting
                    t0 = float(started[started > 0].min())
                now = time.time()
                elapsed = now - t0
                rows = counters.copy()
                samples = int(rows[:, COUNTER["samples"]].sum())
                updates = int(rows[:, COUNTER["steps"]].sum())
                active = rows[:, COUNTER["steps"]] > 0
                loss = float(rows[active, COUNTER["loss"]].mean()) if active.any() else None
                progress.update(elapsed, rows, loss)
                if metrics is not None and now - last_metrics >= METRICS_EVERY:
                    last_metrics = now
                    line = _metrics_line(elapsed, rows, loss, last_acc, last_train_acc)
                    metrics.write(json.dumps(line) + "\n")
                if self._checkpoint_wanted and self.run_dir:
                    self._checkpoint_wanted = False
                    self.checkpoint()
                version = base_version + updates
                if self.run_dir and (
                    (cfg.checkpoint_every and version - last_ckpt_version >= cfg.checkpoint_every)
                    or (cfg.checkpoint_seconds and now - last_ckpt_time >= cfg.checkpoint_seconds)
                ):
                    last_ckpt_time, last_ckpt_version = now, version
                    self.checkpoint()
                if np.all(rows[:, COUNTER["status"]] == STATUS["done"]):
                    reason = "steps" if cfg.steps else "epochs"
                    break
                if cfg.max_seconds and elapsed >= cfg.max_seconds:
                    reason = "time"
                    break
                if cfg.on_nonfinite == "stop" and rows[:, COUNTER["nonfinite"]].any():
                    reason = "nonfinite"
                    break
                if cfg.target_loss is not None and loss is not None and loss <= cfg.target_loss:
                    reason = "target_loss"
                    break
                due = (
                    updates - last_eval_updates >= cfg.eval_every_updates
                    if cfg.eval_every_updates
                    else now - last_eval_time >= cfg.eval_every
                )
                if evaluating and due:
                    last_eval_time, last_eval_updates = now, updates
                    record: dict[str, Any] = {"t": round(elapsed, 4), "updates": updates}
                    if cfg.target_accuracy is not None:
                        last_acc = record["test_accuracy"] = evaluator.accuracy(while_training=True)
                    if cfg.target_train_accuracy is not None:
                        last_train_acc = evaluator.accuracy(while_training=True, split="train")
                        record["train_accuracy"] = last_train_acc
                    evaluations.append(record)
                    if last_acc is not None and last_acc >= cfg.target_accuracy:  # type: ignore[operator]
                        reason = "target_accuracy"
                        break
                    if last_train_acc is not None and last_train_acc >= cfg.target_train_accuracy:  # type: ignore[operator]
                        reason = "target_train_accuracy"
                        break
                if self.callback is not None and self.callback(
                    {
                        "elapsed": elapsed, "updates": updates, "samples": samples, "loss": loss,
                        "test_accuracy": last_acc, "train_accuracy": last_train_acc,
                        "staleness": _staleness(rows), "restarts": self.restarts,
                        "pids": [p.pid for p in self.processes],
                        "steps": rows[:, COUNTER["steps"]].astype(int).tolist(),
                    }
                ):  # fmt: skip
                    reason = "callback"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
        except Terminated:
            reason = "terminated"
        finally:
            store.request_stop()
            progress.close()
            if metrics is not None:
                metrics.close()
        self._join_workers()
        rows = self.worker_rows()
        t_first, t_last = run_span(rows)
        active = [r["loss"] for r in rows if r["steps"] > 0]
        result = TrainResult(
            params={k: v.copy() for k, v in self.layout.unflatten(store.params).items()},
            stop_reason=reason,
            test_accuracy=evaluator.accuracy() if len(self.data.x_test) else None,
            final_loss=float(np.mean(active)) if active else None,
            updates=int(sum(r["steps"] for r in rows)),
            samples=int(sum(r["samples"] for r in rows)),
            train_seconds=max(0.0, t_last - t_first),
            startup_seconds=t_first - self._started,
            workers=rows,
            run_dir=self.run_dir,
            evaluations=evaluations,
            restarts=self.restarts,
            version=store.version(),
        )
        del evaluator  # its views of the segment must go before the segment closes
        if self.run_dir:
            result.checkpoint = self.checkpoint()
            self._write_results(result)
        return result

    def _write_results(self, result: TrainResult) -> None:
        assert self.run_dir is not None
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
        _write_json(os.path.join(self.run_dir, "results.json"), doc)
        np.savez(os.path.join(self.run_dir, "params.npz"), **result.params)


class _Evaluator:
    """Accuracy from the live shared parameters, without pausing the workers
    (PO3 and striped may show a half-applied update: fine for a progress figure).

    ``split="test"``: the held-out split; ``"train"``: a fixed random sample of
    at most :data:`TRAIN_EVAL_SAMPLES` training samples. While workers run it
    uses one thread: a BLAS or OpenMP pool in the server spins between
    evaluations and takes cores from the workers."""

    def __init__(self, spec: Any, layout: Layout, params: np.ndarray, data: Dataset, seed: int = 0):
        from threadpoolctl import ThreadpoolController

        from paramserver.workers.backends import CALIBRATION_SAMPLES, make_backend

        self.backend = make_backend(spec, layout, params)
        if spec.backend == "torch":  # batch-norm statistics from the live parameters
            self.backend.calibration = data.x_train[:CALIBRATION_SAMPLES]
        self.data = data
        self.pools = ThreadpoolController()
        n = len(data.x_train)
        pick = np.sort(np.random.default_rng(seed).permutation(n)[:TRAIN_EVAL_SAMPLES])
        self.train_sample = (data.x_train[pick], data.y_train[pick])

    def accuracy(self, *, while_training: bool = False, split: str = "test", chunk: int = 2048) -> float:
        x, y = (self.data.x_test, self.data.y_test) if split == "test" else self.train_sample
        correct = 0
        threads = 1 if while_training else None
        with self.pools.limit(limits=threads):
            for i in range(0, len(x), chunk):
                logits = self.backend.predict(x[i : i + chunk], threads=threads)
                correct += int((logits.argmax(axis=1) == y[i : i + chunk]).sum())
        return correct / len(x)


def _staleness(rows: np.ndarray) -> dict[str, float]:
    steps = rows[:, COUNTER["steps"]].sum()
    total = rows[:, COUNTER["staleness_sum"]].sum()
    top = float(rows[:, COUNTER["staleness_max"]].max())
    return {"mean": float(total / steps) if steps else 0.0, "max": top}


def _metrics_line(
    elapsed: float, rows: np.ndarray, loss: float | None, acc: float | None, train_acc: float | None
) -> dict[str, Any]:
    steps = rows[:, COUNTER["steps"]]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_stale = np.where(steps > 0, rows[:, COUNTER["staleness_sum"]] / np.maximum(steps, 1), 0.0)
    return {
        "t": round(elapsed, 3),
        "updates": int(steps.sum()),
        "samples": int(rows[:, COUNTER["samples"]].sum()),
        "loss": loss,
        "steps": steps.tolist(),
        "test_accuracy": acc,
        "train_accuracy": train_acc,
        "staleness_mean": [round(float(v), 3) for v in mean_stale],
        "staleness_max": rows[:, COUNTER["staleness_max"]].tolist(),
        "lr": rows[:, COUNTER["lr"]].tolist(),
        "nonfinite": rows[:, COUNTER["nonfinite"]].tolist(),
        "restarts": rows[:, COUNTER["restarts"]].tolist(),
    }


def _new_run_dir(out_dir: str, cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"{stamp}-{cfg.policy}-w{cfg.workers}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    os.makedirs(path)
    return path


def _write_json(path: str, doc: Any) -> None:
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
