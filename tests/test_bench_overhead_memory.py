"""Smoke tests of the overhead and memory benchmark suites: they run, measure, and judge.

    .venv/bin/python -m pytest tests/test_bench_overhead_memory.py

No timing or memory figure is asserted (speed is for the benchmarks); the tests check
that every figure was measured (positive, finite), that the targets are judged in
the notes, that the plots exist and that nothing is left in /dev/shm (conftest).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from paramserver.benchmarks import memory, overhead
from paramserver.benchmarks.common import BenchConfig, Report


def _report(tmp_path, suites: str, **kw) -> tuple[BenchConfig, Report]:
    cfg = BenchConfig(quick=True, suites=suites, out_dir=str(tmp_path), **kw)
    return cfg, Report(cfg.out_dir, cfg)


def _positive(row: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(row[k], float | int) and math.isfinite(row[k]) and row[k] > 0, (k, row)


def test_overhead_suite_measures_every_rule_and_policy_and_judges_the_target(tmp_path):
    cfg, report = _report(tmp_path, "overhead")
    # Tiny vectors, and the target judged from the larger one so that the profile
    # of a rule that misses runs too: the same code path as run(), smaller.
    sizes = (1_024, 20_000)
    overhead.measure(cfg, report, sizes=sizes, cnn_steps=5, target_min_size=20_000)
    rows = report.rows["overhead"]
    updates = [r for r in rows if r["what"] == "update"]
    assert {(r["rule"], r["policy"], r["n"]) for r in updates} == {
        (rule, policy, n) for rule in overhead.RULES for policy in overhead.POLICIES for n in sizes
    }
    for r in updates:
        _positive(r, "seconds", "gbps", "copy_seconds", "copy_gbps", "bw_fraction", "copy_ratio")
    handoff = [r for r in rows if r["what"] == "handoff"]
    assert [r["n"] for r in handoff] == list(sizes)
    for r in handoff:
        _positive(r, "fill_seconds", "fill_gbps", "check_seconds", "check_gbps")
    (cnn,) = [r for r in rows if r["what"] == "cnn-step"]
    _positive(cnn, "forward_seconds", "backward_seconds", "fill_seconds", "check_seconds",
              "update_seconds", "paramserver_fraction")  # fmt: skip
    assert cnn["paramserver_fraction"] < 1
    notes = report.notes["overhead"]
    targets = [n for n in notes if n.startswith("target ")]
    assert len(targets) == len(overhead.RULES)
    assert all(("MET" in n) != ("MISSED" in n) and "copy bandwidth" in n for n in targets)
    missed = [n.split()[1] for n in targets if "MISSED" in n]
    profiled = {r["rule"] for r in rows if r["what"] == "profile-total"}
    assert profiled == set(missed)
    assert any(n.startswith("cnn: pull is zero copy") for n in notes)
    assert os.path.isfile(tmp_path / "overhead-update-vs-size.png")


def test_overhead_profile_ops_match_each_rule_and_are_all_timed(tmp_path):
    cfg, report = _report(tmp_path, "overhead")
    rules = list(overhead.RULES)
    overhead._profile(report, rules, np.random.default_rng(0), 3, 5_000)  # checks the op lists bitwise
    rows = report.rows["overhead"]
    totals = {r["rule"]: r for r in rows if r["what"] == "profile-total"}
    assert set(totals) == set(rules)
    for r in totals.values():
        _positive(r, "sum_of_ops_seconds", "apply_seconds", "blocked_seconds")
        assert r["rw_per_param"] >= r["min_rw_per_param"]
    for r in (r for r in rows if r["what"] == "profile"):
        _positive(r, "seconds", "gbps")
    assert len([n for n in report.notes["overhead"] if n.startswith("profile ")]) == len(rules)


def test_overhead_run_in_quick_mode_uses_the_quick_sizes(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(overhead, "measure", lambda cfg, report, **kw: seen.update(kw))
    cfg, report = _report(tmp_path, "overhead")
    overhead.run(cfg, report)
    assert seen["sizes"] == overhead.QUICK_SIZES
    assert max(seen["sizes"]) >= overhead.TARGET_MIN_SIZE, "quick mode must still judge the target"


def test_memory_suite_reads_every_process_and_judges_the_target(tmp_path):
    cfg, report = _report(tmp_path, "memory", workers="1,2")
    memory.run(cfg, report)
    rows = report.rows["memory"]
    for system in memory.SYSTEMS:
        for size in ("big", "tiny"):
            for n in (1, 2):
                procs = [
                    r for r in rows
                    if (r["system"], r.get("model"), r["workers"]) == (system, size, n)
                    and r["process"] != "total"
                ]  # fmt: skip
                assert sorted(r["process"] for r in procs) == ["server"] + [f"worker {i}" for i in range(n)]
                for r in procs:
                    _positive(r, "pss_mib", "uss_mib", "rss_mib")
    growth = [r for r in rows if r["process"] == "growth"]
    assert {(r["system"], r["workers"]) for r in growth} == {(s, 2) for s in memory.SYSTEMS}
    for r in growth:
        assert math.isfinite(r["param_memory_fraction"])
        assert r["param_bytes"] >= memory.MIN_PARAMS * 4
    notes = report.notes["memory"]
    (target,) = [n for n in notes if n.startswith("target paramserver")]
    assert ("MET" in target) != ("MISSED" in target) and "5%" in target
    assert os.path.isfile(tmp_path / "memory-total-pss.png")


def test_memory_suite_refuses_a_model_below_ten_million_parameters(tmp_path):
    cfg, report = _report(tmp_path, "memory")
    with pytest.raises(ValueError, match="at least"):
        memory.measure(cfg, report, counts=[1], big={"hidden": 64, "layers": 1})
