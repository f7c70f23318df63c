"""TensorBoard event files: written by ScalarLog, read back by TensorBoard's own reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paramserver.report import MissingExtraError
from paramserver.tensorboard import ScalarLog, episode_scalars, train_scalars


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall_time)] as TensorBoard's EventAccumulator reads the directory."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_read_back_with_their_tags_steps_values_and_times(tmp_path):
    with ScalarLog(str(tmp_path)) as log:
        log.add(0, {"train/loss": 2.5, "worker/0/staleness": 1.0}, wall_time=1000.0)
        log.add(10, {"train/loss": 1.25}, wall_time=1001.5)
        log.add(20, {"train/loss": 0.5, "worker/0/staleness": 3}, wall_time=1003.0)
    assert list(tmp_path.iterdir()) == [Path(log.path)]
    assert Path(log.path).name.startswith("events.out.tfevents.")
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"train/loss", "worker/0/staleness"}
    assert scalars["train/loss"] == [(0, 2.5, 1000.0), (10, 1.25, 1001.5), (20, 0.5, 1003.0)]
    assert [(s, v) for s, v, _ in scalars["worker/0/staleness"]] == [(0, 1.0), (20, 3.0)]


def test_each_add_is_on_disk_before_close(tmp_path):
    # A TensorBoard watching a running job must see what it logged so far.
    log = ScalarLog(str(tmp_path / "tb"))
    try:
        log.add(1, {"train/loss": 0.75})
        assert read_scalars(tmp_path / "tb")["train/loss"][0][:2] == (1, 0.75)
    finally:
        log.close()


def test_two_logs_in_one_directory_write_two_files(tmp_path):
    with ScalarLog(str(tmp_path)) as a, ScalarLog(str(tmp_path)) as b:
        a.add(1, {"x": 1.0})
        b.add(2, {"y": 2.0})
    assert a.path != b.path and len(list(tmp_path.iterdir())) == 2
    assert set(read_scalars(tmp_path)) == {"x", "y"}


def test_close_twice_is_fine_and_adding_after_close_is_an_error(tmp_path):
    log = ScalarLog(str(tmp_path))
    log.close()
    log.close()
    assert "closed" in repr(log)
    with pytest.raises(ValueError, match="is closed; open a new one"):
        log.add(0, {"x": 1.0})


def test_bad_arguments_name_what_is_wrong(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        ScalarLog(str(a_file))
    with ScalarLog(str(tmp_path / "tb")) as log:
        with pytest.raises(TypeError, match="step must be an int"):
            log.add(1.5, {"x": 1.0})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="scalar 'x' must be a number"):
            log.add(1, {"x": "high"})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="tags must be non-empty strings"):
            log.add(1, {"": 1.0})


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'paramserver\[bench\]'"):
        ScalarLog(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_importing_paramserver_imports_no_tensorboard_and_writing_imports_no_tensorflow(tmp_path):
    # tensorflow-cpu is installed in the dev set-up, so TensorBoard's own writers would import it here.
    code = f"""
import sys
import paramserver, paramserver.report, paramserver.tensorboard
assert not [m for m in sys.modules if m.split(".")[0] in ("tensorboard", "matplotlib")], "imported at import"
with paramserver.tensorboard.ScalarLog({str(tmp_path)!r}) as log:
    log.add(0, {{"x": 1.0}})
heavy = [m for m in ("tensorflow", "torch") if m in sys.modules]
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- the server's figures as scalars ----------------------------------------------------------------

LINE = {
    "t": 2.0, "updates": 40, "samples": 1280, "loss": 0.5, "steps": [30.0, 10.0],
    "test_accuracy": 0.9, "train_accuracy": None, "staleness_mean": [1.0, 3.0],
    "staleness_max": [2.0, 5.0], "lr": [0.05, 0.05], "nonfinite": [0.0, 0.0], "restarts": [0.0, 0.0],
}  # fmt: skip


def test_train_scalars_of_a_metrics_line_average_since_the_start():
    s = train_scalars(LINE)
    assert s == pytest.approx({
        "train/loss": 0.5, "test/accuracy": 0.9,
        "train/samples_per_second": 640.0, "train/updates_per_second": 20.0,
        "staleness/mean": (1.0 * 30 + 3.0 * 10) / 40,
        "worker/0/staleness": 1.0, "worker/1/staleness": 3.0,
        "worker/0/staleness_max": 2.0, "worker/1/staleness_max": 5.0,
        "worker/0/lr": 0.05, "worker/1/lr": 0.05,
        "worker/0/steps_per_second": 15.0, "worker/1/steps_per_second": 5.0,
    })  # fmt: skip


def test_train_scalars_rates_over_the_interval_since_the_previous_line():
    prev = {**LINE, "t": 1.5, "updates": 20, "samples": 640, "steps": [15.0, 5.0]}
    s = train_scalars(LINE, prev)
    assert s["train/samples_per_second"] == pytest.approx(640 / 0.5)
    assert s["train/updates_per_second"] == pytest.approx(20 / 0.5)
    assert s["worker/0/steps_per_second"] == pytest.approx(30.0)
    assert s["worker/1/steps_per_second"] == pytest.approx(10.0)


def test_train_scalars_take_a_named_metric_and_skip_what_is_missing():
    s = train_scalars({"t": 1.0, "loss": None, "metric": "r2", "test_metric": 0.25, "new_key": [1]})
    assert s == {"test/r2": 0.25}


def test_episode_scalars():
    doc = {"worker": 1, "episode": 7, "return": 21.0, "length": 21, "time": 0.5, "wall_time": 1.7e9,
           "mean_return": 15.5}  # fmt: skip
    assert episode_scalars(doc) == {
        "episode/return": 21.0, "episode/mean_return": 15.5, "episode/length": 21.0, "worker/1/return": 21.0,
    }  # fmt: skip


def test_a_metrics_log_replayed_into_tensorboard(tmp_path):
    # What the server will do: one add per metrics line, step = updates, wall time of the line.
    lines = [{**LINE, "t": 0.5 * i, "updates": 10 * i, "samples": 320 * i, "steps": [5.0 * i, 5.0 * i]}
             for i in range(1, 4)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    with ScalarLog(str(tmp_path / "tb")) as log:
        prev = None
        for line in lines:
            log.add(line["updates"], train_scalars(line, prev), wall_time=1000.0 + line["t"])
            prev = line
    scalars = read_scalars(tmp_path / "tb")
    assert [(s, v) for s, v, _ in scalars["train/samples_per_second"]] == [
        (10, 640.0),
        (20, 640.0),
        (30, 640.0),
    ]
    assert [s for s, _, _ in scalars["worker/1/staleness"]] == [10, 20, 30]
