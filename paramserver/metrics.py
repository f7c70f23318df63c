"""Quality figures of a model on held-out data: named ones, or the user's own.

A metric is ``metric(outputs, targets) -> float`` on NumPy arrays: the model's
outputs for a split (logits for classification) and its targets (for an
unsupervised task, the inputs). The named ones know their direction (whether
higher is better), which a stop criterion (``target``) needs; ``loss`` is the
backend's own loss, computed by the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of samples whose largest logit is their label."""
    return float((outputs.argmax(axis=1) == targets).mean())


class CollapseWarning(RuntimeWarning):
    """A run ended with a model that gives every test sample the same output."""


COLLAPSED = (
    "the model gives every test sample the same output: it has collapsed (finite parameters "
    "that ignore the input, e.g. every ReLU dead after too large steps); lower the learning "
    "rate or the momentum"
)


def constant_outputs(outputs: np.ndarray) -> bool:
    """Whether ``outputs`` (one row per sample) are exactly the same for every sample: a
    model that ignores its input (a dead network's rows are its last bias, bit for bit;
    outputs that merely differ little are left alone). Fewer than two samples, or
    non-finite outputs, say nothing."""
    out = np.asarray(outputs).reshape(len(outputs), -1)
    if len(out) < 2 or not np.isfinite(out).all():
        return False
    return bool((out == out[0]).all())


def top5(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of samples whose label is among their 5 largest logits."""
    k = min(5, outputs.shape[1])
    best = np.argpartition(-outputs, k - 1, axis=1)[:, :k]
    return float((best == targets[:, None]).any(axis=1).mean())


def _aligned(outputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as (samples, values): a model's (n, 1) output against (n,) targets is one value each."""
    n = len(targets)
    o, t = outputs.reshape(n, -1).astype(np.float64), targets.reshape(n, -1).astype(np.float64)
    if o.shape != t.shape:
        raise ValueError(
            f"the model's outputs {outputs.shape[1:]} do not match the targets {targets.shape[1:]}"
        )
    return o, t


def mse(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error over every value."""
    o, t = _aligned(outputs, targets)
    return float(np.mean((o - t) ** 2))


def mae(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean absolute error over every value."""
    o, t = _aligned(outputs, targets)
    return float(np.mean(np.abs(o - t)))


def r2(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Coefficient of determination, averaged over the outputs (scikit-learn's
    ``r2_score`` with ``multioutput="uniform_average"``); a constant target column
    counts as 1 if predicted exactly, else 0."""
    o, t = _aligned(outputs, targets)
    residual = ((t - o) ** 2).sum(axis=0)
    total = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    scores = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), (residual == 0).astype(float))
    return float(scores.mean())


NAMED: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float] | None, bool, tuple[str, ...]]] = {
    "accuracy": (accuracy, True, ("classify",)),
    "top5": (top5, True, ("classify",)),
    "mse": (mse, False, ("regress", "unsupervised")),
    "mae": (mae, False, ("regress", "unsupervised")),
    "r2": (r2, True, ("regress", "unsupervised")),
    "loss": (None, False, ("classify", "regress", "unsupervised")),
}
"""name -> (function, higher is better, the tasks it applies to); ``loss`` is the backend's."""

METRIC_CHOICES = ("auto", *NAMED)
DIRECTIONS = ("auto", "above", "below")


@dataclass(frozen=True)
class Metric:
    """A resolved metric: its name, function (None: the backend's loss) and direction."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float] | None
    higher_is_better: bool | None

    def reached(self, value: float, target: float) -> bool:
        """Whether ``value`` meets ``target`` in this metric's direction."""
        return value >= target if self.higher_is_better else value <= target


def resolve(metric: str | Callable[..., Any], task: str, direction: str = "auto") -> Metric:
    """The metric ``metric`` names (``auto``: accuracy for classification, the test loss
    otherwise) for ``task``, or the user's callable; ValueError naming the fix."""
    if direction not in DIRECTIONS:
        raise ValueError(f"target_direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    stated = None if direction == "auto" else direction == "above"
    if callable(metric):
        name = getattr(metric, "__name__", type(metric).__name__)
        return Metric(name, metric, stated)
    if metric == "auto":
        metric = "accuracy" if task == "classify" else "loss"
    if metric not in NAMED:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(NAMED)}, or pass a callable")
    fn, higher, tasks = NAMED[metric]
    if task not in tasks:
        fits = [m for m, (_, _, t) in NAMED.items() if task in t]
        raise ValueError(
            f"metric {metric!r} does not apply to task {task!r}; choose one of {', '.join(fits)}"
        )
    return Metric(metric, fn, higher if stated is None else stated)
