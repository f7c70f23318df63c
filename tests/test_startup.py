"""Workers of torch runs are forked by a forkserver that imported torch once: the same
results as spawned workers, from a single-threaded forkserver."""

from __future__ import annotations

import multiprocessing.forkserver as forkserver
import os

import numpy as np
import pytest
from helpers import config, small

import paramserver as ps
from paramserver.supervise import worker_context

torch = pytest.importorskip("torch")


def _train_one_worker(data: ps.Dataset, start_method: str) -> dict[str, np.ndarray]:
    from paramserver.models.torch_models import MLP

    torch.manual_seed(0)
    model = MLP(64, 10, hidden=16)
    result = ps.train(model, small(data), config(workers=1, epochs=2, start_method=start_method))
    assert result.stop_reason == "epochs", result.stop_reason
    return result.params


def test_forkserver_worker_gives_bit_identical_parameters(digits: ps.Dataset) -> None:
    spawned = _train_one_worker(digits, "spawn")
    forked = _train_one_worker(digits, "forkserver")
    assert spawned.keys() == forked.keys()
    for name in spawned:
        assert np.array_equal(spawned[name], forked[name]), name


def test_forkserver_has_no_thread_pool_and_is_the_workers_parent() -> None:
    ctx, parent = worker_context("torch", "forkserver")
    assert ctx.get_start_method() == "forkserver"
    assert parent != os.getpid()
    # A pool in the forkserver would be missing (but believed present) in every worker it
    # forks: it must have imported torch and stayed single-threaded.
    threads = os.listdir(f"/proc/{parent}/task")
    assert len(threads) == 1, f"forkserver has {len(threads)} threads"
    assert forkserver._forkserver._forkserver_pid == parent  # type: ignore[attr-defined]


def test_tf_workers_are_always_spawned() -> None:
    ctx, parent = worker_context("tf")
    assert ctx.get_start_method() == "spawn" and parent == os.getpid()
    with pytest.raises(ValueError, match="tf backend's workers must be spawned"):
        worker_context("tf", "forkserver")


def test_start_method_is_validated() -> None:
    with pytest.raises(ValueError, match="start_method must be one of auto, spawn, forkserver"):
        ps.TrainConfig(start_method="fork")


@pytest.mark.slow
def test_startup_suite_measures_both_methods_and_judges_the_target(tmp_path) -> None:
    from paramserver.benchmarks import startup
    from paramserver.benchmarks.common import BenchConfig, Report

    cfg = BenchConfig(quick=True, suites="startup", out_dir=str(tmp_path))
    report = Report(cfg.out_dir, cfg)
    startup.run(cfg, report)
    rows = report.rows["startup"]
    assert {r["method"] for r in rows} == {"spawn", "forkserver cold", "forkserver warm"}
    for r in rows:
        assert 0 < r["first"] <= r["last"] < 120, r
        assert r["updates"] == startup.STEPS, r
    assert any("bit-identical" in n for n in report.notes["startup"]), report.notes
