"""What every benchmark suite shares: its configuration, the report it fills, timing helpers.

A suite is a module with ``run(cfg: BenchConfig, report: Report) -> None``. It
measures its peers side by side in the same run, adds one row per measurement
(``report.add``), prints as it goes, and states in ``report.note`` which
targets it met or missed, with the measured reason.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from paramserver.machine import machine_info, usable_cores

SUITES = ("throughput", "overhead", "memory", "tta", "sparse")
"""The default suites (a full run of them takes about 15 minutes on 2 cores)."""
EXTRA_SUITES = ("asynchrony", "rl", "tf", "rules", "cluster", "startup", "versions")
"""Run only when named (--suites asynchrony,rl,tf,rules,cluster,startup,versions): they take minutes
of their own (cluster also needs the ray extra, versions a checkout to compare with: --against)."""
SUITE_MODULES = {"tf": "tf_throughput"}
"""Suites whose module is not named after them."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


THROUGHPUT_TASKS = ("cnn", "mlp", "embedding")
VERSIONS_TASKS = ("cnn", "mlp")
"""The tasks of the versions suite (benchmarks/versions.py)."""


@dataclass
class BenchConfig:
    """Which suites to run, how long, and where the results go."""

    suites: str = _f(",".join(SUITES), f"comma-separated suites among {', '.join(SUITES + EXTRA_SUITES)}")
    quick: bool = _f(False, "short measurements (under 2 minutes on 2 cores), for a smoke run")
    workers: str = _f("", "comma-separated worker counts; default 1, 2, 4 and powers of 2 up to the cores")
    repeats: int = _f(3, "repeats of each measurement (medians are reported); --quick uses 1")
    seconds: float = _f(2.0, "seconds of training per throughput measurement; --quick uses 1")
    tasks: str = _f(
        "",
        "comma-separated throughput tasks among cnn, mlp, embedding (default: all; --quick: cnn, embedding)",
    )
    against: str = _f("", "versions suite: a checkout of the revision to compare this one with")
    out_dir: str = _f("bench-results", "directory for results.json, summary.md and the plots")
    seed: int = _f(0, "random seed")

    def __post_init__(self) -> None:
        unknown = set(self.suite_list) - set(SUITES + EXTRA_SUITES)
        if unknown:
            raise ValueError(
                f"unknown suites {sorted(unknown)}; choose among {', '.join(SUITES + EXTRA_SUITES)}"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.seconds <= 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        self.worker_counts  # noqa: B018 (validates --workers)
        unknown_tasks = set(self.task_list) - set(THROUGHPUT_TASKS)
        if unknown_tasks:
            raise ValueError(
                f"unknown tasks {sorted(unknown_tasks)}; choose among {', '.join(THROUGHPUT_TASKS)}"
            )
        if "versions" in self.suite_list:
            if not self.against:
                raise ValueError(
                    "the versions suite needs --against DIR, a checkout of the revision to compare"
                )
            if self.tasks and set(self.task_list) - set(VERSIONS_TASKS):
                raise ValueError(
                    f"the versions suite runs the tasks {', '.join(VERSIONS_TASKS)}; got --tasks {self.tasks}"
                )

    @property
    def task_list(self) -> list[str]:
        """The throughput suite's tasks: those named, else all (the quick run: cnn, embedding)."""
        named = [t.strip() for t in self.tasks.split(",") if t.strip()]
        return named or (["cnn", "embedding"] if self.quick else list(THROUGHPUT_TASKS))

    @property
    def suite_list(self) -> list[str]:
        return [s.strip() for s in self.suites.split(",") if s.strip()]

    @property
    def worker_counts(self) -> list[int]:
        if self.workers:
            try:
                counts = [int(w) for w in self.workers.split(",")]
            except ValueError:
                raise ValueError(f"workers must be comma-separated integers, got {self.workers!r}") from None
            if any(c < 1 for c in counts):
                raise ValueError(f"worker counts must be at least 1, got {self.workers!r}")
            return counts
        cores = len(usable_cores())
        counts = [1, 2, 4]
        while counts[-1] * 2 <= cores:
            counts.append(counts[-1] * 2)
        return counts

    @property
    def n_repeats(self) -> int:
        return 1 if self.quick else self.repeats

    @property
    def run_seconds(self) -> float:
        return 1.0 if self.quick else self.seconds


class Report:
    """Rows of raw figures per suite, notes, plots; saved as JSON and Markdown."""

    def __init__(self, out_dir: str, config: BenchConfig):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.config = config
        self.machine = machine_info()
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.notes: dict[str, list[str]] = {}
        self.tables: dict[str, list[str]] = {}
        self.plots: dict[str, list[str]] = {}
        self.started = time.time()

    def add(self, suite: str, row: dict[str, Any], *, show: bool = True) -> None:
        self.rows.setdefault(suite, []).append(row)
        if show:
            cells = "  ".join(f"{k}={_fmt(v)}" for k, v in row.items())
            print(f"[{suite}] {cells}", flush=True)

    def note(self, suite: str, text: str) -> None:
        self.notes.setdefault(suite, []).append(text)
        print(f"[{suite}] {text}", flush=True)

    def table(self, suite: str, header: list[str], rows: list[list[Any]]) -> None:
        """A Markdown table for the summary (also printed)."""
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
        self.tables.setdefault(suite, []).extend([*lines, ""])
        print("\n".join(lines), flush=True)

    def plot_path(self, suite: str, name: str) -> str:
        path = os.path.join(self.out_dir, f"{suite}-{name}.png")
        self.plots.setdefault(suite, []).append(os.path.basename(path))
        return path

    def save(self) -> None:
        doc = {
            "machine": self.machine,
            "config": asdict(self.config),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "rows": self.rows,
            "notes": self.notes,
        }
        with open(os.path.join(self.out_dir, "results.json"), "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        m = self.machine
        md = [
            "# paramserver benchmark results",
            "",
            f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['memory_gib']} GiB, "
            f"Python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
            f"Run: {doc['started']}, {doc['seconds']} s, "
            f"{'quick' if self.config.quick else 'full'} mode, {self.config.n_repeats} repeat(s).",
            "",
        ]
        for suite in sorted(self.rows.keys() | self.notes.keys()):
            if not (self.tables.get(suite) or self.notes.get(suite) or self.plots.get(suite)):
                continue  # raw rows only (in results.json)
            md += [f"## {suite}", ""]
            md += self.tables.get(suite, [])
            md += [f"- {n}" for n in self.notes.get(suite, [])]
            md += [""] + [f"![{p}]({p})" for p in self.plots.get(suite, [])] + [""]
        with open(os.path.join(self.out_dir, "summary.md"), "w") as f:
            f.write("\n".join(md))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:.3g}"
    return str(v)


def throughput_medians(
    rows: list[dict[str, Any]], cores: int
) -> tuple[Callable[..., float], dict[int, float], int]:
    """From a throughput suite's rows of one task: ``med(contender, workers, threads=None)``,
    the median samples/s of a contender; the single process's median by thread count
    (1 to ``cores``); and its best thread count."""

    def med(contender: str, workers: int, threads: int | None = None) -> float:
        vals = [r["samples_per_s"] for r in rows if r["contender"] == contender and r["workers"] == workers
                and (threads is None or r["threads"] == threads)]  # fmt: skip
        return median(vals) if vals else math.nan

    single = {t: med("single", 1, t) for t in range(1, cores + 1)}
    return med, single, max(single, key=lambda t: single[t])


def scaling_ceiling(single: dict[int, float], best: float, achieved: float, n: int, cores: int) -> str:
    """Why a speedup over the best single process stops where it does: N workers at
    ``cores // N`` threads each can at most reach N times one process at that thread count.

    ``single`` maps thread counts to a single process's throughput, ``best`` is its best,
    ``achieved`` the throughput of N workers."""
    threads = max(1, cores // n)
    one = single.get(threads, math.nan)
    ceiling = n * one / best
    return (
        f"ceiling for {n} workers at {threads} thread(s) each: {n} x the single process at {threads} "
        f"thread(s) ({one:,.0f}) / the best single ({best:,.0f}) = {ceiling:.2f}x; "
        f"the workers reached {achieved / (n * one):.0%} of it ({achieved / best:.2f}x)"
    )


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def median_run(values: list[float]) -> float:
    """The median time of runs with a miss (NaN) counted as slower than any hit; NaN if the
    median run missed (a plain median of numbers and NaNs depends on where the NaNs sort)."""
    if not values:
        return math.nan
    m = median([math.inf if math.isnan(v) else v for v in values])
    return math.nan if math.isinf(m) else m


def timed(fn: Callable[[], Any], *, repeat: int = 5, number: int = 1) -> float:
    """Best-of-``repeat`` seconds per call of ``fn`` (``number`` calls per repeat)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best
