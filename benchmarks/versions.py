"""This code against another revision of paramserver, interleaved in one run: did a change cost throughput?

    git worktree add /tmp/before 1896020
    python -m paramserver.benchmarks --suites versions --against /tmp/before --tasks cnn,mlp --workers 1,2

Each measurement is one ``paramserver.train`` call (po3, the throughput suite's task,
model and SGD, ``--seconds`` of training, its ``samples_per_second``: first step to
last, under the server's own watch loop) in a fresh interpreter. The two revisions
alternate, and which goes first flips every repeat, so that a drift of the machine
hits both. The other revision is imported from a copy of its folders arranged as the
installed package (``paramserver/`` with ``workers/``, ``models/`` and
``benchmarks/`` inside it), made in a temporary directory and removed afterwards; it
needs only what this one's environment has. Reported per task and worker count: the
median samples/s of each and the median of the per-repeat ratios (this / other).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from .common import VERSIONS_TASKS, BenchConfig, Report, median
from .throughput import task_data, task_sgd

RUN_TIMEOUT = 300.0
PACKAGES = {"paramserver": "paramserver", "workers": "paramserver/workers",
            "models": "paramserver/models", "benchmarks": "paramserver/benchmarks"}  # fmt: skip
"""Folder of a checkout -> its place in the installed package (setup.cfg's package_dir);
the last one is copied where the checkout has it (the measurement does not import it)."""

# One measurement, run by each revision's interpreter: public names only. The data (the
# throughput suite's, made by this revision) arrives as a .npz file, the SGD settings as
# arguments; it reports where every paramserver module it imported came from.
CHILD = """
import json, sys
import numpy as np
import torch
import paramserver as ps
from paramserver.models.torch_models import MLP, HogwildNet

def main():
    task, workers, seconds, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    batch, lr, momentum, data = int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]), np.load(sys.argv[8])
    torch.manual_seed(0)
    model = HogwildNet() if task == "cnn" else MLP(64, 10, hidden=64)
    config = ps.TrainConfig(workers=workers, policy="po3", batch_size=batch, lr=lr, momentum=momentum,
                            epochs=10**6, max_seconds=seconds, seed=seed, out_dir="", progress=False)
    result = ps.train(model, (data["x"], data["y"]), config)
    files = sorted({m.__file__ for n, m in list(sys.modules.items())
                    if n.split(".")[0] == "paramserver" and getattr(m, "__file__", None)})
    print(json.dumps({"samples_per_s": result.samples_per_second, "files": files}))

if __name__ == "__main__":
    main()
"""


def commit_of(path: str) -> str:
    """The commit checked out at ``path`` (with "+changes" if its work tree differs), or "?"."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()  # fmt: skip

    try:
        head, dirty = (
            git("rev-parse", "--short", "HEAD"),
            git("status", "--porcelain", "--untracked-files=no"),
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+changes" if dirty else "")


def stage(checkout: str, into: str) -> str:
    """Arrange ``checkout``'s folders as the installed package under ``into``; return ``into``."""
    if not os.path.isfile(os.path.join(checkout, "paramserver", "__init__.py")):
        raise ValueError(f"--against {checkout!r} is not a paramserver checkout (no paramserver/__init__.py)")
    for folder, place in PACKAGES.items():
        src = os.path.join(checkout, folder)
        if not os.path.isdir(src):
            if folder == "benchmarks":
                continue
            # This environment's editable install would fill the gap with this checkout's code.
            raise ValueError(f"--against {checkout!r} has no {folder}/ folder: not a paramserver checkout")
        shutil.copytree(src, os.path.join(into, place), ignore=shutil.ignore_patterns("__pycache__"))
    return into


def measure(path: str | None, task: str, workers: int, seconds: float, seed: int) -> dict[str, Any]:
    """One ``paramserver.train`` in a fresh interpreter; ``path``: the staged other revision
    (None: this one)."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
    x, y, batch = task_data(task, seed)
    lr, momentum = task_sgd(task)
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: its paramserver/ would shadow both
        data = os.path.join(cwd, "data.npz")
        np.savez(data, x=x, y=y)
        args = [task, workers, seconds, seed, batch, lr, momentum, data]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *map(str, args)],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"a {task} run with {workers} workers failed:\n{out.stderr[-2000:]}")
    row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    root = path if path is not None else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    strays = [f for f in row.pop("files") if not f.startswith(root)]
    assert not strays, f"a run of {path or 'this revision'} imported modules from elsewhere: {strays}"
    return row


def run(cfg: BenchConfig, report: Report) -> None:
    tasks = cfg.task_list if cfg.tasks else list(VERSIONS_TASKS)
    counts = cfg.worker_counts if cfg.workers else [1, 2]
    with tempfile.TemporaryDirectory() as tmp:
        other = stage(os.path.abspath(cfg.against), tmp)
        for rep in range(cfg.n_repeats):
            order: list[tuple[str, str | None]] = [("this", None), ("other", other)]
            if rep % 2:
                order.reverse()
            for task in tasks:
                for w in counts:
                    for name, path in order:
                        row = measure(path, task, w, cfg.run_seconds, cfg.seed + rep)
                        report.add("versions", {"task": task, "workers": w, "revision": name, "repeat": rep,
                                                **row})  # fmt: skip
    rows = report.rows["versions"]
    table = []
    for task in tasks:
        for w in counts:
            mine, theirs = ({r["repeat"]: r["samples_per_s"] for r in rows
                             if (r["task"], r["workers"], r["revision"]) == (task, w, name)}
                            for name in ("this", "other"))  # fmt: skip
            ratios = [mine[k] / theirs[k] for k in mine]
            table.append([task, w, median(list(mine.values())), median(list(theirs.values())), median(ratios),
                          min(ratios), max(ratios)])  # fmt: skip
    report.table("versions", ["task", "workers", "this samples/s", "other samples/s", "ratio (median)",
                              "ratio min", "ratio max"], table)  # fmt: skip
    here = commit_of(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    report.note(
        "versions",
        f"this revision ({here}) against {cfg.against} ({commit_of(cfg.against)}): po3, "
        f"{cfg.run_seconds:g} s of training per run, {cfg.n_repeats} interleaved repeats (the order flips "
        "each repeat); ratio = this / other per repeat",
    )
