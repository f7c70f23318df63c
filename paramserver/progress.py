"""The live progress: samples/s, loss, and what each worker is doing.

Drawn by tqdm where it can redraw: a line redrawn in place on a terminal, a
widget in a Jupyter notebook (with ipywidgets; text lines without it). Where
stderr is a file or a pipe (CI logs, ``nohup``) a plain line is printed every
few seconds instead: tqdm would fill the log with carriage returns.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .store import Counters

BARS = " ▁▂▃▄▅▆▇█"
REFRESH_TTY = 0.25
REFRESH_LOG = 5.0
RATE_WINDOW = 2.0
"""Seconds over which samples/s is measured."""
BAR_UNITS = 1000
"""The bar counts thousandths of the run, so that it moves smoothly whatever its length."""


def output_kind() -> str:
    """Where the progress goes: ``"notebook"`` (a Jupyter kernel), ``"terminal"`` (stderr
    is a tty) or ``"log"`` (anything else)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
        return "notebook"
    return "terminal" if sys.stderr.isatty() else "log"


def _open_bar(kind: str, total: int | None) -> Any:
    """A tqdm bar showing only our text (``{desc}``) and, in a notebook, a widget bar."""
    tqdm: Any
    if kind == "notebook":
        try:
            import ipywidgets  # noqa: F401 (tqdm's notebook bar needs it)
            from tqdm.notebook import tqdm
        except ImportError:  # no widgets in this kernel: tqdm's text bar, in the cell
            from tqdm import tqdm
    else:
        from tqdm import tqdm
    # mininterval=0: we decide when to redraw (REFRESH_TTY), tqdm must not skip a draw.
    return tqdm(
        total=total, bar_format="{desc}", file=sys.stderr, mininterval=0, leave=True, dynamic_ncols=True
    )


class Progress:
    """The run's live line: a tqdm bar on a terminal or in a notebook, a plain line every
    few seconds otherwise (so that CI logs stay short). Subclasses change :meth:`line`
    (the text) and :meth:`fraction` (how far the run is)."""

    def __init__(self, *, enabled: bool, total_samples: int, steps: int = 0):
        self.enabled = enabled
        self.kind = output_kind()
        self.tty = self.kind != "log"
        self.total_samples = total_samples
        self.steps = steps
        self.history: list[tuple[float, np.ndarray]] = []
        self.last_draw = 0.0 if not self.tty else -1e9
        self._bar: Any = None
        self.note = ""
        """The latest evaluation's figures (``test_accuracy 0.95``), shown at the end of the line."""

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
        self._draw(self.line(elapsed, rows, loss), self.fraction(rows))

    def rates(self) -> tuple[float, np.ndarray]:
        """Samples/s overall and steps/s per worker over the last few seconds."""
        (t_a, a), (t_b, b) = self.history[0], self.history[-1]
        dt = t_b - t_a
        if dt <= 0:
            return 0.0, np.zeros(len(b))
        return float((b[:, 0] - a[:, 0]).sum() / dt), (b[:, 1] - a[:, 1]) / dt

    def fraction(self, rows: Counters) -> float | None:
        """How far the run is, 0 to 1; None when it has no known end."""
        if not self.total_samples and not self.steps:
            return None
        frac = rows.column("samples").sum() / self.total_samples if self.total_samples else 0.0
        if self.steps:
            frac = max(frac, rows.updates() / self.steps)
        return min(float(frac), 1.0)

    def line(self, elapsed: float, rows: Counters, loss: float | None) -> str:
        frac = self.fraction(rows) or 0.0
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
        if self.note:
            text += f" | {self.note}"
        return text

    def _draw(self, text: str, fraction: float | None) -> None:
        if not self.tty:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            return
        if self._bar is None:
            self._bar = _open_bar(self.kind, BAR_UNITS if fraction is not None else None)
        if fraction is not None:
            self._bar.n = round(fraction * BAR_UNITS)
        self._bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        """End the bar (the last line stays). Safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
