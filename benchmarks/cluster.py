"""Two simulated nodes on Ray against one machine with the same cores: what do syncs cost?

    python -m paramserver.benchmarks --suites cluster [--quick]

Contenders, side by side in one run, each on the same number of cores:
``1x2``: ``paramserver.train`` with 2 workers (one machine, one segment);
``2x1/K``: ``paramserver.cluster.train_cluster`` with 2 simulated nodes of 1
worker each (each node its own segment and core), downpour syncs every K local
updates, K in 1, 10, 100, with one shard per node (the default); ``2x1/10/1``: the
same at period 10 with a single shard (one Ray call per sync instead of two). The
tasks: the NumPy MLP (64 hidden) on digits (target 97% test accuracy), and on the tta
suite's larger synthetic task (40,000 samples of 100 features, 10 classes of a linear
teacher; target 80%), SGD lr 0.05; and the
PyTorch CNN of ``paramserver train --model cnn`` on digits (``digits-cnn``, target
97%; a step of about 0.8 ms against the MLP's 0.06-0.08 ms), SGD lr 0.01 (at 0.05, with
each node's own momentum, 2 nodes drove it to chance accuracy); po3, momentum 0.9, batch 32.
Per run: samples/s and test accuracy after a fixed training time; in a second
run, the seconds from the first step to the target (evaluated every 0.05 s). For
the cluster runs also the bytes each node sent and received per second and the
measured seconds per sync. Then, on digits, where the CPU goes: each contender
once more while the CPU time of this process and its descendants (workers, node
agents, shards, Ray's own processes) is sampled during the training, as shares of
the machine's cores; and Ray's own cost of one actor call.

The bandwidth model: a sync moves 4P bytes up and 4P down (P float32
parameters), so a node making r updates/s with period K needs 8P r / K bytes/s.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from paramserver.data import shard
from paramserver.machine import usable_cores
from paramserver.supervise import run_span

from .common import BenchConfig, Report, median


@dataclass(frozen=True)
class Task:
    data: str
    """``digits`` or the tta suite's ``synthetic``."""
    backend: str
    model: str
    """A name of ``paramserver.models.build_model`` (64 hidden units)."""
    lr: float
    target: float
    """The test accuracy whose time is measured."""

    @property
    def title(self) -> str:
        return f"{'NumPy' if self.backend == 'numpy' else self.backend} {self.model.upper()}"


TASKS = {
    "digits": Task("digits", "numpy", "mlp", 0.05, 0.97),
    "synthetic": Task("synthetic", "numpy", "mlp", 0.05, 0.80),
    "digits-cnn": Task("digits", "torch", "cnn", 0.01, 0.97),
}
BUDGET_SECONDS = 20.0
EVAL_EVERY = 0.05
PERIODS = (1, 10, 100)
CONTENDERS = ("1x2", *[f"2x1/{k}" for k in PERIODS], "2x1/10/1")
"""``2x1/K``: 2 nodes, period K, one shard per node (the default); ``2x1/K/S``: S shards.
A node makes one Ray call per shard per sync: one shard halves the calls."""
GOALS = {"samples_ratio": 0.9, "accuracy_points": 0.5}
"""2 nodes at period 10 against 1 node x 2 workers: samples/s ratio, accuracy gap (points)."""
LINKS_GBIT = (1, 10, 100)
MODEL_SIZES = {"this MLP": 0, "1M": 10**6, "ResNet-50": 25_600_000, "100M": 10**8}
"""Parameter counts for the bandwidth table (0: the benchmark's own model)."""
ROLES = ("workers", "node agents", "shards", "Ray's processes", "driver")
"""Where the CPU goes, by process (``cpu_shares``)."""
SAMPLE_SECONDS = 0.25


def _config(seed: int, **kw: Any) -> Any:
    import paramserver as ps

    base = dict(policy="po3", momentum=0.9, batch_size=32, epochs=10**6, seed=seed,
                out_dir="", progress=False)  # fmt: skip
    return ps.TrainConfig(**{**base, **kw})


def task_data(task: str) -> Any:
    from .tta import task_dataset

    return task_dataset(TASKS[task].data, 0)


def task_model(task: str, data: Any) -> Any:
    """The task's model, as the CLI builds it (``--backend``, ``--model``)."""
    from paramserver.models import build_model

    spec = TASKS[task]
    if spec.backend == "torch":
        import torch

        torch.manual_seed(0)
    return build_model(spec.backend, spec.model, data.input_shape, data.classes, hidden=64)


def measure(contender: str, seed: int, *, seconds: float | None, task: str = "digits") -> dict[str, Any]:
    """One run: throughput for ``seconds`` of training, or (None) time to the task's target."""
    import paramserver as ps
    from paramserver.cluster import ClusterConfig, train_cluster

    data = task_data(task)
    target = TASKS[task].target
    model = task_model(task, data)
    budget = (
        {"max_seconds": seconds} if seconds else {"max_seconds": BUDGET_SECONDS, "target_accuracy": target}
    )
    budget["eval_every"] = EVAL_EVERY
    budget["lr"] = TASKS[task].lr
    if contender == "1x2":
        result = ps.train(model, data, _config(seed, workers=2, **budget))
        nodes: list[dict[str, Any]] = []
    else:
        _, period, *shards = contender.split("/")
        cc = ClusterConfig(
            cluster="local", nodes=2, sync_every=int(period), shards=int(shards[0]) if shards else 0
        )
        result = train_cluster(model, data, _config(seed, workers=1, **budget), cc)
        nodes = result.nodes
        _wait_for_actors_to_exit()
    row: dict[str, Any] = {"task": task, "contender": contender, "seed": seed,
                           "kind": "throughput" if seconds else "tta",
                           "samples_per_s": result.samples_per_second, "accuracy": result.test_accuracy,
                           "updates": result.updates, "train_seconds": result.train_seconds,
                           "startup_seconds": result.startup_seconds,
                           "span": run_span(result.workers)}  # fmt: skip
    if not seconds:
        reached = [e["t"] for e in result.evaluations if (e.get("test_accuracy") or 0) >= target]
        row["seconds_to_target"] = reached[0] if reached else math.nan
    # Each node's samples over its own first-to-last step, summed: the rate while the nodes
    # run, without the seconds in which one node had started and the other not yet (each
    # node has its own start barrier; one machine's workers share one).
    row["node_samples_per_s"] = sum(n["samples_per_second"] for n in nodes) if nodes else row["samples_per_s"]
    if nodes:
        row["shards"] = result.cluster["shards"] or len(nodes)
        secs = max(result.train_seconds, 1e-9)
        row["bytes_per_s_per_node"] = median([(n["bytes_sent"] + n["bytes_received"]) / secs for n in nodes])
        row["syncs"] = sum(n["syncs"] for n in nodes)
        row["seconds_per_sync"] = sum(n["sync_seconds"] for n in nodes) / max(1, row["syncs"])
        row["staleness_mean"] = median([n["staleness_mean"] for n in nodes])
    return row


def _wait_for_actors_to_exit(timeout: float = 10.0) -> None:
    """Ray kills a run's agents and shards without waiting: their exit overlapped the next
    contender's run (1.7% of the cores in a 1x2 run after a cluster run, one-off check)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = []
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if _role(p.pid, " ".join(p.cmdline())) in ("node agents", "shards"):
                    left.append(p)
        if not left:
            return
        psutil.wait_procs(left, timeout=0.1)


def _role(pid: int, cmdline: str) -> str:
    """What a process of this run is (it is the driver or one of its descendants)."""
    if pid == os.getpid():
        return "driver"
    for mark, role in (("ray::_NodeAgent", "node agents"), ("ray::_Shard", "shards")):
        if mark in cmdline:
            return role
    if "multiprocessing" in cmdline:  # the workers (a forkserver or tracker sits idle)
        return "workers"
    return "Ray's processes"  # the local instance: GCS, raylet, its agents, idle Ray workers


def cpu_shares(contender: str, seed: int, seconds: float, task: str = "digits") -> dict[str, Any]:
    """One throughput run of ``task`` of ``contender`` while a thread samples the CPU time of
    this process and its descendants (the local Ray instance included): each role's share
    of the machine's cores (percent) between the samples just inside the run's training
    (its first step to its last), and CPU milliseconds per sync of the node agents and
    shards over that window."""
    import psutil

    me = psutil.Process()
    Key = tuple[int, float]  # pid and start time: a pid can be reused
    samples: list[tuple[float, dict[Key, tuple[str, float]]]] = []
    roles: dict[Key, str] = {}
    """Roles that cannot change, once read: a read of a command line can fail or come back
    empty while a process starts or ends (it is tried again at the next sample), and an
    idle Ray worker (``ray::IDLE``) may yet become an agent or a shard."""
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now, seen = time.time(), {}
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    key = (p.pid, p.create_time())
                    role = roles.get(key)
                    if role is None:
                        cmdline = " ".join(p.cmdline())
                        if not cmdline:
                            continue
                        role = _role(p.pid, cmdline)
                        if role != "Ray's processes":
                            roles[key] = role
                    t = p.cpu_times()
                    seen[key] = (role, t.user + t.system)
            samples.append((now, seen))
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        row = measure(contender, seed, seconds=seconds, task=task)
    finally:
        done.set()
        sampler.join(timeout=10)
    first, last = row["span"]  # the workers' first and last steps
    inside = [s for s in samples if first <= s[0] <= last]
    out: dict[str, Any] = {"task": task, "contender": contender, "syncs": row.get("syncs", 0),
                           "train_seconds": row["train_seconds"], "window_s": 0.0}  # fmt: skip
    out.update(dict.fromkeys(ROLES, math.nan))
    if len(inside) < 2:  # too short a run to say
        return out
    (t0, a), (t1, b) = inside[0], inside[-1]
    used = dict.fromkeys(ROLES, 0.0)
    for key, (role, cpu) in b.items():
        if key in a:
            used[role] += cpu - a[key][1]
        elif key[1] >= t0:  # started inside the window: all of its CPU
            used[role] += cpu
        else:  # missed by the first sample: from the first that saw it
            used[role] += cpu - next(seen[key][1] for _, seen in inside if key in seen)
    # A process that ended inside the window is left out (its last CPU reading is not
    # the end of it): a run's workers, agents and shards outlive its workers' last step.
    out["window_s"] = t1 - t0
    out.update({role: 100 * used[role] / ((t1 - t0) * len(usable_cores())) for role in ROLES})
    if out["syncs"]:  # the syncs in the window, at the run's average pace
        syncs = out["syncs"] * (t1 - t0) / row["train_seconds"]
        out["sync_cpu_ms"] = 1000 * (used["node agents"] + used["shards"]) / syncs
    return out


class _Echo:
    """An actor that does what a shard does per sync (add a payload, return its values)."""

    def __init__(self, size: int):
        import numpy as np

        self.values = np.zeros(size, np.float32)

    def pid(self) -> int:
        return os.getpid()

    def noop(self) -> None:
        return None

    def push_pull(self, node: int, payload: Any, updates: int) -> tuple[Any, int]:
        self.values += payload
        return self.values, 0


def ray_call_cost(size: int, calls: int = 1000) -> list[dict[str, Any]]:
    """Wall and CPU time of one Ray actor call here, the caller's and the actor's apart: a
    no-op, and a push and pull of ``size`` float32 (what a node sends one shard per sync)."""
    import numpy as np
    import psutil
    import ray

    actor = ray.remote(_Echo).options(num_cpus=0, enable_task_events=False).remote(size)  # as a shard
    try:
        proc = psutil.Process(ray.get(actor.pid.remote()))
        payload = np.ones(size, np.float32)
        out = []
        kinds = {"no-op": lambda: actor.noop.remote(),
                 f"push_pull of {size:,} float32": lambda: actor.push_pull.remote(0, payload, 1)}  # fmt: skip
        for name, call in kinds.items():
            for _ in range(calls // 10):  # warm-up
                ray.get(call())
            t, c, a = time.perf_counter(), time.process_time(), sum(proc.cpu_times()[:2])
            for _ in range(calls):
                ray.get(call())
            n = calls / 1e6  # microseconds per call
            out.append({"call": name, "wall_us": (time.perf_counter() - t) / n,
                        "caller_cpu_us": (time.process_time() - c) / n,
                        "actor_cpu_us": (sum(proc.cpu_times()[:2]) - a) / n})  # fmt: skip
        return out
    finally:
        ray.kill(actor)


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

    contenders = CONTENDERS
    base_sps = med("1x2", "throughput", "samples_per_s")
    # Accuracy after the fixed training time: a run stopped at the target has its nodes'
    # last deltas added after the check, so its final accuracy says little.
    base_acc = med("1x2", "throughput", "accuracy")
    header = [f"{task}: contender", "samples/s", "vs 1x2", "sum of nodes' samples/s", "vs 1x2",
              f"s to {target:.0%}", "accuracy", "bytes/s per node", "ms per sync"]  # fmt: skip
    table = []
    for c in contenders:
        sps, nodes_sps = med(c, "throughput", "samples_per_s"), med(c, "throughput", "node_samples_per_s")
        table.append([c, sps, sps / base_sps, nodes_sps, nodes_sps / base_sps,
                      med(c, "tta", "seconds_to_target"), med(c, "throughput", "accuracy"),
                      med(c, "throughput", "bytes_per_s_per_node"),
                      1000 * med(c, "throughput", "seconds_per_sync")])  # fmt: skip
    report.table("cluster", header, table)
    ratio = med("2x1/10", "throughput", "samples_per_s") / base_sps
    steady = med("2x1/10", "throughput", "node_samples_per_s") / base_sps
    gap = 100 * (base_acc - med("2x1/10", "throughput", "accuracy"))
    met = ratio >= GOALS["samples_ratio"] and gap <= GOALS["accuracy_points"]
    report.note(
        "cluster",
        f"{task}: {TASKS[task].title} (64 hidden), po3, SGD lr {TASKS[task].lr} momentum 0.9, batch 32, "
        f"2 cores; samples/s and test accuracy after {seconds:.0f} s of training; medians of "
        f"{cfg.n_repeats} run(s). Target "
        f"(2 nodes at period 10 >= {GOALS['samples_ratio']}x the samples/s of 1x2, accuracy within "
        f"{GOALS['accuracy_points']} point): {'met' if met else 'missed'} ({ratio:.2f}x, accuracy "
        f"{abs(gap):.2f} points {'below' if gap > 0 else 'above'} 1x2; "
        f"the sum of the nodes' own rates: {steady:.2f}x)",
    )


def run(cfg: BenchConfig, report: Report) -> None:
    import numpy as np

    import paramserver as ps
    from paramserver.cluster import local_ray
    from paramserver.models.numpy_models import NumpyMLP

    contenders = CONTENDERS
    seconds = 2.0 * cfg.run_seconds
    with local_ray(num_cpus=2):  # one instance for the suite: its start is not a contender's cost
        for rep in range(cfg.n_repeats):
            for task in TASKS:
                for contender in contenders:  # interleaved, so drifts of the machine hit every contender
                    report.add("cluster", measure(contender, cfg.seed + rep, seconds=seconds, task=task))
                    report.add("cluster", measure(contender, cfg.seed + rep, seconds=None, task=task))
        # Where the CPU goes on digits: one more run of each contender, its processes sampled.
        cpu_rows = [cpu_shares(c, cfg.seed, seconds) for c in contenders]
        # Ray's own cost per call, with nothing training: the floor of a sync's cost.
        here = ps.Layout.from_arrays(NumpyMLP(64, 10, hidden=64).init(np.random.default_rng(0))).num_params
        lo, hi = shard(here, 0, 2)
        calls = ray_call_cost(hi - lo)  # the first of 2 shards' slice
    rows = report.rows["cluster"]
    for task, spec in TASKS.items():
        _task_table(report, [r for r in rows if r["task"] == task], task, spec.target, seconds, cfg)
    digits = [r for r in rows if r["task"] == "digits"]

    for r in cpu_rows:
        report.add("cluster_cpu", r)
    report.table("cluster", ["contender (digits, % of all cores)", *ROLES],
                 [[r["contender"], *[r[k] for k in ROLES]] for r in cpu_rows])  # fmt: skip
    for r in calls:
        report.add("cluster_calls", r)
    report.table("cluster", ["Ray actor call (nothing training)", "wall us", "caller CPU us", "actor CPU us"],
                 [[r["call"], r["wall_us"], r["caller_cpu_us"], r["actor_cpu_us"]]
                  for r in calls])  # fmt: skip
    for r in cpu_rows:
        if "sync_cpu_ms" in r:
            report.note(
                "cluster",
                f"{r['contender']}: node agents and shards used {r['sync_cpu_ms']:.2f} ms of CPU per sync "
                f"({r['syncs']} syncs in {r['train_seconds']:.1f} s; CPU over the {r['window_s']:.1f} s "
                "sampled inside the training)",
            )

    def med(contender: str, kind: str, key: str) -> float:
        return _median(digits, contender, kind, key)

    # The bandwidth model: wire time per sync, against which K steps of compute must last.
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
