"""The live progress line: samples/s, loss, and what each worker is doing."""

from __future__ import annotations

import sys

import numpy as np

from .store import Counters

BARS = " ▁▂▃▄▅▆▇█"
REFRESH_TTY = 0.25
REFRESH_LOG = 5.0
RATE_WINDOW = 2.0
"""Seconds over which samples/s is measured."""


class Progress:
    """One line on stderr, redrawn in place on a terminal, printed every few seconds
    otherwise (so that CI logs stay short)."""

    def __init__(self, *, enabled: bool, total_samples: int, steps: int = 0):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.total_samples = total_samples
        self.steps = steps
        self.history: list[tuple[float, np.ndarray]] = []
        self.last_draw = 0.0 if not self.tty else -1e9
        self.width = 0

    def update(self, elapsed: float, rows: Counters, loss: float | None) -> None:
        self.history.append((elapsed, np.stack([rows.column("samples"), rows.column("steps")], axis=1)))
        while len(self.history) > 2 and elapsed - self.history[1][0] >= RATE_WINDOW:
            self.history.pop(0)
        if not self.enabled:
            return
        refresh = REFRESH_TTY if self.tty else REFRESH_LOG
        if elapsed - self.last_draw < refresh:
            return
        self.last_draw = elapsed
        self._draw(self.line(elapsed, rows, loss))

    def rates(self) -> tuple[float, np.ndarray]:
        """Samples/s overall and steps/s per worker over the last few seconds."""
        (t_a, a), (t_b, b) = self.history[0], self.history[-1]
        dt = t_b - t_a
        if dt <= 0:
            return 0.0, np.zeros(len(b))
        return float((b[:, 0] - a[:, 0]).sum() / dt), (b[:, 1] - a[:, 1]) / dt

    def line(self, elapsed: float, rows: Counters, loss: float | None) -> str:
        samples = rows.column("samples").sum()
        frac = samples / self.total_samples if self.total_samples else 0.0
        if self.steps:
            frac = max(frac, rows.updates() / self.steps)
        rate, per_worker = self.rates()
        top = max(float(per_worker.max()), 1e-9) if len(per_worker) else 1.0
        bars = "".join(BARS[int(round(r / top * (len(BARS) - 1)))] for r in per_worker)
        loss_text = "  -   " if loss is None else f"{loss:.4f}"
        each = float(per_worker.mean()) if len(per_worker) else 0.0
        stale = rows.staleness()["mean"]
        text = (
            f"{min(frac, 1.0):4.0%} {elapsed:6.1f}s | {rate:9,.0f} samples/s | "
            f"loss {loss_text} | workers [{bars}] {each:,.0f} steps/s each | stale {stale:.1f}"
        )
        nonfinite = int(rows.column("nonfinite").sum())
        restarts = int(rows.column("restarts").sum())
        if nonfinite:
            text += f" | {nonfinite} non-finite skipped"
        if restarts:
            text += f" | {restarts} restarts"
        return text

    def _draw(self, text: str) -> None:
        if self.tty:
            pad = max(0, self.width - len(text))
            sys.stderr.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.width = 0
