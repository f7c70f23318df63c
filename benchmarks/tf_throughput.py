"""TensorFlow throughput: the best single TF process against paramserver with N TF workers,
and what the pull (shared parameters into the variables) costs per step.

    python -m paramserver.benchmarks --suites tf [--quick]

Measured as the ``throughput`` suite measures PyTorch (same window, warm-up,
tasks and optimizer settings): every process starts (importing TensorFlow is
outside the window), does a few warm-up steps, then the parent counts the
samples all of them process in ``cfg.run_seconds``.

* ``single``: one process, a compiled Keras training step (``tf.function``
  with ``GradientTape`` and ``keras.optimizers.SGD``), at each thread count
  from 1 to the cores; the best is the baseline;
* ``paramserver-<policy>``: this project with N TF workers (by default N up
  to the cores; ``--quick``: 2 workers, po3, the CNN only).

The pull is timed inside the single process at 1 thread (best of repeats):
the step as the workers run it (pull in the compiled step), the same step
without the pull, and the alternative, ``Variable.assign`` per variable from
NumPy views of the flat vector.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
from typing import Any

import numpy as np

from .common import BenchConfig, Report, scaling_ceiling, throughput_medians, timed
from .throughput import LR, MOMENTUM, _window

WARMUP_STEPS = 5
JOIN_TIMEOUT = 30.0
SUITE = "tf"


def task_data(task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """As ``throughput.task_data``, channels-last (TensorFlow's CPU layout)."""
    if task == "cnn":
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((6400, 28, 28, 1), dtype=np.float32)
        return x, rng.integers(0, 10, len(x)).astype(np.int64), 64
    from paramserver.data import load_digits

    d = load_digits(seed=seed)
    return d.x_train, d.y_train, 64


def task_model(task: str) -> Any:
    """The ``KerasModel`` of a task: the Hogwild CNN or the 64-unit MLP."""
    from paramserver import KerasModel
    from paramserver.models import tf_models

    if task == "cnn":
        return KerasModel(functools.partial(tf_models.hogwild_net, (28, 28, 1), 10))
    return KerasModel(functools.partial(tf_models.mlp, (64,), 10, 64))


# -- the single process (top level: it is spawned) ----------------------------------------


def _single(task: str, threads: int, counts: Any, stop: Any, results: Any, pull: bool) -> None:
    from paramserver.workers.tf_backend import set_threads_and_seed

    set_threads_and_seed(threads, 0)
    import keras
    import tensorflow as tf

    x, y, batch = task_data(task)
    if pull:
        results.put(_pull_costs(task, x[:batch], y[:batch]))
    model = task_model(task).factory()
    variables = model.trainable_variables
    opt = keras.optimizers.SGD(LR, momentum=MOMENTUM)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(xb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    while not stop.value:
        for s in range(0, len(x) - batch + 1, batch):
            if stop.value:
                break
            step(x[s : s + batch], y[s : s + batch])
            counts[0] += batch


def _pull_costs(task: str, xb: np.ndarray, yb: np.ndarray) -> dict[str, float]:
    """Microseconds per step: the worker's step, the same without the pull, the eager pull."""
    import paramserver as ps
    from paramserver.workers.tf_backend import model_spec

    spec, layout, init = model_spec(task_model(task), None, xb.shape[1:], xb)
    with ps.ParamStore.create_for(layout, workers=1) as store:
        store.params[...] = init
        # Every view of the segment lives in _time_pull's frame and is gone when it returns.
        return {**_time_pull(task, spec, layout, store.params, xb, yb), "parameters": layout.num_params,
                "variables": len(layout)}  # fmt: skip


def _time_pull(
    task: str, spec: Any, layout: Any, params: np.ndarray, xb: np.ndarray, yb: np.ndarray
) -> dict[str, float]:
    from paramserver.workers.tf_backend import TFBackend

    grad = np.zeros_like(params)
    backend = TFBackend(spec, layout, params, grad)
    grad_only = backend._graphs.grad_only
    variables = backend.model.trainable_variables
    views = list(layout.unflatten(params).values())

    def worker_step() -> None:  # pull + loss + gradient, then the copy out
        backend.forward(xb, yb)
        backend.backward()

    def no_pull_step() -> None:
        _, flat = grad_only(xb, yb)
        grad[...] = flat

    def eager_pull() -> None:
        for v, a in zip(variables, views, strict=True):
            v.assign(a)

    # The fastest of many single steps, interleaved: the pull is small next to a step, and
    # on a busy machine only short windows escape the other processes.
    fns = {"step_us": worker_step, "step_without_pull_us": no_pull_step, "eager_assign_pull_us": eager_pull}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(60 if task == "cnn" else 300):
        for key, fn in fns.items():
            best[key] = min(best[key], 1e6 * timed(fn, repeat=1))
    return best


def measure_single(task: str, threads: int, seconds: float, pull: bool = False) -> tuple[float, Any]:
    ctx = mp.get_context("spawn")
    counts, stop, results = ctx.RawArray("d", 1), ctx.RawValue("i", 0), ctx.SimpleQueue()
    p = ctx.Process(target=_single, args=(task, threads, counts, stop, results, pull), daemon=True)
    p.start()

    def alive() -> None:
        if p.exitcode not in (None, 0):
            raise RuntimeError(f"the single TF process died with exit code {p.exitcode}")

    try:
        _, _, batch = task_data(task)
        sps = _window(lambda: np.frombuffer(counts, np.float64).copy(), alive, WARMUP_STEPS * batch, seconds)
        return sps, results.get() if pull else None
    finally:
        stop.value = 1
        p.join(JOIN_TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join(5)


def measure_paramserver(task: str, n: int, policy: str, seconds: float) -> float:
    import paramserver as ps
    from paramserver.api import model_spec
    from paramserver.server import ParameterServer

    x, y, batch = task_data(task)
    data = ps.Dataset(x, y, x[:1], y[:1], 10, task)
    cfg = ps.TrainConfig(
        workers=n, policy=policy, lr=LR, momentum=MOMENTUM, shared_state=False, batch_size=batch,
        epochs=10**6, out_dir="", progress=False,
    )  # fmt: skip
    spec, layout, init = model_spec(task_model(task), None, 0, data)
    with ParameterServer(spec, layout, init, data, cfg) as server:
        return _window(
            lambda: server.store.counters.column("samples").copy(),
            server.check_workers,
            WARMUP_STEPS * batch,
            seconds,
        )


# -- the suite -----------------------------------------------------------------------------


def run(cfg: BenchConfig, report: Report) -> None:
    try:
        from paramserver.workers.tf_backend import import_tf

        import_tf()
    except ImportError as e:
        report.note(SUITE, f"skipped: {e}")
        return
    cores = len(os.sched_getaffinity(0))
    # By default up to the cores: more TF workers than cores only measure oversubscription,
    # and each one pays TensorFlow's start-up (--workers measures any count).
    counts = cfg.worker_counts if cfg.workers else [c for c in cfg.worker_counts if c <= cores] or [1]
    if cfg.quick and not cfg.workers:
        counts = [2]
    tasks = ["cnn"] if cfg.quick else ["cnn", "mlp"]
    for task in tasks:
        policies = ["po3"] if cfg.quick or task == "mlp" else ["po3", "striped"]
        for rep in range(cfg.n_repeats):
            # Interleaved: every contender once per repeat, so drifts hit all alike.
            for t in range(1, cores + 1):
                sps, pull = measure_single(task, t, cfg.run_seconds, pull=(rep == 0 and t == 1))
                row = {"task": task, "contender": "single", "workers": 1, "threads": t}
                report.add(SUITE, {**row, "repeat": rep, "samples_per_s": sps})
                if pull:
                    report.add(SUITE, {"task": task, "kind": "pull", **pull})
            for n in counts:
                for policy in policies:
                    sps = measure_paramserver(task, n, policy, cfg.run_seconds)
                    row = {"task": task, "contender": f"paramserver-{policy}", "workers": n}
                    report.add(
                        SUITE, {**row, "threads": max(1, cores // n), "repeat": rep, "samples_per_s": sps}
                    )
        _summarise(report, task, counts, policies, cores, cfg.n_repeats)


def _summarise(
    report: Report, task: str, counts: list[int], policies: list[str], cores: int, repeats: int
) -> None:
    rows = [r for r in report.rows[SUITE] if r["task"] == task and "contender" in r]
    med, single, best_t = throughput_medians(rows, cores)
    best = single[best_t]
    contenders = [f"paramserver-{p}" for p in policies]
    header = ["workers", "linear", *contenders, "ps po3 / best single"]
    table = [
        [n, best * n, *(med(c, n) for c in contenders), med("paramserver-po3", n) / best] for n in counts
    ]
    report.note(
        SUITE,
        f"{task}: best single TF process {best:,.0f} samples/s with {best_t} thread(s) "
        f"(by thread count: {', '.join(f'{t}: {v:,.0f}' for t, v in single.items())}); "
        f"table in samples/s, medians of {repeats} repeat(s)",
    )
    report.table(SUITE, header, table)
    pull = next((r for r in report.rows[SUITE] if r["task"] == task and r.get("kind") == "pull"), None)
    if pull:
        in_graph = pull["step_us"] - pull["step_without_pull_us"]
        report.note(
            SUITE,
            f"{task} pull per step ({pull['parameters']:,} parameters in {pull['variables']} variables, "
            f"1 thread): in the compiled step {in_graph:+,.0f} us (step {pull['step_us']:,.0f} us with it, "
            f"{pull['step_without_pull_us']:,.0f} us without); Variable.assign from NumPy views "
            f"{pull['eager_assign_pull_us']:,.0f} us",
        )
    if task == "cnn" and 2 in counts:
        speedup = med("paramserver-po3", 2) / best
        report.note(SUITE, scaling_ceiling(single, best, med("paramserver-po3", 2), 2, cores))
        report.note(SUITE, f"target po3 2 TF workers >= 1.7x best single TF process (CNN): "
                    f"{speedup:.2f}x, {'met' if speedup >= 1.7 else 'MISSED'}")  # fmt: skip
