"""Suite "memory": what N workers cost in memory, paramserver against PyTorch's Hogwild recipe.

    python -m paramserver.benchmarks --suites memory [--quick] [--workers 1,2,4]

For N workers it reads PSS and USS (psutil ``memory_full_info``) of the server and
of each worker while they train a model of over 10M float32 parameters, for

* **paramserver**: a ``ParameterServer`` (parameters and optimizer state in one
  shared segment, each worker with its own flat gradient and scratch rows);
* **torch-hogwild**: PyTorch's own recipe (``examples/mnist_hogwild``):
  ``model.share_memory()``, then N ``torch.multiprocessing`` spawn processes, each
  with its own ``torch.optim.SGD`` (momentum buffers per process) running steps on
  the shared model.

PSS divides each shared page among the processes that map it, so the sum of PSS
over the processes is the memory the run costs. Every worker also carries its
Python + PyTorch import footprint (hundreds of MiB), which has nothing to do with
the parameters. To separate it, every run is repeated with a tiny model (same
code, same N): ``parameter part(N) = total PSS(big model, N) - total PSS(tiny, N)``,
and the per-worker parameter memory is ``(parameter part(N) - parameter part(1)) /
(N - 1)``, reported as a fraction of the parameter bytes.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.machine import usable_cores
from paramserver.optim import UPDATE_BLOCK, make_rule
from paramserver.store import PREFIX, SHM_DIR

from .common import BenchConfig, Report

SUITE = "memory"
SYSTEMS = ("paramserver", "torch-hogwild")
IN_FEATURES = 784
CLASSES = 10
BIG = {"hidden": 2048, "layers": 3}
"""MLP(784, 10, hidden=2048, layers=3): over 10M parameters (counted and checked at run time)."""
TINY = {"hidden": 8, "layers": 1}
"""The same code with a model of a few thousand parameters: the import footprint."""
MIN_PARAMS = 10_000_000
SAMPLES = 1024
BATCH = 32
LR = 0.01
MOMENTUM = 0.9
WARM_STEPS = 3
"""Steps every worker must have made before memory is read (its buffers exist by then)."""
SNAPSHOTS = 3
SNAPSHOT_GAP = 0.1
START_TIMEOUT = 180.0
JOIN_TIMEOUT = 10.0
TARGET = 0.05
"""The issue's target: per-worker parameter memory at most 5% of the parameter bytes."""
MiB = 2**20


def run(cfg: BenchConfig, report: Report) -> None:
    default = [1, 2] if cfg.quick else [1, 2, 4]
    counts = sorted(set(cfg.worker_counts) | {1}) if cfg.workers else default
    measure(cfg, report, counts=counts)


def measure(
    cfg: BenchConfig,
    report: Report,
    *,
    counts: list[int],
    big: dict[str, int] = BIG,
    min_params: int = MIN_PARAMS,
) -> None:
    """The whole suite for worker ``counts`` (1 included: it is the baseline)."""
    import torch

    from paramserver.api import model_spec
    from paramserver.data import make_dataset
    from paramserver.models.torch_models import MLP

    assert 1 in counts, "the 1-worker run is the baseline"
    rng = np.random.default_rng(cfg.seed)
    x = rng.random((SAMPLES, IN_FEATURES), dtype=np.float32)
    data = make_dataset(x, rng.integers(0, CLASSES, SAMPLES), classes=CLASSES, seed=cfg.seed)
    models: dict[str, Any] = {}
    for size, kw in (("big", big), ("tiny", TINY)):
        torch.manual_seed(cfg.seed)
        models[size] = MLP(IN_FEATURES, CLASSES, **kw)
    n_params = sum(p.numel() for p in models["big"].parameters())
    if n_params < min_params:
        raise ValueError(f"the big model has {n_params} parameters, the suite needs at least {min_params}")
    param_bytes = n_params * 4  # float32

    # Everything the server side holds is built once, before any run, so that this
    # process (the server in both systems) holds the same objects in every run.
    specs = {size: model_spec(m, None, cfg.seed) for size, m in models.items()}
    shared = {size: MLP(IN_FEATURES, CLASSES, **kw) for size, kw in (("big", big), ("tiny", TINY))}
    for size in shared:
        shared[size].load_state_dict(models[size].state_dict())
        shared[size].share_memory()
    tx = torch.from_numpy(data.x_train).share_memory_()
    ty = torch.from_numpy(data.y_train).share_memory_()
    runs: dict[tuple[str, str, int], Snapshot] = {}
    try:
        for n in counts:
            for size in ("big", "tiny"):
                snap = _paramserver_run(specs[size], data, n, cfg.seed)
                runs["paramserver", size, n] = snap
                _add_rows(report, "paramserver", size, n, snap)
                snap = _torch_run(shared[size], tx, ty, n, cfg.seed)
                runs["torch-hogwild", size, n] = snap
                _add_rows(report, "torch-hogwild", size, n, snap)
    finally:
        del shared, tx, ty  # the shared storages go with the last reference
        gc.collect()
    flat_bytes = specs["big"][1].nbytes
    scratch_slots = make_rule("sgd", momentum=MOMENTUM).scratch_slots  # the rule the workers run
    _summarize(
        report, runs, counts, n_params, param_bytes, flat_bytes, len(specs["big"][0].payload), scratch_slots
    )
    _plot(report, runs, counts, param_bytes)


# -- measuring processes ---------------------------------------------------------------


@dataclass
class ProcMem:
    role: str
    pid: int
    pss: int
    uss: int
    rss: int
    shm_pss: int
    """PSS of this process's mappings of the system's shared memory (paramserver's segments,
    or the storages PyTorch shared), read once per run."""


@dataclass
class Snapshot:
    procs: list[ProcMem]
    totals: list[int]
    """Total PSS of every snapshot taken (the reported one is the largest)."""
    seconds: float
    """From start to the end of the measurement."""

    @property
    def total_pss(self) -> int:
        return sum(p.pss for p in self.procs)

    @property
    def total_uss(self) -> int:
        return sum(p.uss for p in self.procs)

    @property
    def workers(self) -> list[ProcMem]:
        return [p for p in self.procs if p.role != "server"]

    @property
    def server(self) -> ProcMem:
        return next(p for p in self.procs if p.role == "server")


def _read(role: str, pid: int) -> ProcMem:
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return ProcMem(role, pid, info.pss, info.uss, info.rss, 0)


def _shm_pss(pid: int, prefix: str) -> int:
    """PSS of the process's mappings of this system's shared-memory files (``prefix``...)."""
    import psutil

    return sum(m.pss for m in psutil.Process(pid).memory_maps(grouped=True) if m.path.startswith(prefix))


def _snapshot(pids: dict[str, int], shm_prefix: str, t0: float) -> Snapshot:
    """A few readings of every process while they train; keeps the largest total.

    A worker's memory moves within a step (PyTorch frees and reallocates gradients
    that ``zero_grad()`` set to None), so the largest of a few readings is reported.
    """
    readings = []
    for i in range(SNAPSHOTS):
        if i:
            time.sleep(SNAPSHOT_GAP)
        readings.append([_read(role, pid) for role, pid in pids.items()])
    totals = [sum(p.pss for p in r) for r in readings]
    best = readings[int(np.argmax(totals))]
    for p in best:  # the shared mappings do not move between readings: read them once
        p.shm_pss = _shm_pss(p.pid, shm_prefix)
    return Snapshot(best, totals, time.perf_counter() - t0)


def _wait_running(system: str, steps: Callable[[], np.ndarray], procs: list[Any]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not (steps() >= WARM_STEPS).all():
        for rank, p in enumerate(procs):
            if p.exitcode is not None:
                raise RuntimeError(f"{system} worker {rank} exited with code {p.exitcode} before training")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{system} workers made no {WARM_STEPS} steps in {START_TIMEOUT:.0f} s")
        time.sleep(0.05)


# -- paramserver -------------------------------------------------------------------------


def _paramserver_run(spec_layout_init: tuple[Any, Any, np.ndarray], data: Any, n: int, seed: int) -> Snapshot:
    from paramserver.config import TrainConfig
    from paramserver.server import ParameterServer

    spec, layout, init = spec_layout_init
    cfg = TrainConfig(
        workers=n, epochs=10**6, batch_size=BATCH, lr=LR, momentum=MOMENTUM,
        seed=seed, out_dir="", progress=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    with ParameterServer(spec, layout, init, data, cfg) as server:

        def steps() -> np.ndarray:
            # every step counts, finite or not (a non-finite one is counted apart)
            rows = server.store.counters
            return rows.column("steps") + rows.column("nonfinite")

        _wait_running("paramserver", steps, server.processes)
        pids = {"server": os.getpid()} | {f"worker {i}": p.pid for i, p in enumerate(server.processes)}
        snap = _snapshot(pids, f"{SHM_DIR}/{PREFIX}", t0)
        del steps
    return snap


# -- PyTorch's Hogwild recipe ------------------------------------------------------------------


def torch_hogwild_worker(
    rank: int, workers: int, model: Any, x: Any, y: Any, threads: int, seed: int, steps: Any, stop: Any
) -> None:
    """One process of PyTorch's mnist_hogwild recipe: its own optimizer on the shared model."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed + rank)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    lo, hi = len(x) * rank // workers, len(x) * (rank + 1) // workers
    while not stop.is_set():
        for start in range(lo, hi, BATCH):
            if stop.is_set():
                return
            opt.zero_grad()
            F.cross_entropy(model(x[start : start + BATCH]), y[start : start + BATCH]).backward()
            opt.step()
            steps[rank] += 1


def _torch_run(model: Any, x: Any, y: Any, n: int, seed: int) -> Snapshot:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    stop = ctx.Event()
    steps = ctx.Array("l", n, lock=False)  # one slot per worker, each written by its worker only
    threads = max(1, len(usable_cores()) // n)
    procs = []
    t0 = time.perf_counter()
    try:
        for rank in range(n):
            p = ctx.Process(
                target=torch_hogwild_worker,
                args=(rank, n, model, x, y, threads, seed, steps, stop),
                name=f"torch-hogwild-{rank}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        _wait_running("torch-hogwild", lambda: np.frombuffer(steps, np.int64), procs)
        pids = {"server": os.getpid()} | {f"worker {i}": p.pid for i, p in enumerate(procs)}
        return _snapshot(pids, f"{SHM_DIR}/torch_", t0)  # torch's file_descriptor strategy
    finally:
        stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
            p.close()


# -- report ------------------------------------------------------------------------------------


def _add_rows(report: Report, system: str, size: str, n: int, snap: Snapshot) -> None:
    for p in snap.procs:
        report.add(
            SUITE,
            {"system": system, "model": size, "workers": n, "process": p.role, "pid": p.pid,
             "pss_mib": p.pss / MiB, "uss_mib": p.uss / MiB, "rss_mib": p.rss / MiB,
             "shm_pss_mib": p.shm_pss / MiB},
        )  # fmt: skip
    report.add(
        SUITE,
        {"system": system, "model": size, "workers": n, "process": "total",
         "pss_mib": snap.total_pss / MiB, "uss_mib": snap.total_uss / MiB,
         "shm_pss_mib": sum(p.shm_pss for p in snap.procs) / MiB,
         "snapshot_totals_mib": [round(t / MiB, 1) for t in snap.totals], "run_seconds": snap.seconds},
    )  # fmt: skip


def _summarize(
    report: Report,
    runs: dict[tuple[str, str, int], Snapshot],
    counts: list[int],
    n_params: int,
    param_bytes: int,
    flat_bytes: int,
    payload_bytes: int,
    scratch_slots: int,
) -> None:
    rows = []
    for system in SYSTEMS:
        for n in counts:
            b, t = runs[system, "big", n], runs[system, "tiny", n]
            rows.append([
                system, n, b.total_pss / MiB, t.total_pss / MiB, (b.total_pss - t.total_pss) / MiB,
                b.server.pss / MiB, b.server.uss / MiB,
                float(np.mean([w.pss for w in b.workers])) / MiB,
                float(np.mean([w.uss for w in b.workers])) / MiB,
                float(np.mean([w.uss for w in t.workers])) / MiB,
                sum(p.shm_pss for p in b.procs) / MiB,
            ])  # fmt: skip
    report.table(
        SUITE,
        ["system", "N", "total PSS MiB", "tiny-model total PSS MiB", "parameter part MiB",
         "server PSS", "server USS", "worker PSS (mean)", "worker USS (mean)", "tiny worker USS",
         "shared memory PSS (sum)"],
        rows,
    )  # fmt: skip
    growth_rows = []
    figures: dict[str, list[tuple[int, float, float]]] = {s: [] for s in SYSTEMS}
    for system in SYSTEMS:
        part1 = runs[system, "big", 1].total_pss - runs[system, "tiny", 1].total_pss
        for n in counts:
            if n == 1:
                continue
            b, t = runs[system, "big", n], runs[system, "tiny", n]
            raw = (b.total_pss - runs[system, "big", 1].total_pss) / (n - 1)
            per_worker = ((b.total_pss - t.total_pss) - part1) / (n - 1)
            private = float(np.mean([w.uss for w in b.workers]) - np.mean([w.uss for w in t.workers]))
            figures[system].append((n, per_worker, private))
            growth_rows.append([
                system, n, raw / MiB, (raw - per_worker) / MiB, per_worker / MiB,
                per_worker / param_bytes, private / MiB, private / param_bytes,
            ])  # fmt: skip
            report.add(
                SUITE,
                {"system": system, "workers": n, "process": "growth", "raw_growth_per_worker_mib": raw / MiB,
                 "import_footprint_per_worker_mib": (raw - per_worker) / MiB,
                 "param_memory_per_worker_mib": per_worker / MiB,
                 "param_memory_fraction": per_worker / param_bytes,
                 "worker_uss_over_tiny_mib": private / MiB, "param_bytes": param_bytes},
            )  # fmt: skip
    report.table(
        SUITE,
        ["system", "N", "total PSS growth per added worker MiB", "of which import footprint (tiny runs)",
         "per-worker parameter memory MiB", "of the parameter bytes", "worker USS over tiny worker MiB",
         "of the parameter bytes"],
        growth_rows,
    )  # fmt: skip
    report.note(
        SUITE,
        f"model: MLP({IN_FEATURES}, {CLASSES}, hidden={BIG['hidden']}, layers={BIG['layers']}) with "
        f"{n_params:,} float32 parameters = {param_bytes / MiB:.1f} MiB (flat vector with padding "
        f"{flat_bytes / MiB:.1f} MiB; SGD momentum {MOMENTUM}: one state row of the same size); tiny "
        f"model for the import footprint: hidden={TINY['hidden']}, layers={TINY['layers']}. Memory is read "
        f"after every worker made {WARM_STEPS} steps, {SNAPSHOTS} readings {SNAPSHOT_GAP} s apart, the "
        "largest total kept. The server is this benchmark process: it holds both systems' models for "
        "the whole suite (the same objects in every run), so they cancel out of the differences.",
    )
    report.note(
        SUITE,
        "how the parameter part is separated: every run is repeated with the tiny model (same code, same "
        "N); total PSS(big) - total PSS(tiny) is what the parameters cost at that N, and its growth from "
        "the 1-worker run, per added worker, is the per-worker parameter memory. The worker USS over a "
        "tiny-model worker's USS is the same figure seen from one worker (its private memory only).",
    )
    for system in SYSTEMS:
        if not figures[system]:
            continue
        shm1 = sum(p.shm_pss for p in runs[system, "big", 1].procs)
        shm_growth = [
            (n, (sum(p.shm_pss for p in runs[system, "big", n].procs) - shm1) / (n - 1))
            for n, _pw, _pr in figures[system]
        ]
        worst = max(g for _n, g in shm_growth)
        verdict = "MET" if worst <= TARGET * param_bytes else "MISSED"
        label = "target" if system == "paramserver" else "peer (same target, for comparison)"
        growth = "; ".join(f"N={n}: {g / MiB:+.2f} MiB per added worker" for n, g in shm_growth)
        report.note(
            SUITE,
            f"{label} {system}: parameter memory per added worker at most {TARGET:.0%} of the parameter "
            f"bytes ({param_bytes / MiB:.1f} MiB), judged on the memory that holds the parameters (shared "
            f"memory, PSS summed over all processes): {verdict}; {growth}",
        )
        each = "; ".join(
            f"N={n}: {pw / MiB:.1f} MiB per added worker = {pw / param_bytes:.0%} of the parameter bytes "
            f"(worker USS over a tiny-model worker: {pr / MiB:.1f} MiB = {pr / param_bytes:.0%})"
            for n, pw, pr in figures[system]
        )
        report.note(
            SUITE,
            f"{system}, all memory that grows with the model, per added worker (not the target's figure: "
            "it includes each worker's own gradient buffer, 1x the parameter bytes in both systems, and "
            f"autograd's temporaries): {each}",
        )
    shm = {s: [sum(p.shm_pss for p in runs[s, "big", n].procs) / MiB for n in counts] for s in SYSTEMS}
    report.note(
        SUITE,
        "shared memory, PSS summed over the processes (paramserver: its segments, i.e. parameters, "
        "momentum row, training data; torch-hogwild: the storages PyTorch shared, i.e. model and data): "
        + "; ".join(
            f"{s} "
            + ", ".join(f"{v:.1f}" for v in shm[s])
            + f" MiB (changes by {max(shm[s]) - shm[s][0]:+.1f} "
            f"MiB from 1 to {counts[-1]} workers)"
            for s in SYSTEMS
        )
        + f" for N = {', '.join(map(str, counts))}. The growth is each worker's private memory.",
    )
    report.note(
        SUITE,
        f"what a worker holds, by the code: paramserver: a flat gradient ({flat_bytes / MiB:.1f} MiB), "
        f"{scratch_slots} scratch rows of one update block ({UPDATE_BLOCK} elements each) and nothing of the "
        f"pickled model it was sent ({payload_bytes / MiB:.1f} MiB, read once from a file; the parameters "
        "it unpickles are replaced by views of the segment and freed); torch-hogwild: its "
        "gradients (allocated by backward, freed by zero_grad()) and its own momentum buffers "
        f"({param_bytes / MiB:.1f} MiB each).",
    )


def _plot(
    report: Report, runs: dict[tuple[str, str, int], Snapshot], counts: list[int], param_bytes: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    width = 0.38
    xs = np.arange(len(counts))
    for i, (system, color) in enumerate(zip(SYSTEMS, ("tab:blue", "tab:orange"), strict=True)):
        tiny = np.array([runs[system, "tiny", n].total_pss for n in counts]) / MiB
        big = np.array([runs[system, "big", n].total_pss for n in counts]) / MiB
        pos = xs + (i - 0.5) * width
        ax.bar(pos, tiny, width, color=color, alpha=0.35, label=f"{system}: tiny-model run (imports)")
        ax.bar(pos, big - tiny, width, bottom=tiny, color=color, label=f"{system}: parameter part")
        for x, v in zip(pos, big, strict=True):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(xs, [str(n) for n in counts])
    ax.set_xlabel("workers")
    ax.set_ylabel("total PSS, server + workers (MiB)")
    ax.set_title(f"memory for a {param_bytes / MiB:.0f} MiB model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report.plot_path(SUITE, "total-pss"), dpi=110)
    plt.close(fig)
