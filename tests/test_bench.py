"""Smoke tests of the benchmark suites: the same code paths with tiny budgets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from paramserver.benchmarks import throughput, tta
from paramserver.benchmarks.common import BenchConfig


@pytest.mark.parametrize(
    "contender", ["single", "torch-hogwild", "manager", "paramserver-po3", "paramserver-po1"]
)
def test_every_throughput_contender_measures_a_positive_rate(contender):
    assert throughput.measure("mlp", contender, 1, seconds=0.3) > 0


def test_time_to_accuracy_reaches_the_digits_target(monkeypatch):
    # One worker runs 2 threads on 2 cores: with OpenMP's spinning wait, any other job
    # on the cores can slow it 100-fold (README, "Threads on a shared machine").
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    row = tta.time_to_accuracy("digits", 1, "po3")
    assert row["reached"], row
    assert row["accuracy"] >= 0.95  # measured after the stop, workers may have moved on a step
    assert row["seconds"] > 0 and row["curve"]


def test_bench_cli_writes_json_markdown_and_plots(tmp_path):
    args = ["--quick", "--suites", "sparse", "--out-dir", str(tmp_path)]
    cmd = [sys.executable, "-m", "paramserver.benchmarks", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["usable_cores"] >= 1
    rows = doc["rows"]["sparse"]
    assert {r["contender"] for r in rows} == {"plain process", "paramserver po3", "paramserver striped"}
    assert all(r["seconds"] > 0 and r["loss"] < 0.6931 for r in rows)  # below the initial log 2
    assert "## sparse" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "sparse-speedup.png").stat().st_size > 0


@pytest.mark.slow  # a local Ray instance and 16 short runs: about 70 s on 2 cores
def test_cluster_suite_measures_both_tasks(tmp_path):
    pytest.importorskip("ray")
    cmd = [sys.executable, "-m", "paramserver.benchmarks", "--quick", "--suites", "cluster",
           "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]["cluster"]
    for task in ("digits", "synthetic"):
        mine = [r for r in rows if r["task"] == task]
        assert {r["contender"] for r in mine} == {"1x2", "2x1/1", "2x1/10", "2x1/100"}, task
        assert all(r["samples_per_s"] > 0 for r in mine)
        assert all(r["syncs"] > 0 for r in mine if r["contender"] != "1x2")
    summary = (tmp_path / "summary.md").read_text()
    assert "digits: NumPy MLP" in summary and "synthetic: NumPy MLP" in summary


def test_bad_bench_options_are_rejected():
    with pytest.raises(ValueError, match="unknown suites"):
        BenchConfig(suites="throughput,warp")
    with pytest.raises(ValueError, match="comma-separated integers"):
        BenchConfig(workers="1,two")
    proc = subprocess.run([sys.executable, "-m", "paramserver", "bench", "--repeats", "0"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "repeats must be at least 1" in proc.stderr
    with pytest.raises(ValueError, match=r"unknown tasks \['rnn'\]; choose among cnn, mlp, embedding"):
        BenchConfig(tasks="embedding,rnn")


def test_throughput_tasks_are_chosen_by_name():
    assert BenchConfig().task_list == ["cnn", "mlp", "embedding"]
    assert BenchConfig(quick=True).task_list == ["cnn", "embedding"]
    assert BenchConfig(tasks=" embedding ").task_list == ["embedding"]
    assert BenchConfig(tasks="mlp,cnn", quick=True).task_list == ["mlp", "cnn"]
