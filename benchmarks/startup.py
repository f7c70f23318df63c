"""Start-up: how long after ``ps.train`` is called its torch workers take their first step.

    python -m paramserver.benchmarks --suites startup [--quick] --out-dir benchmarks/results/startup

Two torch workers train the digits MLP for a few steps; the figure is the time from
the ``ps.train`` call to the first step of the *last* worker to begin (both are
training from then on), read from the workers' own ``started`` stamps. Each start
method is measured in a fresh interpreter of its own (``torch`` imported first, as a
user's script has it), run after run in that same interpreter:

- ``spawn`` (``start_method="spawn"``): every run spawns two interpreters that each
  import torch;
- ``forkserver`` (torch's default, ``start_method="auto"``): the first run in a process
  starts a forkserver that imports torch once (its "cold" figure); every later run forks
  its workers from it ("warm": a notebook's next cell, benchmark repeats, a test session).

The trained parameters of a one-worker run are compared between the two methods:
the same seed must give the same bytes. Target (the start-up issue): <= 0.8 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from .common import BenchConfig, Report, median

SUITE = "startup"
TARGET = 0.8
"""Seconds from the ps.train call to both torch workers' first step."""
STEPS = 20

_CHILD = r"""
import hashlib, json, sys, time
import numpy as np
import torch
import paramserver as ps
from paramserver.models.torch_models import MLP

method, runs = sys.argv[1], int(sys.argv[2])
data = ps.load_digits()
out = []
for i in range(runs):
    cfg = ps.TrainConfig(workers=2, steps={steps}, start_method=method, progress=False, seed=i)
    t = time.time()
    r = ps.train(MLP(64, 10), data, cfg)
    begun = [w["started"] for w in r.workers]
    out.append({{"run": i, "first": min(begun) - t, "last": max(begun) - t,
                 "server_startup": r.startup_seconds, "updates": r.updates}})
torch.manual_seed(0)
one = ps.train(MLP(64, 10), data, ps.TrainConfig(workers=1, steps={steps}, start_method=method,
                                           progress=False, seed=0))
digest = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for _, v in
                                 sorted(one.params.items()))).hexdigest()
print(json.dumps({{"runs": out, "one_worker_params": digest}}))
"""


def _measure(method: str, runs: int) -> dict[str, Any]:
    """``runs`` consecutive runs in one fresh interpreter, and a one-worker digest."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(steps=STEPS), method, str(runs)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the {method} start-up run failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(method: str, run: int) -> str:
    """spawn, or forkserver cold (the first run in its process) / warm (every later one)."""
    if method == "spawn":
        return method
    return "forkserver cold" if run == 0 else "forkserver warm"


def run(cfg: BenchConfig, report: Report) -> None:
    runs = 3 if cfg.quick else max(cfg.repeats, 5)
    found = {method: _measure(method, runs) for method in ("spawn", "forkserver")}
    for method, got in found.items():
        for r in got["runs"]:
            report.add(SUITE, {"method": _label(method, r["run"]), **r})
    rows = []
    for label in ("spawn", "forkserver cold", "forkserver warm"):
        last = [r["last"] for r in report.rows[SUITE] if r["method"] == label]
        mid = median(last)
        rows.append([label, mid, min(last), max(last), "met" if mid <= TARGET else "MISSED"])
    same = found["spawn"]["one_worker_params"] == found["forkserver"]["one_worker_params"]
    report.note(
        SUITE,
        f"2 torch workers, digits MLP, {STEPS} steps; seconds from the ps.train call to the last "
        f"worker's first step; {runs} runs per method in one fresh interpreter each "
        f"({len(os.sched_getaffinity(0))} cores); target {TARGET} s",
    )
    report.table(SUITE, ["start", "median s", "min s", "max s", "target"], rows)
    report.note(
        SUITE,
        "one worker, same seed: "
        + ("bit-identical parameters from spawn and forkserver" if same else "DIFFERENT parameters"),
    )
    if not same:
        raise AssertionError("spawned and forkserver workers trained different parameters")
