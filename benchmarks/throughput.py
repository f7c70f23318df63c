"""Throughput scaling: samples/s against the peers, in one run, interleaved.

    python -m paramserver.benchmarks --suites throughput [--quick]

Every contender is measured the same way: its processes start, each does a few
warm-up steps, then the parent counts the samples all of them process in a
window of ``cfg.run_seconds`` (from shared counters that each process bumps
after every step), and tells them to stop. Start-up (spawning, importing
PyTorch) is outside the window for everyone.

Contenders, for N workers:

* ``single``: one process, plain PyTorch training, at each thread count from 1
  to the cores; the best is the baseline (more threads is often slower for
  small models);
* ``torch-hogwild``: PyTorch's own recipe, ``model.share_memory()`` and N
  ``torch.multiprocessing`` processes, each with its own optimizer and
  ``torch.set_num_threads(max(1, cores // N))``;
* ``manager``: parameters pulled from and gradients pushed to a
  ``multiprocessing.Manager`` object every step, the way some frameworks share
  them (the object applies SGD with momentum, so that state is shared there);
* ``paramserver-<policy>``: this project, per policy.

The same model, batch size, optimizer (SGD, lr 0.01, momentum 0.5 kept per
process, as in the recipe) and data for all. Tasks: ``cnn`` (MNIST-shaped
images), ``mlp`` (digits), and ``embedding``: a bag-of-words classifier,
``nn.EmbeddingBag(1_000_000, 32, mode="mean", sparse=True)`` + ``nn.Linear(32,
2)``, 10 token ids per sample, batch 32, plain SGD lr 0.1 (torch refuses
momentum on sparse gradients) -- the Hogwild! regime, where every contender
updates only the rows of its batch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from multiprocessing.managers import BaseManager
from typing import Any

import numpy as np

from .common import BenchConfig, Report, scaling_ceiling, throughput_medians

WARMUP_STEPS = 5
JOIN_TIMEOUT = 30.0
LR, MOMENTUM = 0.01, 0.5
POLICIES = ("po1", "po2", "po3", "striped")


# -- tasks ----------------------------------------------------------------------------


def task_data(task: str, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Inputs, labels and batch size of a task (deterministic: every process builds the same)."""
    if task == "cnn":
        # MNIST-shaped: 1x28x28 images, 10 classes (values do not matter for throughput).
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((6400, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, len(x)).astype(np.int64)
        return x, y, 64
    if task == "mlp":
        from paramserver.data import load_digits

        d = load_digits(seed=seed)
        return d.x_train, d.y_train, 64
    if task == "embedding":
        rng = np.random.default_rng(seed)
        x = rng.integers(0, VOCAB, size=(32_000, 10), dtype=np.int64)
        return x, (x[:, 0] % 2).astype(np.int64), 32
    raise ValueError(f"unknown task {task!r}")


VOCAB = 1_000_000


def task_sgd(task: str) -> tuple[float, float]:
    """(lr, momentum) of a task's SGD."""
    return (0.1, 0.0) if task == "embedding" else (LR, MOMENTUM)


def task_model(task: str) -> Any:
    import torch

    from paramserver.models.torch_models import MLP, BagOfWords, HogwildNet

    torch.manual_seed(0)
    if task == "embedding":
        return BagOfWords(VOCAB, 2, dim=32)
    return HogwildNet() if task == "cnn" else MLP(64, 10, hidden=64)


# -- the peers' worker processes (top level: they are spawned) -------------------------------


def _batches(x: np.ndarray, y: np.ndarray, batch: int, rank: int, n: int):
    lo, hi = len(x) * rank // n, len(x) * (rank + 1) // n
    while True:
        for s in range(lo, hi - batch + 1, batch):
            yield x[s : s + batch], y[s : s + batch]


def _torch_worker(rank: int, n: int, model: Any, task: str, threads: int, counts: Any, stop: Any) -> None:
    """One process of PyTorch's Hogwild recipe (or, with n = 1, plain training)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    x, y, batch = task_data(task, 0)
    lr, momentum = task_sgd(task)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for xb, yb in _batches(x, y, batch, rank, n):
        if stop.value:
            break
        opt.zero_grad()
        F.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
        opt.step()
        counts[rank] += len(xb)


class ParamHolder:
    """Lives in the Manager's process: every pull and push is a pickled round trip."""

    def __init__(self, flat: np.ndarray):
        self.flat = flat
        self.buf = np.zeros_like(flat)

    def pull(self) -> np.ndarray:
        return self.flat

    def push(self, grad: np.ndarray, lr: float) -> None:
        # SGD with momentum, applied by the holder (the Manager serialises calls).
        self.buf *= MOMENTUM
        self.buf += grad
        self.flat -= lr * self.buf


class _Manager(BaseManager):
    pass


_Manager.register("ParamHolder", ParamHolder)


def _manager_worker(rank: int, n: int, holder: Any, task: str, threads: int, counts: Any, stop: Any) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.set_num_threads(threads)
    model = task_model(task)
    params = list(model.parameters())
    x, y, batch = task_data(task, 0)
    for xb, yb in _batches(x, y, batch, rank, n):
        if stop.value:
            break
        with torch.no_grad():
            vector_to_parameters(torch.from_numpy(holder.pull()), params)
        model.zero_grad()
        F.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
        holder.push(parameters_to_vector([p.grad for p in params]).numpy(), LR)
        counts[rank] += len(xb)


# -- the measuring harness ---------------------------------------------------------------


def _window(
    read: Callable[[], np.ndarray], alive: Callable[[], None], warmup: float, seconds: float
) -> float:
    """Wait until every process has done its warm-up, then samples/s over ``seconds``."""
    deadline = time.monotonic() + 120
    while np.any(read() < warmup):
        alive()
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not finish their warm-up within 120 s")
        time.sleep(0.01)
    s0, t0 = read().sum(), time.perf_counter()
    time.sleep(seconds)
    s1, t1 = read().sum(), time.perf_counter()
    alive()
    return float((s1 - s0) / (t1 - t0))


def _run_processes(target: Callable[..., None], n: int, args: tuple, batch: int, seconds: float) -> float:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    counts = ctx.RawArray("d", n)  # one writer per slot: no lock
    stop = ctx.RawValue("i", 0)
    procs = [ctx.Process(target=target, args=(r, n, *args, counts, stop), daemon=True) for r in range(n)]
    for p in procs:
        p.start()

    def alive() -> None:
        for p in procs:
            if p.exitcode not in (None, 0):
                raise RuntimeError(f"a benchmark process died with exit code {p.exitcode}")

    try:
        return _window(lambda: np.frombuffer(counts, np.float64).copy(), alive, WARMUP_STEPS * batch, seconds)
    finally:
        stop.value = 1
        for p in procs:
            p.join(JOIN_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join(5)


def measure_single(task: str, threads: int, seconds: float) -> float:
    _, _, batch = task_data(task, 0)
    return _run_processes(_torch_worker, 1, (task_model(task), task, threads), batch, seconds)


def measure_torch_hogwild(task: str, n: int, seconds: float) -> float:
    model = task_model(task)
    model.share_memory()
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    _, _, batch = task_data(task, 0)
    return _run_processes(_torch_worker, n, (model, task, threads), batch, seconds)


def measure_manager(task: str, n: int, seconds: float) -> float:
    from torch.nn.utils import parameters_to_vector

    threads = max(1, len(os.sched_getaffinity(0)) // n)
    flat = parameters_to_vector(task_model(task).parameters()).detach().numpy().copy()
    _, _, batch = task_data(task, 0)
    with _Manager(ctx=mp.get_context("spawn")) as manager:
        holder = manager.ParamHolder(flat)
        return _run_processes(_manager_worker, n, (holder, task, threads), batch, seconds)


def measure_paramserver(task: str, n: int, policy: str, seconds: float) -> float:
    """Samples/s of a server under its own watch loop (``run``: supervision, the divergence
    scan, checkpoints off), as ``ps.train`` runs it; the window is read from a thread."""
    import threading

    import paramserver as ps
    from paramserver.api import model_spec
    from paramserver.server import ParameterServer

    x, y, batch = task_data(task, 0)
    # The held-out split is not used here; keep it tiny.
    data = ps.Dataset(x, y, x[:1], y[:1], 10, task)
    lr, momentum = task_sgd(task)
    cfg = ps.TrainConfig(
        workers=n, policy=policy, lr=lr, momentum=momentum, shared_state=False, batch_size=batch,
        epochs=10**6, out_dir="", progress=False,
    )  # fmt: skip
    spec, layout, init = model_spec(task_model(task), None, 0)
    box: dict[str, Any] = {}

    def window(server: Any) -> None:
        try:
            box["samples_per_s"] = _window(
                lambda: server.store.counters.column("samples").copy(),
                lambda: None,  # a worker that dies is the watch loop's business
                WARMUP_STEPS * batch,
                seconds,
            )
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = e

    def done(_figures: dict[str, Any]) -> bool:
        return bool(box)  # the run stops at the poll after the window closed

    with ParameterServer(spec, layout, init, data, cfg, callback=done) as server:
        # No view of the segment may outlive the block (it is closed on exit).
        reader = threading.Thread(target=window, args=(server,), daemon=True)
        reader.start()
        server.run()
        reader.join(JOIN_TIMEOUT)
    if "error" in box:
        raise box["error"]
    if "samples_per_s" not in box:
        raise RuntimeError("the run ended before its measuring window did")
    return float(box["samples_per_s"])


# -- the suite -----------------------------------------------------------------------------


def measure(task: str, contender: str, n: int, seconds: float) -> float:
    """Samples/s of one contender with ``n`` workers (threads for ``single``)."""
    if contender == "single":
        return measure_single(task, n, seconds)
    if contender == "torch-hogwild":
        return measure_torch_hogwild(task, n, seconds)
    if contender == "manager":
        return measure_manager(task, n, seconds)
    return measure_paramserver(task, n, contender.removeprefix("paramserver-"), seconds)


def run(cfg: BenchConfig, report: Report) -> None:
    cores = len(os.sched_getaffinity(0))
    counts = [1, 2] if cfg.quick and not cfg.workers else cfg.worker_counts
    tasks = cfg.task_list
    policies = ("po3", "striped") if cfg.quick else POLICIES
    for task in tasks:
        # The MLP runs the main contenders only, to keep the full suite within its time.
        contenders = ["torch-hogwild", "manager"] + [f"paramserver-{p}" for p in policies]
        if task == "mlp":
            contenders = ["torch-hogwild", "paramserver-po3"]
        if task == "embedding":  # a Manager round trip of a 32M-parameter table: hopeless
            contenders = ["torch-hogwild", "paramserver-po3", "paramserver-striped"]
        for rep in range(cfg.n_repeats):
            # Interleaved: every contender once per repeat, so drifts hit all alike.
            plan = [("single", 1, t) for t in range(1, cores + 1)]
            plan += [(c, n, max(1, cores // n)) for n in counts for c in contenders]
            for contender, n, threads in plan:
                sps = measure(task, contender, threads if contender == "single" else n, cfg.run_seconds)
                row = {"task": task, "contender": contender, "workers": n, "threads": threads}
                report.add("throughput", {**row, "repeat": rep, "samples_per_s": sps})
        _summarise(report, task, counts, contenders, cores, cfg.n_repeats)


def _summarise(
    report: Report, task: str, counts: list[int], contenders: list[str], cores: int, repeats: int
) -> None:
    rows = [r for r in report.rows["throughput"] if r["task"] == task]
    med, single, best_t = throughput_medians(rows, cores)
    best = single[best_t]
    header = ["workers", "linear", *contenders, "ps po3 / best single", "ps po3 / torch-hogwild"]
    table = []
    for n in counts:
        values = [med(c, n) for c in contenders]
        po3 = med("paramserver-po3", n)
        table.append([n, best * n, *values, po3 / best, po3 / med("torch-hogwild", n)])
    report.note(
        "throughput",
        f"{task}: best single process {best:,.0f} samples/s with {best_t} thread(s) "
        f"(by thread count: {', '.join(f'{t}: {v:,.0f}' for t, v in single.items())}); "
        f"table in samples/s, medians of {repeats} repeat(s)",
    )
    report.table("throughput", header, table)
    if task == "embedding":
        one = med("paramserver-po3", 1) / best
        report.note("throughput", f"target (embedding) po3 1 worker >= 0.9x the plain process: "
                    f"{one:.2f}x, {'met' if one >= 0.9 else 'MISSED'}")  # fmt: skip
        if 2 in counts:
            two, vs = med("paramserver-po3", 2) / best, med("paramserver-po3", 2) / med("torch-hogwild", 2)
            report.note("throughput", f"target (embedding) po3 2 workers >= 1.8x the plain process: "
                        f"{two:.2f}x, {'met' if two >= 1.8 else 'MISSED'}; >= 1.0x the recipe at 2: "
                        f"{vs:.2f}x, {'met' if vs >= 1.0 else 'MISSED'}")  # fmt: skip
    if task == "cnn" and 2 in counts:
        speedup = med("paramserver-po3", 2) / best
        report.note("throughput", scaling_ceiling(single, best, med("paramserver-po3", 2), 2, cores))
        vs_recipe = med("paramserver-po3", 2) / med("torch-hogwild", 2)
        report.note("throughput", f"target po3 2 workers >= 1.8x best single process (CNN): "
                    f"{speedup:.2f}x, {'met' if speedup >= 1.8 else 'MISSED'}")  # fmt: skip
        report.note("throughput", f"target po3 2 workers >= 1.0x PyTorch's Hogwild recipe (CNN): "
                    f"{vs_recipe:.2f}x, {'met' if vs_recipe >= 1.0 else 'MISSED'}")  # fmt: skip
    _plot(report, task, counts, contenders, med, best)


def _plot(report: Report, task: str, counts: list[int], contenders: list[str], med: Any, best: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(counts, [best * n for n in counts], "k--", label="linear (best single x N)")
    for c in contenders:
        ax.plot(counts, [med(c, n) for n in counts], marker="o", label=c)
    ax.set_xlabel("workers")
    ax.set_ylabel("samples/s")
    ax.set_xticks(counts)
    ax.set_title(f"throughput, {task}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report.plot_path("throughput", task), dpi=100)
    plt.close(fig)
