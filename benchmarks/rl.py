"""Reinforcement learning: wall time and environment steps to solve CartPole-v1.

    python -m paramserver.benchmarks --suites rl [--quick]

For A3C with 1, 2 and 4 workers and DQN with 1 and 2 workers, ``train_rl``
runs until the mean return of the last 100 episodes (all workers together)
reaches the target (475, CartPole-v1's ``reward_threshold``), or a budget
runs out. Each algorithm also runs in a single process with ``torch.optim``
and no parameter server (:func:`single_process`: the same loops, networks,
environments and seeds). Seconds count from the first environment step;
start-up (spawning workers, importing torch) is reported apart. Medians over
the seeds; a run that misses the target counts as NaN and is reported.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

import numpy as np

from .common import BenchConfig, Report, median

ENV = "CartPole-v1"
BUDGET = {"a3c": 120.0, "dqn": 120.0}
QUICK_TARGET = 195.0
"""--quick: CartPole-v0's old threshold, reached in a few seconds, so the smoke run stays short."""
QUICK_BUDGET = 20.0


def single_process(cfg: Any, *, target: float, max_seconds: float, env: Any = ENV) -> dict[str, Any]:
    """The same algorithm in this process: ``torch.optim`` on an ordinary model.

    Same network and initial parameters (``torch.manual_seed(cfg.seed)``), same
    environments and seeds as worker 0 of a run, the very task a worker runs
    (:class:`~paramserver.workers.rl_worker.A3CTask`/``DQNTask``: its forward, and its
    backward with the same gradient clipping); the update is ``torch.optim.RMSprop``/
    ``Adam`` with the same hyperparameters. Stops at ``target`` (mean of the last
    ``cfg.window`` episodes), after ``max_seconds`` or after ``cfg.max_steps`` steps.
    """
    import torch

    from paramserver.layout import Layout
    from paramserver.models.rl_models import build
    from paramserver.rl import inspect_env
    from paramserver.workers.rl_worker import TASKS
    from paramserver.workers.worker import Context

    info = inspect_env(env, cfg.algo)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model_args = {
        "algo": cfg.algo,
        "obs_dim": info.obs_dim,
        "n_actions": info.n_actions,
        "hidden": cfg.hidden,
    }
    initial = build(**model_args)
    layout = Layout.from_torch(initial)
    params = layout.flatten({n: p.detach().numpy() for n, p in initial.named_parameters()})
    grad = np.zeros_like(params)
    recent: collections.deque[float] = collections.deque(maxlen=cfg.window)
    curve: list[tuple[float, float]] = []
    reached: list[float] = []
    t0 = time.time()
    episodes = 0

    def record(ret: float, length: int) -> None:
        nonlocal episodes
        episodes += 1
        recent.append(ret)
        curve.append((time.time() - t0, float(np.mean(recent))))
        if not reached and len(recent) == cfg.window and curve[-1][1] >= target:
            reached.append(curve[-1][0])

    task = TASKS[cfg.algo](cfg, env, model_args)
    task.record = record
    task.start(Context(0, 1, cfg, layout, params, grad, (0, 0), 0))
    model = task.model
    if cfg.optimizer == "rmsprop":
        opt: Any = torch.optim.RMSprop(model.parameters(), lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    else:
        raise ValueError(f"single_process runs rmsprop or adam, not {cfg.optimizer!r}")
    updates = env_steps = 0
    t0 = time.time()
    try:
        while not reached and time.time() - t0 < max_seconds:
            loss = task.forward()
            env_steps += task.samples_taken
            if loss is not None:
                finite = task.backward().finite
                if finite:
                    opt.step()
                    updates += 1
                task.stepped(finite)
            if cfg.max_steps and env_steps >= cfg.max_steps:
                break
    finally:
        task.close()
    return {
        "model": model, "seconds": time.time() - t0, "env_steps": env_steps, "updates": updates,
        "episodes": episodes, "reached": bool(reached), "seconds_to_target": reached[0] if reached else None,
        "mean_return": float(np.mean(recent)) if recent else None, "curve": curve,
    }  # fmt: skip


def solve(algo: str, workers: int, seed: int, *, target: float, budget: float) -> dict[str, Any]:
    """One run to ``target``; ``workers == 0`` means the single process."""
    from paramserver.rl import RLConfig, train_rl

    cfg = RLConfig(algo=algo, env=ENV, workers=max(1, workers), seed=seed, target_return=target,
                   max_seconds=budget, out_dir="", progress=False)  # fmt: skip
    if workers == 0:
        r = single_process(cfg, target=target, max_seconds=budget)
        return {
            "algo": algo, "contender": "single process", "workers": 1, "seed": seed,
            "reached": r["reached"], "seconds": r["seconds_to_target"] if r["reached"] else math.nan,
            "env_steps": r["env_steps"] if r["reached"] else math.nan, "total_steps": r["env_steps"],
            "steps_per_second": r["env_steps"] / max(r["seconds"], 1e-9),
            "startup_seconds": 0.0, "updates": r["updates"], "curve": r["curve"],
        }  # fmt: skip
    res = train_rl(cfg)
    return {
        "algo": algo, "contender": f"paramserver {workers}w", "workers": workers, "seed": seed,
        "reached": res.solved, "seconds": res.seconds_to_target if res.solved else math.nan,
        "env_steps": res.steps_to_target if res.solved else math.nan, "total_steps": res.env_steps,
        "steps_per_second": res.steps_per_second, "startup_seconds": res.startup_seconds,
        "updates": res.updates, "curve": res.curve,
    }  # fmt: skip


def median_run(values: list[float]) -> float:
    """The median with a miss (NaN) counted as slower than any hit; NaN if the median run missed."""
    if not values:
        return math.nan
    m = median([math.inf if math.isnan(v) else v for v in values])
    return math.nan if math.isinf(m) else m


def run(cfg: BenchConfig, report: Report) -> None:
    if cfg.quick:
        plan = {"a3c": [0, 1, 2]}
        target, budgets = QUICK_TARGET, {"a3c": QUICK_BUDGET}
    else:
        counts = [c for c in (cfg.worker_counts if cfg.workers else [1, 2, 4]) if c <= 4]
        plan = {"a3c": [0, *counts], "dqn": [0, *[c for c in counts if c <= 2]]}
        target, budgets = 475.0, BUDGET
    for algo, contenders in plan.items():
        for rep in range(cfg.n_repeats):
            for n in contenders:  # interleaved: a slow spell of the machine hits every contender
                row = solve(algo, n, cfg.seed + rep, target=target, budget=budgets[algo])
                curve = row.pop("curve")
                report.add("rl", row)
                # About 200 points a run, rounded: enough for the plot, small enough to commit.
                points = [(round(t, 3), round(m, 2)) for t, m in curve[:: max(1, len(curve) // 200)]]
                report.rows.setdefault("rl-curves", []).append({**row, "curve": points})
        _summarise(report, algo, contenders, target, budgets[algo])


def _summarise(report: Report, algo: str, contenders: list[int], target: float, budget: float) -> None:
    def runs_of(n: int) -> list[dict[str, Any]]:
        name = "single process" if n == 0 else f"paramserver {n}w"
        return [r for r in report.rows["rl"] if r["algo"] == algo and r["contender"] == name]

    def med(n: int, key: str) -> float:
        return median_run([r[key] for r in runs_of(n)])

    base = med(1, "seconds") if 1 in contenders else math.nan
    table = []
    for n in contenders:
        name = "single process (torch.optim)" if n == 0 else f"paramserver, {n} worker(s)"
        solved = f"{sum(r['reached'] for r in runs_of(n))}/{len(runs_of(n))}"
        seconds = med(n, "seconds")
        table.append([name, solved, seconds, seconds / base, med(n, "env_steps"),
                      med(n, "steps_per_second"), med(n, "startup_seconds")])  # fmt: skip
    report.note(
        "rl",
        f"{algo} on {ENV}: seconds and environment steps from the first step until the mean return of "
        f"the last 100 episodes reaches {target:g} (median over seeds, a run that missed counting as slower "
        f"than any; NaN = the median run did not reach it within {budget:.0f} s)",
    )
    header = ["contender", "solved", "seconds", "vs 1 worker", "env steps", "steps/s", "start-up s"]
    report.table("rl", header, table)
    if algo == "a3c" and 2 in contenders and 1 in contenders:
        ratio = med(2, "seconds") / base
        verdict = "met" if ratio <= 0.6 else "MISSED"
        report.note("rl", f"target: a3c, 2 workers reach {target:g} in <= 0.6x the time of 1 worker: "
                    f"{ratio:.2f}x, {verdict}")  # fmt: skip
    _plot(report, algo, [r for r in report.rows["rl-curves"] if r["algo"] == algo], target)


def _plot(report: Report, algo: str, runs: list[dict[str, Any]], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for r in runs:
        if not r["curve"]:
            continue
        name = r["contender"]
        label = None if name in colors else name
        colors.setdefault(name, f"C{len(colors)}")
        t, mean = zip(*r["curve"], strict=True)
        ax.plot(t, mean, color=colors[name], alpha=0.75, label=label)
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xlabel("seconds since the first step")
    ax.set_ylabel("mean return, last 100 episodes")
    ax.set_title(f"{algo} on {ENV}: return vs wall time")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report.plot_path("rl", algo), dpi=100)
    plt.close(fig)
