"""Runs the chosen suites in one process and saves the report after each one.

python -m paramserver.benchmarks --quick            # or: paramserver bench --quick
"""

from __future__ import annotations

import importlib
import time

from .common import SUITE_MODULES, BenchConfig, Report


def run(cfg: BenchConfig) -> Report:
    report = Report(cfg.out_dir, cfg)
    for suite in cfg.suite_list:
        t = time.perf_counter()
        print(f"== {suite}", flush=True)
        module = importlib.import_module(f"paramserver.benchmarks.{SUITE_MODULES.get(suite, suite)}")
        module.run(cfg, report)
        report.note(suite, f"suite time {time.perf_counter() - t:.0f} s")
        report.save()  # what is measured survives a later suite's failure
    print(f"results written to {cfg.out_dir} (results.json, summary.md, plots)", flush=True)
    return report
