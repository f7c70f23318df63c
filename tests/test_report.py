"""Plots of run directories: fake ones in the real line format, and one real tiny run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from paramserver.report import (
    MissingExtraError,
    evaluation_series,
    read_jsonl,
    report,
    report_command,
    worker_sample_rates,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAINING_PNGS = {"loss.png", "throughput.png", "staleness.png"}
RL_PNGS = {"returns.png", "episodes.png"}


def metrics_line(t: float, steps: list[int], samples: int, **extra: Any) -> dict[str, Any]:
    """A line as ``paramserver.server._metrics_line`` writes it."""
    return {
        "t": t,
        "updates": sum(steps),
        "samples": samples,
        "loss": 2.0 / (1 + t),
        "steps": [float(s) for s in steps],
        "test_accuracy": None,
        "train_accuracy": None,
        "staleness_mean": [0.5 + 0.1 * r for r in range(len(steps))],
        "staleness_max": [2.0] * len(steps),
        "lr": [0.05] * len(steps),
        "nonfinite": [0.0] * len(steps),
        "restarts": [0.0] * len(steps),
        **extra,
    }


def episode_line(worker: int, episode: int, ret: float, time: float, mean: float) -> dict[str, Any]:
    """A line as ``paramserver.rl.RLServer`` writes it."""
    return {"worker": worker, "episode": episode, "return": ret, "length": int(ret), "time": time,
            "wall_time": 1.7e9 + time, "mean_return": mean}  # fmt: skip


def write_lines(path: Path, docs: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs) + tail)


@pytest.fixture
def training_run(tmp_path: Path) -> Path:
    run = tmp_path / "run-train"
    run.mkdir()
    # Batch size 32: worker 0 makes 10 steps per half second, worker 1 makes 5.
    docs = [metrics_line(0.5 * (i + 1), [10 * (i + 1), 5 * (i + 1)], 32 * 15 * (i + 1)) for i in range(6)]
    docs[3]["test_accuracy"] = 0.8
    docs[5]["test_accuracy"] = 0.9
    write_lines(run / "metrics.jsonl", docs)
    return run


@pytest.fixture
def rl_run(tmp_path: Path) -> Path:
    run = tmp_path / "run-rl"
    run.mkdir()
    docs = [episode_line(i % 2, i // 2, 10.0 + i, 0.1 * i, 10.0 + i / 2) for i in range(20)]
    write_lines(run / "episodes.jsonl", docs)
    return run


def assert_valid_pngs(paths: list[str], names: set[str]) -> None:
    assert {Path(p).name for p in paths} == names
    import matplotlib.image

    for p in paths:
        data = Path(p).read_bytes()
        assert data.startswith(PNG_SIGNATURE), p
        height, width, _ = matplotlib.image.imread(p).shape  # decodes the whole image
        assert height > 100 and width > 100, (p, height, width)


def test_training_run_gives_three_pngs_in_its_report_folder(training_run):
    paths = report(str(training_run))
    assert all(Path(p).parent == training_run / "report" for p in paths)
    assert_valid_pngs(paths, TRAINING_PNGS)


def test_rl_run_gives_two_pngs_where_asked(rl_run, tmp_path):
    out = tmp_path / "plots" / "rl"
    paths = report(str(rl_run), str(out))
    assert all(Path(p).parent == out for p in paths)
    assert_valid_pngs(paths, RL_PNGS)


def test_report_command_prints_one_path_per_line(training_run, tmp_path, capsys):
    assert report_command(str(training_run), str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == TRAINING_PNGS
    assert all(Path(p).is_file() for p in printed)


def test_sample_rates_per_worker_come_from_successive_lines(training_run):
    docs = read_jsonl(str(training_run / "metrics.jsonl"))
    times, rates = worker_sample_rates(docs)
    assert times == [0.5 * (i + 1) for i in range(6)]
    # 10 and 5 steps of 32 samples per 0.5 s, in every interval, the first one from t = 0.
    assert rates[0] == pytest.approx([640.0] * 6)
    assert rates[1] == pytest.approx([320.0] * 6)


def test_sample_rates_use_per_worker_samples_when_a_line_has_them():
    docs = [
        {"t": 1.0, "steps": [2, 2], "samples": [64, 10]},
        {"t": 2.0, "steps": [4, 4], "samples": [128, 30]},
    ]
    _, rates = worker_sample_rates(docs)
    assert rates == [pytest.approx([64.0, 64.0]), pytest.approx([10.0, 20.0])]


def test_a_counter_going_back_gives_a_gap_not_a_negative_rate():
    docs = [metrics_line(1.0, [10], 320), metrics_line(2.0, [4], 128)]
    _, rates = worker_sample_rates(docs)
    assert rates[0][0] == pytest.approx(320.0)
    assert math.isnan(rates[0][1])


def test_evaluation_series_find_accuracy_and_a_named_metric():
    docs = [
        metrics_line(1.0, [1], 32, metric="r2", test_metric=None),
        metrics_line(2.0, [2], 64, metric="r2", test_metric=0.7, test_accuracy=0.5),
    ]
    labels = {label: values for label, values in evaluation_series(docs)}
    assert set(labels) == {"test accuracy", "test r2"}
    assert math.isnan(labels["test r2"][0]) and labels["test r2"][1] == 0.7
    assert evaluation_series([metrics_line(1.0, [1], 32)]) == []


def test_a_half_written_last_line_is_dropped(training_run):
    log = training_run / "metrics.jsonl"
    complete = len(read_jsonl(str(log)))
    with open(log, "a") as f:
        f.write('{"t": 3.5, "updates": 10')  # the run is writing this line now
    assert len(read_jsonl(str(log))) == complete
    assert_valid_pngs(report(str(training_run)), TRAINING_PNGS)


def test_a_corrupt_line_before_the_last_is_an_error(training_run):
    log = training_run / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    log.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not JSON"):
        report(str(training_run))


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    (tmp_path / "episodes.jsonl").write_text("[1, 2]\n[3]\n")
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        report(str(tmp_path))


def test_bad_run_dirs_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"nope' is not a directory"):
        report(str(missing))
    a_file = tmp_path / "metrics.jsonl"
    a_file.write_text("{}\n")
    with pytest.raises(ValueError, match="is not a directory"):
        report(str(a_file))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(
        ValueError, match=r"has neither metrics\.jsonl nor episodes\.jsonl.*results written to"
    ):
        report(str(empty_dir))
    (empty_dir / "metrics.jsonl").write_text('{"t": 0.5, "upd')  # only a partial line so far
    with pytest.raises(ValueError, match="has no complete line yet; wait for the run"):
        report(str(empty_dir))


def test_missing_matplotlib_names_the_extra(training_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'paramserver\[bench\]'") as info:
        report(str(training_run))
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


def test_report_of_a_real_tiny_run(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "paramserver", "train", "--model", "mlp", "--epochs", "2", "--workers", "1",
           "--out-dir", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = list(out.iterdir())
    docs = read_jsonl(str(run_dir / "metrics.jsonl"))
    assert docs and {"t", "steps", "samples", "loss", "staleness_mean"} <= set(docs[-1])
    assert_valid_pngs(report(str(run_dir)), TRAINING_PNGS)
