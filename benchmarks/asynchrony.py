"""Asynchrony controls under oversubscription: do attenuation and stale-first help?

    python -m paramserver.benchmarks --suites asynchrony [--quick]

Workers are oversubscribed (4x and 8x the usable cores) to provoke staleness:
each worker's update lands after many others changed the parameters it read.
For each setting (no control; ``exp`` attenuation; ``inverse`` attenuation;
stale-first priority) ``paramserver.train`` runs the NumPy MLP on the
synthetic task of the tta suite (40,000 samples, 100 features, 10 classes; it
levels off near 84%) under po3 with SGD and momentum 0.9 until the test
accuracy reaches the target; the
time to get there (from the first step), the updates it took and the measured
staleness are recorded. Medians over repeats; ratios against no control at the
same worker count, in the same run.
"""

from __future__ import annotations

import math
from typing import Any

from .common import BenchConfig, Report, median

TARGET = 0.82
BUDGET_SECONDS = 20.0
EVAL_EVERY = 0.02
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "exp": {"attenuation": "exp", "attenuation_base": 0.9},
    "inverse": {"attenuation": "inverse"},
    "stale-first": {"stale_first": -1},  # -1: threshold = the number of workers
}


def time_to_accuracy(workers: int, setting: str, seed: int, budget: float) -> dict[str, Any]:
    import paramserver as ps
    from paramserver.models.numpy_models import NumpyMLP

    from .tta import task_dataset

    data = task_dataset("synthetic", 0)  # one split for every run; repeats vary init and order
    options = dict(SETTINGS[setting])
    if options.get("stale_first") == -1:
        options["stale_first"] = workers
    cfg = ps.TrainConfig(
        workers=workers, policy="po3", lr=0.05, momentum=0.9, batch_size=32, epochs=10**6,
        max_seconds=budget, target_accuracy=TARGET, eval_every=EVAL_EVERY, seed=seed,
        out_dir="", progress=False, **options,
    )  # fmt: skip
    result = ps.train(NumpyMLP(100, 10, hidden=64), data, cfg)
    reached = result.stop_reason == "target_accuracy"
    return {
        "workers": workers, "setting": setting, "seed": seed, "reached": reached,
        "seconds": result.train_seconds if reached else math.nan,
        "updates": result.updates if reached else math.nan,
        "staleness_mean": result.staleness["mean"], "staleness_max": result.staleness["max"],
        "accuracy": result.test_accuracy, "startup_seconds": result.startup_seconds,
    }  # fmt: skip


def run(cfg: BenchConfig, report: Report) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    counts = [4 * cores] if cfg.quick else [4 * cores, 8 * cores]
    budget = BUDGET_SECONDS / 2 if cfg.quick else BUDGET_SECONDS
    for rep in range(cfg.n_repeats):
        for n in counts:
            for setting in SETTINGS:  # interleaved, so drifts of the machine hit every setting
                report.add("asynchrony", time_to_accuracy(n, setting, cfg.seed + rep, budget))
    rows = report.rows["asynchrony"]

    def med(n: int, setting: str, key: str) -> float:
        vals = [r[key] for r in rows if r["workers"] == n and r["setting"] == setting and r["reached"]]
        return median(vals) if vals else math.nan

    header = ["workers", "setting", "reached", "seconds", "vs none", "updates", "vs none", "staleness mean"]
    table = []
    for n in counts:
        for setting in SETTINGS:
            mine = [r for r in rows if r["workers"] == n and r["setting"] == setting]
            reached = sum(r["reached"] for r in mine)
            secs, ups = med(n, setting, "seconds"), med(n, setting, "updates")
            stale = median([r["staleness_mean"] for r in mine])
            table.append([
                n, setting, f"{reached}/{len(mine)}", secs, secs / med(n, "none", "seconds"),
                ups, ups / med(n, "none", "updates"), stale,
            ])  # fmt: skip
    report.note(
        "asynchrony",
        f"NumPy MLP on the synthetic task, po3, SGD lr 0.05 momentum 0.9, batch 32, {cores} cores: "
        f"seconds and "
        f"updates from the first step to {TARGET:.0%} test accuracy (medians of the runs that reached "
        f"it within {budget:.0f} s); 'vs none' is the ratio to no control at the same worker count",
    )
    report.table("asynchrony", header, table)
