"""Sparse Hogwild!: the regime of the Hogwild! paper (Niu et al., 2011).

    python -m paramserver.benchmarks --suites sparse [--quick]

Logistic regression by SGD, one sample per step, on generated RCV1-like data
(50,000 features, about 0.15% of them non-zero per sample, tf-idf-like
positive values, labels from a sparse linear teacher with noise). The weights
live in a paramserver segment; the data in a second one (CSR arrays). Each
step reads and writes only the coordinates the sample touches:
``w[idx] -= lr * (sigmoid(w[idx] @ v) - y) * v``. Collisions between workers
are rare because samples share few features, which is why lock-free updates
(po3) lose almost nothing here.

Contenders: one process (the baseline), N workers lock-free (po3), N workers
under one update lock (po1). Each runs the same number of epochs over the data
(shared out among the workers); reported: wall time, speedup over one process,
and the final training loss, which must stay close to the single process's.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from paramserver.layout import Layout
from paramserver.store import ParamStore, Segment

from .common import BenchConfig, Report, median

FEATURES = 50_000
NNZ = 75
LR = 0.5
JOIN_TIMEOUT = 120.0


def make_data(samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """CSR arrays (indptr, indices, values) and labels of an RCV1-like problem."""
    rng = np.random.default_rng(seed)
    # Feature popularity follows a power law, as words do.
    cdf = np.cumsum(1.0 / np.arange(1, FEATURES + 1) ** 0.8)
    cdf /= cdf[-1]
    rows = [
        np.unique(np.searchsorted(cdf, rng.random(k))) for k in rng.poisson(NNZ, samples).clip(5, 4 * NNZ)
    ]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64)
    values = rng.exponential(1.0, indptr[-1]).astype(np.float32)
    norms = np.sqrt(np.add.reduceat(values * values, indptr[:-1]))
    values /= np.repeat(norms, np.diff(indptr)).astype(np.float32)  # unit rows, as tf-idf rows are
    teacher = np.where(rng.random(FEATURES) < 0.1, rng.standard_normal(FEATURES), 0.0).astype(np.float32)
    margin = np.add.reduceat(values * teacher[indices], indptr[:-1])
    y = (margin + 0.1 * rng.standard_normal(samples) > 0).astype(np.float32)
    return {"indptr": indptr, "indices": indices, "values": values, "y": y}


def log_loss(w: np.ndarray, d: dict[str, np.ndarray]) -> float:
    indptr, indices, values, y = d["indptr"], d["indices"], d["values"], d["y"]
    z = np.add.reduceat(values * w[indices], indptr[:-1]).astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _worker(rank: int, n: int, store: ParamStore, data: Segment, lock: Any, start: Any, epochs: int) -> None:
    start.wait(JOIN_TIMEOUT)
    _sgd(rank, n, store, data, lock, epochs)
    store.close()  # every view of the segments lived in _sgd's frame, gone now
    data.close()


def _sgd(rank: int, n: int, store: ParamStore, data: Segment, lock: Any, epochs: int) -> None:
    """SGD over this worker's shard, one sample per step, touching only its features."""
    w = store.params
    indptr, indices, values, y = data["indptr"], data["indices"], data["values"], data["y"]
    lo, hi = len(y) * rank // n, len(y) * (rank + 1) // n
    rng = np.random.default_rng(rank)
    row = store.counters.row(rank)
    row.started = time.time()
    for _ in range(epochs):
        for i in rng.permutation(np.arange(lo, hi)):
            a, b = indptr[i], indptr[i + 1]
            idx, v = indices[a:b], values[a:b]
            z = float(w[idx] @ v)
            g = np.float32(LR * (1.0 / (1.0 + math.exp(-z)) - y[i]))
            if lock is None:
                w[idx] -= g * v  # po3: lock-free; another worker may touch idx at once
            else:
                with lock:
                    w[idx] -= g * v
        row.samples += hi - lo
    row.finished = time.time()


def measure(data: dict[str, np.ndarray], n: int, locked: bool, epochs: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    layout = Layout.from_arrays({"w": np.zeros(FEATURES, np.float32)})
    with (
        ParamStore.create_for(layout, workers=n) as store,
        Segment.create(Layout.from_arrays(data), {"kind": "data"}) as seg,
    ):
        for k, v in data.items():
            seg[k][...] = v
        lock = ctx.Lock() if locked else None
        start = ctx.Barrier(n)
        procs = [ctx.Process(target=_worker, args=(r, n, store, seg, lock, start, epochs), daemon=True)
                 for r in range(n)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_TIMEOUT)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a sparse worker failed: exit codes {[p.exitcode for p in procs]}")
        c = store.counters
        seconds = float(c.column("finished").max() - c.column("started").min())
        loss = log_loss(store.params, data)
        del c
    return {"seconds": seconds, "loss": loss}


def run(cfg: BenchConfig, report: Report) -> None:
    samples = 20_000 if cfg.quick else 100_000
    epochs = 2 if cfg.quick else 5
    counts = [c for c in ([1, 2] if cfg.quick and not cfg.workers else cfg.worker_counts) if c > 1]
    t = time.perf_counter()
    data = make_data(samples, cfg.seed)
    density = data["indptr"][-1] / (samples * FEATURES)
    made = time.perf_counter() - t
    report.note("sparse", f"data: {samples} samples x {FEATURES} features, density {density:.3%}, "
                f"{epochs} epochs, one sample per step; generated in {made:.1f} s")  # fmt: skip
    report.note("sparse", f"initial loss {log_loss(np.zeros(FEATURES, np.float32), data):.4f}")
    for rep in range(cfg.n_repeats):
        plan = [(1, False)] + [(n, locked) for n in counts for locked in (False, True)]
        for n, locked in plan:
            fig = measure(data, n, locked, epochs)
            name = "single" if n == 1 else ("po1 (locked)" if locked else "po3 (lock-free)")
            report.add("sparse", {"contender": name, "workers": n, "repeat": rep, **fig,
                                  "samples_per_s": samples * epochs / fig["seconds"]})  # fmt: skip
    rows = report.rows["sparse"]

    def med(name: str, n: int, key: str) -> float:
        return median([r[key] for r in rows if r["contender"] == name and r["workers"] == n])

    base, base_loss = med("single", 1, "seconds"), med("single", 1, "loss")
    table = [[1, "single", base, 1.0, base_loss]]
    for n in counts:
        for name in ("po3 (lock-free)", "po1 (locked)"):
            table.append(
                [n, name, med(name, n, "seconds"), base / med(name, n, "seconds"), med(name, n, "loss")]
            )
    report.table("sparse", ["workers", "contender", "seconds", "speedup", "final loss"], table)
    cores = len(os.sched_getaffinity(0))
    report.note("sparse", f"{cores} usable cores: speedups beyond {cores} workers are not possible here")
    _plot(report, counts, med, base)


def _plot(report: Report, counts: list[int], med: Any, base: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [1, *counts]
    ax.plot(xs, xs, "k--", label="linear")
    for name in ("po3 (lock-free)", "po1 (locked)"):
        ax.plot(xs, [1.0] + [base / med(name, n, "seconds") for n in counts], marker="o", label=name)
    ax.set_xlabel("workers")
    ax.set_ylabel("speedup over one process")
    ax.set_xticks(xs)
    ax.set_title("sparse logistic regression (Hogwild! regime)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report.plot_path("sparse", "speedup"), dpi=100)
    plt.close(fig)
