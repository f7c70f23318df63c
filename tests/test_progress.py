"""The live progress: plain lines every few seconds where stderr is not a terminal,
a tqdm bar (redrawn line) where it is."""

from __future__ import annotations

import io

import numpy as np
import pytest

from paramserver import progress as progress_mod
from paramserver.progress import REFRESH_LOG, Progress
from paramserver.store import COUNTER_FIELDS, Counters


def rows(samples: list[float], steps: list[float]) -> Counters:
    table = Counters(np.zeros((len(samples), len(COUNTER_FIELDS))))
    table.column("samples")[:] = samples
    table.column("steps")[:] = steps
    return table


def test_log_output_is_plain_lines_every_few_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    # Under pytest's capture stderr is not a terminal: the log path.
    p = Progress(enabled=True, total_samples=1000)
    assert p.kind == "log"
    for i in range(1, 41):  # 20 s of updates, two a second
        p.update(i * 0.5, rows([10.0 * i, 15.0 * i], [i, 2.0 * i]), loss=1.0 / i)
    p.close()
    p.close()  # safe twice
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # no redraws, no terminal codes in a log
    lines = err.splitlines()
    assert len(lines) == int(20 / REFRESH_LOG)  # one line every REFRESH_LOG seconds
    assert lines[0].lstrip().startswith("25%    5.0s")  # 250 of 1000 samples at 5 s
    assert "samples/s" in lines[-1] and "loss 0.0250" in lines[-1]
    assert lines[-1].lstrip().startswith("100%")


def test_disabled_progress_prints_nothing_but_keeps_rates(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress(enabled=False, total_samples=100)
    p.update(0.0, rows([0.0, 0.0], [0.0, 0.0]), None)
    p.update(1.0, rows([30.0, 10.0], [3.0, 1.0]), 0.5)
    rate, per_worker = p.rates()
    assert rate == 40.0 and list(per_worker) == [3.0, 1.0]
    p.close()
    assert capsys.readouterr().err == ""


def test_terminal_output_is_one_redrawn_tqdm_line(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = Tty()
    monkeypatch.setattr(progress_mod.sys, "stderr", fake)
    p = Progress(enabled=True, total_samples=100)
    assert p.kind == "terminal"
    for i in range(1, 5):
        p.update(i * 1.0, rows([10.0 * i, 10.0 * i], [i, i]), 0.5)
    p.close()
    out = fake.getvalue()
    assert out.count("\r") >= 4 and out.endswith("\n")  # redrawn in place, ended once
    assert out.count("\n") == 1
    assert "80%" in out.rsplit("\r", 1)[-1]  # the last drawing is the last state
