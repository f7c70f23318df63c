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
