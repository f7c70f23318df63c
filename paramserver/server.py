"""The server: owns the segments, starts the workers, watches them, stops them, cleans up.

It never blocks the workers: it reads their counter rows (each written by
one worker only) a few times a second, and its only write they see is the
``stop`` control word.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import TrainConfig
from .data import Dataset, share_training_data
from .layout import Layout
from .machine import machine_info, usable_cores
from .policy import Policy, make_policy
from .progress import Progress
from .store import COUNTER, COUNTER_FIELDS, STATUS, ParamStore, Segment, sweep_stale

POLL_SECONDS = 0.1
METRICS_EVERY = 0.5
JOIN_TIMEOUT = 10.0


class WorkerError(RuntimeError):
    """A worker process died or failed; the run was stopped."""


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
        }


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """Thread-pool sizes for a child about to be spawned: BLAS and OpenMP read these
    at import, which in a spawned child happens before any of our code runs."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


class ParameterServer:
    """Owns the parameter and data segments and the worker processes of one run.

    Use as a context manager: segments and processes are released on exit,
    whatever happened::

        with ParameterServer(spec, layout, init, data, config) as server:
            result = server.run()
    """

    _store: ParamStore | None = None
    _data: Segment | None = None
    _tmpdir: tempfile.TemporaryDirectory[str] | None = None

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
        self.spec = spec
        self.layout = layout
        self.init = init
        self.data = data
        self.config = config
        self.callback = callback
        self.processes: list[mp.process.BaseProcess] = []
        self.policy: Policy | None = None
        self.start_barrier: Any = None
        self.run_dir: str | None = None
        self._started = 0.0
        if len(data.x_train) < config.workers:
            raise ValueError(
                f"{config.workers} workers need at least one training sample each, "
                f"the data has {len(data.x_train)}; use fewer workers"
            )
        if init.shape != (layout.flat_size,) or init.dtype != layout.dtype:
            raise ValueError(f"initial parameters must be a flat {layout.dtype} vector of {layout.flat_size}")

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> ParameterServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> ParamStore:
        assert self._store is not None, "server not started"
        return self._store

    def start(self) -> None:
        from paramserver.workers.worker import WorkerPlan, worker_main

        cfg = self.config
        self._started = time.time()
        sweep_stale()
        rule = cfg.update_rule()
        slots = rule.state_slots if cfg.shared_state else 0
        self._store = ParamStore.create_for(
            self.layout, workers=cfg.workers, state_slots=slots,
            meta={"config": cfg.to_dict(), "server_pid": os.getpid(), "backend": self.spec.backend},
        )  # fmt: skip
        self.store.params[...] = self.init
        self._data = share_training_data(self.data)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="paramserver-")
        worker_spec = self.spec.via_file(self._tmpdir.name)

        # spawn, not fork: TensorFlow hangs after fork, and an OpenMP pool in this
        # process can hang forked children. A context, not set_start_method().
        ctx = mp.get_context("spawn")
        # Kept for the whole run: a lock's name is unlinked when the object that created
        # it is collected, and a worker still starting would then fail to open it.
        self.policy = make_policy(cfg.policy, self.layout.flat_size, ctx, k=cfg.k, stripes=cfg.stripes)
        # Workers start their first step together, once every one has built its model:
        # spawning and importing take long enough that staggered starts would skew
        # every figure of the first second.
        self.start_barrier = ctx.Barrier(cfg.workers)
        cores = usable_cores()
        threads = cfg.threads or max(1, len(cores) // cfg.workers)
        pin = cfg.pin == "on" or (cfg.pin == "auto" and cfg.workers <= len(cores))

        # Worker r gets `threads` cores of its own (wrapping round when oversubscribed):
        # pinning a multi-threaded worker to a single core makes its threads fight.
        def cores_of(rank: int) -> tuple[int, ...]:
            return tuple(cores[(rank * threads + i) % len(cores)] for i in range(threads))

        for rank in range(cfg.workers):
            steps = 0
            if cfg.steps:
                steps = cfg.steps // cfg.workers + (rank < cfg.steps % cfg.workers)
            plan = WorkerPlan(
                rank=rank, workers=cfg.workers,
                cores=cores_of(rank) if pin else None,
                threads=threads, steps=steps, parent_pid=os.getpid(),
            )  # fmt: skip
            p = ctx.Process(
                target=worker_main,
                args=(worker_spec, plan, self.store, self._data, self.policy, self.start_barrier, cfg),
                name=f"paramserver-worker-{rank}",
                daemon=True,  # never outlive the server
            )
            with _thread_env(threads):
                p.start()
            self.processes.append(p)

    def close(self) -> None:
        """Stop and join every worker, then unlink the segments. Safe to call twice."""
        if self._store is not None:
            self._store.request_stop()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for p in self.processes:
            with contextlib.suppress(ValueError):
                p.close()
        self.processes = []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        segments = [seg for seg in (self._store, self._data) if seg is not None]
        for seg in segments:  # unlink first: it cannot fail on views still in use
            seg.unlink()
        for seg in segments:
            # After an error, a traceback can still hold views (an evaluator, a counter
            # row); the mapping is then released when they are collected.
            with contextlib.suppress(BufferError):
                seg.close()
        self._store = self._data = None

    # -- monitoring ---------------------------------------------------------------

    def _check_workers(self) -> None:
        for rank, p in enumerate(self.processes):
            code = p.exitcode
            status = self.store.counters[rank, COUNTER["status"]]
            if code is not None and (code != 0 or status == STATUS["failed"]):
                cause = f"exit code {code}"
                if code < 0:
                    cause = f"killed by {signal.Signals(-code).name}"
                raise WorkerError(
                    f"worker {rank} died ({cause}); its traceback, if any, is above. The run was stopped."
                )

    def worker_rows(self) -> list[dict[str, float]]:
        return [dict(zip(COUNTER_FIELDS, map(float, row), strict=True)) for row in self.store.counters]

    def run(self) -> TrainResult:
        """Watch the workers until a stop criterion holds; evaluate; return the result."""
        cfg = self.config
        store = self.store
        evaluator = _Evaluator(self.spec, self.layout, store.params, self.data)
        if cfg.out_dir:
            self.run_dir = _new_run_dir(cfg.out_dir, cfg)
        metrics = None
        if self.run_dir:  # line-buffered: the log is readable while the run goes on
            metrics = open(os.path.join(self.run_dir, "metrics.jsonl"), "w", buffering=1)  # noqa: SIM115
        total_samples = cfg.epochs * len(self.data.x_train)
        progress = Progress(enabled=cfg.progress, total_samples=total_samples, steps=cfg.steps)
        counters = store.counters
        last_metrics = 0.0
        reason = "epochs"
        last_acc: float | None = None
        last_eval = 0.0
        t0: float | None = None  # time.time() when the first worker began training
        poll = POLL_SECONDS if cfg.target_accuracy is None else min(POLL_SECONDS, cfg.eval_every)
        try:
            while True:
                time.sleep(poll)
                self._check_workers()
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
                    metrics.write(json.dumps({
                        "t": round(elapsed, 3), "updates": updates, "samples": samples, "loss": loss,
                        "steps": rows[:, COUNTER["steps"]].tolist(), "test_accuracy": last_acc,
                    }) + "\n")  # fmt: skip
                if np.all(rows[:, COUNTER["status"]] == STATUS["done"]):
                    reason = "steps" if cfg.steps else "epochs"
                    break
                if cfg.max_seconds and elapsed >= cfg.max_seconds:
                    reason = "time"
                    break
                if cfg.target_loss is not None and loss is not None and loss <= cfg.target_loss:
                    reason = "target_loss"
                    break
                if cfg.target_accuracy is not None and now - last_eval >= cfg.eval_every:
                    last_eval = now
                    last_acc = evaluator.accuracy(while_training=True)
                    if last_acc >= cfg.target_accuracy:
                        reason = "target_accuracy"
                        break
                if self.callback is not None and self.callback(
                    {"elapsed": elapsed, "updates": updates, "samples": samples, "loss": loss}
                ):
                    reason = "callback"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            store.request_stop()
            progress.close()
            if metrics is not None:
                metrics.close()
        for p in self.processes:
            p.join(JOIN_TIMEOUT)
        self._check_workers()
        rows = self.worker_rows()
        begun = [r["started"] for r in rows if r["started"] > 0]
        ended = [r["finished"] for r in rows if r["finished"] > 0]
        t_first = min(begun) if begun else time.time()
        t_last = max(ended) if len(ended) == len(rows) else time.time()
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
        )
        del evaluator  # its views of the segment must go before the segment closes
        if self.run_dir:
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
    """Test-set accuracy from the live shared parameters, without pausing the workers
    (PO3 and striped may show a half-applied update: fine for a progress figure).

    While workers run it uses one thread: a BLAS or OpenMP pool in the server
    spins between evaluations and takes cores from the workers."""

    def __init__(self, spec: Any, layout: Layout, params: np.ndarray, data: Dataset):
        from threadpoolctl import ThreadpoolController

        from paramserver.workers.backends import make_backend

        self.backend = make_backend(spec, layout, params)
        self.data = data
        self.pools = ThreadpoolController()

    def accuracy(self, *, while_training: bool = False, chunk: int = 2048) -> float:
        x, y = self.data.x_test, self.data.y_test
        correct = 0
        threads = 1 if while_training else None
        with self.pools.limit(limits=threads):
            for i in range(0, len(x), chunk):
                logits = self.backend.predict(x[i : i + chunk], threads=threads)
                correct += int((logits.argmax(axis=1) == y[i : i + chunk]).sum())
        return correct / len(x)


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
