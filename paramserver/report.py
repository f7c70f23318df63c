"""Plots of a run directory, finished or still running.

    paramserver report runs/20260101-120000-po3-w2            # PNGs into runs/.../report/
    python -c "from paramserver.report import report; print(report('runs/<run>', '/tmp/plots'))"

A training run's ``metrics.jsonl`` (one line every ``METRICS_EVERY`` seconds,
written by :class:`paramserver.server.ParameterServer`) gives loss, test
accuracy or metric, samples/s per worker and staleness per worker against
time; an RL run's ``episodes.jsonl`` (one line per finished episode, written by
:class:`paramserver.rl.RLServer`) gives the return per episode, its running
mean and the episodes of each worker against time.

Both logs are line-buffered and read while they grow, so the last line may be
half written: it is dropped. Keys are read with ``.get``: a line may gain keys
(``metric``, ``test_metric``, per-worker ``samples``) without breaking this.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

METRICS = "metrics.jsonl"
EPISODES = "episodes.jsonl"
REPORT_DIR = "report"  # default place of the PNGs, inside the run directory


class MissingExtraError(ImportError, ValueError):
    """An optional package is not installed.

    An ``ImportError`` for code that guards optional features, and a
    ``ValueError`` so that the CLI turns it into one line and exit code 2.
    """


def require_extra(module: str, extra: str) -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{module} is not installed; install it with: pip install 'paramserver[{extra}]'"
        ) from e


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines log; a half-written last line is dropped.

    A corrupt line before the last is a ``ValueError`` naming the file and line:
    such a file was not written by a run (or was edited), and guessing would
    plot wrong figures.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    docs: list[dict[str, Any]] = []
    last = max((i for i, s in enumerate(lines) if s.strip()), default=-1)
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if i == last:
                break  # the run is writing this line right now
            raise ValueError(
                f"{path}: line {i + 1} is not JSON ({e.msg}); "
                "repair or delete that line, or point at a run directory written by paramserver"
            ) from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object; is this a paramserver log?")
        docs.append(doc)
    return docs


def report(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Draw PNG plots of ``run_dir``; return their paths.

    ``out_dir`` defaults to ``<run_dir>/report``. A training run (``metrics.jsonl``)
    gives ``loss.png``, ``throughput.png`` and ``staleness.png``; an RL run
    (``episodes.jsonl``) gives ``returns.png`` and ``episodes.png``.
    """
    if not os.path.isdir(run_dir):
        raise ValueError(
            f"run_dir {run_dir!r} is not a directory; give a run directory such as runs/<date>-<policy>-w2"
        )
    sources = [name for name in (METRICS, EPISODES) if os.path.isfile(os.path.join(run_dir, name))]
    if not sources:
        raise ValueError(
            f"{run_dir} has neither {METRICS} nor {EPISODES}; "
            "give the directory a run with --out-dir wrote (the one named in 'results written to ...')"
        )
    logs = {}
    for name in sources:
        path = os.path.join(run_dir, name)
        docs = read_jsonl(path)
        if not docs:
            raise ValueError(
                f"{path} has no complete line yet; wait for the run to write one "
                "(training: every 0.5 s once workers run; RL: once an episode ends)"
            )
        logs[name] = docs
    plt = _pyplot()
    out = out_dir if out_dir is not None else os.path.join(run_dir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    title = os.path.basename(os.path.normpath(run_dir))
    written: list[str] = []
    if METRICS in logs:
        written += _training_plots(plt, logs[METRICS], out, title)
    if EPISODES in logs:
        written += _rl_plots(plt, logs[EPISODES], out, title, _window(run_dir))
    return written


def report_command(run_dir: str, out_dir: str | None = None) -> int:
    """``paramserver report RUN_DIR [--out-dir DIR]``: draw the plots, print one path per line."""
    for path in report(run_dir, out_dir):
        print(path)
    return 0


# -- reading the figures --------------------------------------------------------------------


def _num(value: Any) -> float:
    """A JSON number, or NaN for null/missing/non-numbers (matplotlib leaves a gap at NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _per_worker(docs: Sequence[dict[str, Any]], key: str) -> list[list[float]]:
    """``key`` as one series per worker; lines shorter than the widest are padded with NaN."""
    rows = [d.get(key) if isinstance(d.get(key), list) else [] for d in docs]
    width = max((len(r) for r in rows), default=0)
    return [[_num(r[w]) if w < len(r) else math.nan for r in rows] for w in range(width)]


def worker_sample_rates(docs: Sequence[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Samples/s per worker over each interval between successive metrics lines.

    Returns the interval end times and one series per worker. The counters start
    at zero when the first worker starts (``t`` = 0), so the first interval runs
    from there. Lines carry per-worker ``steps`` but only the total of
    ``samples``: a worker's samples are its steps times the interval's mean
    samples per step (exact when batches have one size). A per-worker
    ``samples`` list, where a line has one, is used as it is.
    """
    t = [_num(d.get("t")) for d in docs]
    steps = _per_worker(docs, "steps")
    per_worker_samples = _per_worker(docs, "samples")
    total_samples = [_num(d.get("samples")) for d in docs]
    times: list[float] = []
    rates: list[list[float]] = [[] for _ in steps]
    prev_t, prev_steps, prev_total = 0.0, [0.0] * len(steps), 0.0
    prev_own = [0.0] * len(per_worker_samples)
    for i, now in enumerate(t):
        dt = now - prev_t
        cur_steps = [s[i] for s in steps]
        d_steps = [c - p for c, p in zip(cur_steps, prev_steps, strict=True)]
        d_total_steps = sum(d_steps)
        per_step = (total_samples[i] - prev_total) / d_total_steps if d_total_steps > 0 else math.nan
        times.append(now)
        for w, ds in enumerate(d_steps):
            if w < len(per_worker_samples):
                done = per_worker_samples[w][i] - prev_own[w]
            else:
                done = ds * per_step if ds > 0 else (0.0 if ds == 0 else math.nan)
            # dt <= 0 or a negative count (a counter row reset): no honest rate for this interval.
            rates[w].append(done / dt if dt > 0 and done >= 0 else math.nan)
        prev_t, prev_steps, prev_total = now, cur_steps, total_samples[i]
        prev_own = [s[i] for s in per_worker_samples]
    return times, rates


def evaluation_series(docs: Sequence[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """Test (and train) accuracy or metric series present in the lines, with their labels."""
    metric = next((d["metric"] for d in docs if isinstance(d.get("metric"), str)), "metric")
    series = []
    for key, label in (
        ("test_accuracy", "test accuracy"),
        ("train_accuracy", "train accuracy"),
        ("test_metric", f"test {metric}"),
        ("train_metric", f"train {metric}"),
    ):
        values = [_num(d.get(key)) for d in docs]
        if any(not math.isnan(v) for v in values):
            series.append((label, values))
    return series


# -- drawing ----------------------------------------------------------------------------------


def _pyplot() -> Any:
    require_extra("matplotlib", "bench")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed, and none may exist
    import matplotlib.pyplot as plt

    return plt


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:,.0f}")


def _window(run_dir: str) -> int | None:
    """The RL run's running-mean window, from its results.json when it has one (finished runs)."""
    try:
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
            window = json.load(f).get("config", {}).get("window")
    except (OSError, ValueError, AttributeError):
        return None
    return window if isinstance(window, int) else None


def _save(plt: Any, fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _training_plots(plt: Any, docs: list[dict[str, Any]], out: str, title: str) -> list[str]:
    t = [_num(d.get("t")) for d in docs]
    marker = "o" if len(docs) < 30 else None  # a few points: show where they are
    written = []

    quality = evaluation_series(docs)
    fig, axes = plt.subplots(
        2 if quality else 1, 1, figsize=(7, 6 if quality else 4), sharex=True, squeeze=False
    )
    ax = axes[0][0]
    ax.plot(
        t, [_num(d.get("loss")) for d in docs], marker=marker, label="training loss (mean of workers' last)"
    )
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if quality:
        ax2 = axes[1][0]
        for label, values in quality:
            # Lines before the first evaluation carry null: join the evaluations that exist.
            points = [(x, v) for x, v in zip(t, values, strict=True) if not math.isnan(v)]
            xs, vs = zip(*points, strict=True)
            ax2.step(xs, vs, where="post", marker=marker, label=f"{label} (last evaluation)")
        only_accuracy = all(label.endswith("accuracy") for label, _ in quality)
        ax2.set_ylabel("accuracy (fraction correct)" if only_accuracy else "accuracy (fraction) / metric")
        ax2.set_title("evaluation")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="best")
    axes[-1][0].set_xlabel("seconds since the first worker started")
    written.append(_save(plt, fig, os.path.join(out, "loss.png")))

    times, rates = worker_sample_rates(docs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for w, series in enumerate(rates):
        ax.plot(times, series, marker=marker, label=f"worker {w}")
    if len(rates) > 1:
        total = [sum(col) for col in zip(*rates, strict=True)]
        ax.plot(times, total, "k--", marker=marker, label="all workers")
    ax.set_xlabel("seconds since the first worker started")
    ax.set_ylabel("samples/s (between metrics lines)")
    ax.set_title(f"{title}: throughput")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(_thousands())
    ax.grid(alpha=0.3)
    if rates:
        ax.legend(loc="lower right")
    written.append(_save(plt, fig, os.path.join(out, "throughput.png")))

    fig, ax = plt.subplots(figsize=(7, 4))
    staleness = _per_worker(docs, "staleness_mean")
    for w, series in enumerate(staleness):
        ax.plot(t, series, marker=marker, label=f"worker {w}")
    ax.set_xlabel("seconds since the first worker started")
    ax.set_ylabel("staleness (updates, mean since start)")
    ax.set_title(f"{title}: staleness (others' updates between a pull and its push)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if staleness:
        ax.legend(loc="lower right")
    written.append(_save(plt, fig, os.path.join(out, "staleness.png")))
    return written


def _rl_plots(plt: Any, docs: list[dict[str, Any]], out: str, title: str, window: int | None) -> list[str]:
    t = [_num(d.get("time")) for d in docs]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(t, [_num(d.get("return")) for d in docs], s=6, alpha=0.35, label="return of one episode")
    ax.plot(
        t,
        [_num(d.get("mean_return")) for d in docs],
        color="C3",
        label=f"mean return of the last {window or 'N'} episodes",
    )
    ax.set_xlabel("seconds since the first step")
    ax.set_ylabel("return (sum of rewards)")
    ax.set_title(f"{title}: returns ({len(docs)} episodes)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    written.append(_save(plt, fig, os.path.join(out, "returns.png")))

    # Cumulative episodes per worker: a flat line is a stalled (or dead) worker.
    fig, ax = plt.subplots(figsize=(7, 4))
    by_worker: dict[int, list[float]] = {}
    for d, when in zip(docs, t, strict=True):
        w = d.get("worker")
        if isinstance(w, int):
            by_worker.setdefault(w, []).append(when)
    for w in sorted(by_worker):
        times = by_worker[w]
        ax.step(times, range(1, len(times) + 1), where="post", label=f"worker {w} ({len(times)})")
    ax.set_xlabel("seconds since the first step")
    ax.set_ylabel("episodes finished")
    ax.set_title(f"{title}: episodes per worker")
    ax.grid(alpha=0.3)
    if by_worker:
        ax.legend(loc="upper left")
    written.append(_save(plt, fig, os.path.join(out, "episodes.png")))
    return written
