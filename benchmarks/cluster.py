"""Two simulated nodes on Ray against one machine with the same cores: what do syncs cost?

    python -m paramserver.benchmarks --suites cluster [--quick]

Contenders, side by side in one run, each on the same number of cores:
``1x2``: ``paramserver.train`` with 2 workers (one machine, one segment);
``2x1/K``: ``paramserver.cluster.train_cluster`` with 2 simulated nodes of 1
worker each (each node its own segment and core), downpour syncs every K local
updates, K in 1, 10, 100. The tasks: the NumPy MLP (64 hidden) on digits (target
97% test accuracy), and on the tta suite's larger synthetic task (40,000 samples of
100 features, 10 classes of a linear teacher; target 80%); po3, SGD lr 0.05
momentum 0.9, batch 32. Per run: samples/s and test accuracy after a fixed
training time; in a second run, the seconds from the first step to the target
(evaluated every 0.05 s). For the cluster runs also the bytes each node sent
and received per second and the measured seconds per sync.

The bandwidth model: a sync moves 4P bytes up and 4P down (P float32
parameters), so a node making r updates/s with period K needs 8P r / K bytes/s.
"""

from __future__ import annotations

import math
from typing import Any

from .common import BenchConfig, Report, median

TASKS = {"digits": 0.97, "synthetic": 0.80}
"""Each task and the test accuracy whose time is measured."""
BUDGET_SECONDS = 20.0
EVAL_EVERY = 0.05
PERIODS = (1, 10, 100)
GOALS = {"samples_ratio": 0.9, "accuracy_points": 0.5}
"""2 nodes at period 10 against 1 node x 2 workers: samples/s ratio, accuracy gap (points)."""
LINKS_GBIT = (1, 10, 100)
MODEL_SIZES = {"this MLP": 0, "1M": 10**6, "ResNet-50": 25_600_000, "100M": 10**8}
"""Parameter counts for the bandwidth table (0: the benchmark's own model)."""


def _config(seed: int, **kw: Any) -> Any:
    import paramserver as ps

    base = dict(policy="po3", lr=0.05, momentum=0.9, batch_size=32, epochs=10**6, seed=seed,
                out_dir="", progress=False)  # fmt: skip
    return ps.TrainConfig(**{**base, **kw})


def task_data(task: str) -> Any:
    import paramserver as ps

    from .tta import task_dataset

    return ps.load_digits() if task == "digits" else task_dataset(task, 0)


def measure(contender: str, seed: int, *, seconds: float | None, task: str = "digits") -> dict[str, Any]:
    """One run: throughput for ``seconds`` of training, or (None) time to the task's target."""
    import paramserver as ps
    from paramserver.cluster import ClusterConfig, train_cluster
    from paramserver.models.numpy_models import NumpyMLP

    data = task_data(task)
    target = TASKS[task]
    model = NumpyMLP(data.input_shape[0], data.classes, hidden=64)
    budget = (
        {"max_seconds": seconds} if seconds else {"max_seconds": BUDGET_SECONDS, "target_accuracy": target}
    )
    budget["eval_every"] = EVAL_EVERY
    if contender == "1x2":
        result = ps.train(model, data, _config(seed, workers=2, **budget))
        nodes: list[dict[str, Any]] = []
    else:
        period = int(contender.split("/")[1])
        cc = ClusterConfig(cluster="local", nodes=2, sync_every=period)
        result = train_cluster(model, data, _config(seed, workers=1, **budget), cc)
        nodes = result.nodes
    row: dict[str, Any] = {"task": task, "contender": contender, "seed": seed,
                           "kind": "throughput" if seconds else "tta",
                           "samples_per_s": result.samples_per_second, "accuracy": result.test_accuracy,
                           "updates": result.updates, "train_seconds": result.train_seconds}  # fmt: skip
    if not seconds:
        reached = [e["t"] for e in result.evaluations if (e.get("test_accuracy") or 0) >= target]
        row["seconds_to_target"] = reached[0] if reached else math.nan
    if nodes:
        secs = max(result.train_seconds, 1e-9)
        row["bytes_per_s_per_node"] = median([(n["bytes_sent"] + n["bytes_received"]) / secs for n in nodes])
        row["syncs"] = sum(n["syncs"] for n in nodes)
        row["seconds_per_sync"] = sum(n["sync_seconds"] for n in nodes) / max(1, row["syncs"])
        row["staleness_mean"] = median([n["staleness_mean"] for n in nodes])
    return row


def _median(rows: list[dict[str, Any]], contender: str, kind: str, key: str) -> float:
    vals = [r[key] for r in rows if r["contender"] == contender and r["kind"] == kind and key in r]
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    return median(vals) if vals else math.nan


def _task_table(
    report: Report, rows: list[dict[str, Any]], task: str, target: float, seconds: float, cfg: BenchConfig
) -> None:
    """The contenders on one task, and the target at period 10."""

    def med(contender: str, kind: str, key: str) -> float:
        return _median(rows, contender, kind, key)

    contenders = ["1x2"] + [f"2x1/{k}" for k in PERIODS]
    base_sps = med("1x2", "throughput", "samples_per_s")
    # Accuracy after the fixed training time: a run stopped at the target has its nodes'
    # last deltas added after the check, so its final accuracy says little.
    base_acc = med("1x2", "throughput", "accuracy")
    header = ["contender", "samples/s", "vs 1x2", f"s to {target:.0%}", "accuracy", "bytes/s per node",
              "ms per sync"]  # fmt: skip
    table = []
    for c in contenders:
        sps = med(c, "throughput", "samples_per_s")
        table.append([c, sps, sps / base_sps, med(c, "tta", "seconds_to_target"),
                      med(c, "throughput", "accuracy"), med(c, "throughput", "bytes_per_s_per_node"),
                      1000 * med(c, "throughput", "seconds_per_sync")])  # fmt: skip
    report.table("cluster", header, table)
    ratio = med("2x1/10", "throughput", "samples_per_s") / base_sps
    gap = 100 * (base_acc - med("2x1/10", "throughput", "accuracy"))
    met = ratio >= GOALS["samples_ratio"] and gap <= GOALS["accuracy_points"]
    report.note(
        "cluster",
        f"{task}: NumPy MLP (64 hidden), po3, SGD lr 0.05 momentum 0.9, batch 32, 2 cores; samples/s "
        f"and test accuracy after {seconds:.0f} s of training; medians of {cfg.n_repeats} run(s). Target "
        f"(2 nodes at period 10 >= {GOALS['samples_ratio']}x the samples/s of 1x2, accuracy within "
        f"{GOALS['accuracy_points']} point): {'met' if met else 'missed'} ({ratio:.2f}x, {gap:+.2f} points)",
    )


def run(cfg: BenchConfig, report: Report) -> None:
    import numpy as np

    import paramserver as ps
    from paramserver.cluster import local_ray
    from paramserver.models.numpy_models import NumpyMLP

    contenders = ["1x2"] + [f"2x1/{k}" for k in PERIODS]
    seconds = 2.0 * cfg.run_seconds
    with local_ray(num_cpus=2):  # one instance for the suite: its start is not a contender's cost
        for rep in range(cfg.n_repeats):
            for task in TASKS:
                for contender in contenders:  # interleaved, so drifts of the machine hit every contender
                    report.add("cluster", measure(contender, cfg.seed + rep, seconds=seconds, task=task))
                    report.add("cluster", measure(contender, cfg.seed + rep, seconds=None, task=task))
    rows = report.rows["cluster"]
    for task, target in TASKS.items():
        _task_table(report, [r for r in rows if r["task"] == task], task, target, seconds, cfg)
    digits = [r for r in rows if r["task"] == "digits"]

    def med(contender: str, kind: str, key: str) -> float:
        return _median(digits, contender, kind, key)

    # The bandwidth model: wire time per sync, against which K steps of compute must last.
    here = ps.Layout.from_arrays(NumpyMLP(64, 10, hidden=64).init(np.random.default_rng(0))).num_params
    sync_ms = 1000 * med("2x1/10", "throughput", "seconds_per_sync")
    header = ["parameters", "MB per sync (up+down)"] + [f"wire ms at {g} GbE" for g in LINKS_GBIT]
    bw_rows = []
    for name, p in MODEL_SIZES.items():
        p = p or here
        per_sync = 8 * p  # 4P up, 4P down
        bw_rows.append(
            [f"{name}: {p:,}", per_sync / 1e6, *[1000 * per_sync * 8 / (g * 1e9) for g in LINKS_GBIT]]
        )
    report.table("cluster", header, bw_rows)
    report.note(
        "cluster",
        "bandwidth model: each sync moves 4P bytes up and 4P down; a node with step time s and period K "
        "keeps its link from being the bottleneck while K x s >= wire time + per-sync overhead (the sync "
        f"runs beside the workers, so it costs only when it cannot finish within K steps). Measured "
        f"per-sync time here (local Ray, {here:,} parameters, both nodes on one machine): {sync_ms:.2f} ms",
    )
