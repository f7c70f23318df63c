"""Smoke tests of the benchmark suites: the same code paths with tiny budgets."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from paramserver.benchmarks import throughput, tta
from paramserver.benchmarks.cluster import CONTENDERS
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


@pytest.mark.slow  # a local Ray instance and 35 short runs: about 2.5 minutes on 2 cores
def test_cluster_suite_measures_every_task_and_where_the_cpu_goes(tmp_path):
    pytest.importorskip("ray")
    cmd = [sys.executable, "-m", "paramserver.benchmarks", "--quick", "--suites", "cluster",
           "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]["cluster"]
    for task in ("digits", "synthetic", "digits-cnn"):
        mine = [r for r in rows if r["task"] == task]
        assert {r["contender"] for r in mine} == set(CONTENDERS), task
        assert all(r["samples_per_s"] > 0 and r["node_samples_per_s"] > 0 for r in mine)
        assert all(r["syncs"] > 0 for r in mine if r["contender"] != "1x2")
        assert {r["contender"]: r.get("shards") for r in mine}["2x1/10/1"] == 1
        assert {r["contender"]: r.get("shards") for r in mine}["2x1/10"] == 2
    summary = (tmp_path / "summary.md").read_text()
    assert "digits: NumPy MLP" in summary and "synthetic: NumPy MLP" in summary
    assert "digits-cnn: torch CNN" in summary
    doc = json.loads((tmp_path / "results.json").read_text())["rows"]
    cpu = {r["contender"]: r for r in doc["cluster_cpu"]}
    assert set(cpu) == set(CONTENDERS)
    assert all(r["workers"] > 0 and r["window_s"] > 0 for r in cpu.values())
    assert cpu["1x2"]["shards"] == 0 and cpu["2x1/1"]["shards"] > 0  # no shard without a cluster
    assert [r["call"] for r in doc["cluster_calls"]][0] == "no-op"
    assert all(r["wall_us"] > 0 and r["actor_cpu_us"] > 0 for r in doc["cluster_calls"])


def test_versions_suite_needs_a_checkout_and_its_own_tasks(tmp_path):
    from paramserver.benchmarks import versions

    with pytest.raises(ValueError, match="needs --against DIR"):
        BenchConfig(suites="throughput,versions")  # refused before any suite runs
    with pytest.raises(ValueError, match="runs the tasks cnn, mlp; got --tasks mlp,embedding"):
        BenchConfig(suites="versions", against=str(tmp_path), tasks="mlp,embedding")
    BenchConfig(suites="throughput", tasks="embedding")  # the throughput suite has it
    with pytest.raises(ValueError, match="is not a paramserver checkout"):
        versions.stage(str(tmp_path), str(tmp_path / "staged"))
    (tmp_path / "paramserver").mkdir()
    (tmp_path / "paramserver" / "__init__.py").write_text("")
    with pytest.raises(ValueError, match="has no workers/ folder"):  # else this checkout's would load
        versions.stage(str(tmp_path), str(tmp_path / "staged"))


def test_versions_suite_stages_a_checkout_as_the_installed_package(tmp_path):
    from paramserver.benchmarks import versions

    root = pathlib.Path(__file__).resolve().parents[1]
    staged = pathlib.Path(versions.stage(str(root), str(tmp_path)))
    modules = ("api.py", "workers/worker.py", "models/torch_models.py", "benchmarks/versions.py")
    for module in (f"paramserver/{m}" for m in modules):
        assert (staged / module).is_file(), module
    assert not list(staged.rglob("__pycache__"))


@pytest.mark.slow  # 4 runs of paramserver.train in fresh interpreters: about 30 s on 2 cores
def test_versions_suite_compares_this_checkout_with_a_copy_of_itself(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "paramserver.benchmarks", "--suites", "versions", "--against", str(root),
           "--tasks", "mlp", "--workers", "1", "--repeats", "2", "--seconds", "0.5",
           "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]["versions"]
    assert sorted((r["revision"], r["repeat"]) for r in rows) == [
        ("other", 0),
        ("other", 1),
        ("this", 0),
        ("this", 1),
    ]
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert "| mlp | 1 |" in (tmp_path / "summary.md").read_text()


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
