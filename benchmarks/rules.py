"""Update rules at memory bandwidth: NumPy passes, compiled kernels, PyTorch's fused kernels.

    python -m paramserver.benchmarks --suites rules [--quick] --out-dir benchmarks/results/rules

Dense: each rule updates n float32 parameters (1e6 and 1e7) in place, on one
thread, as three implementations: the NumPy passes in blocks as the workers
ran them before (``apply_numpy`` through :class:`paramserver.optim.Updater`'s
block size), the compiled single-pass kernel (``apply``), and PyTorch's fused
CPU kernel (``torch._fused_adam_`` and kin) on ``torch.from_numpy`` views of the
same buffers, where PyTorch has one. A rule's bandwidth is its minimal traffic
(parameters and each state row read and written, the gradient read) over its
time; the ratio divides it by ``np.copyto``'s bandwidth on n float32, timed in
the same loop. The copy writes a destination it does not read, which costs the
cache an extra read per line (write-allocate) that in-place updates do not pay,
so a rule can pass 1.0.

Rows: 320 distinct rows of a 1,000,000 x 32 table get a gradient; a step is
coalescing it and updating the rows (``coalesce`` + ``apply_rows``), against
torch.optim.SGD / Adagrad / SparseAdam stepping on the same sparse COO
gradient (torch coalesces it inside ``step``) and NumPy fancy indexing (SGD).
Reported as rows per second.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserver.optim import UPDATE_BLOCK, UpdateRule, coalesce, make_rule

from .common import BenchConfig, Report

SUITE = "rules"
SIZES = (1_000_000, 10_000_000)
TARGET = 0.7
"""Every rule's compiled kernel at 0.7 or more of copy bandwidth, at 1e6 and 1e7."""
LR = 1e-3
STEP = 10
"""The step number the rules run at (bias corrections well away from 1)."""
DENSE: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd"},
    "sgd-m0.9": {"name": "sgd", "momentum": 0.9},
    "sgd-nesterov-wd": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    "adam": {"name": "adam"},
    "adamw": {"name": "adamw", "weight_decay": 0.01},
    "rmsprop": {"name": "rmsprop"},
    "adagrad": {"name": "adagrad"},
}
TABLE_ROWS, TABLE_DIM, TOUCHED = 1_000_000, 32, 320
MIN_REPEAT_SECONDS = 0.02
"""Each timed repeat runs the operation enough times to last at least this long."""


def _calls_per_repeat(fn: Callable[[], Any]) -> int:
    fn()  # the warm-up: loads or compiles a kernel, touches every page
    t = time.perf_counter()
    fn()
    return max(1, math.ceil(MIN_REPEAT_SECONDS / max(time.perf_counter() - t, 1e-7)))


def interleaved_best(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Best seconds of one call of each of ``fns`` over ``repeats`` rounds, each round running
    every one of them in turn, so that they all see the same machine and neighbours. Calls
    are timed one by one: on cores shared with other jobs, a call that a time slice did not
    cut short is the figure that compares implementations (a 1e6 update lasts 0.1-1 ms)."""
    counts = [_calls_per_repeat(f) for f in fns]
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, (f, count) in enumerate(zip(fns, counts, strict=True)):
            for _ in range(count):
                t = time.perf_counter()
                f()
                best[i] = min(best[i], time.perf_counter() - t)
    return best


def _numpy_blocked(rule: UpdateRule, p, g, state, scratch) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    def step() -> None:
        for lo in range(0, p.size, UPDATE_BLOCK):
            hi = min(lo + UPDATE_BLOCK, p.size)
            rule.apply_numpy(p[lo:hi], g[lo:hi], state[:, lo:hi], STEP, LR, scratch[:, : hi - lo])

    return step


def torch_fused_step(spec: dict[str, Any], p, g, state) -> Callable[[], None] | None:  # type: ignore[no-untyped-def]
    """PyTorch's fused CPU kernel for the rule, on ``torch.from_numpy`` views of our buffers,
    or None where it has none (RMSprop). These ``torch._fused_*_`` ops are private (checked
    with torch 2.13); the public ``torch.optim.X(fused=True)`` runs the same kernels but
    keeps its state in tensors of its own, never in the shared segment."""
    import torch

    tp, tg = [torch.from_numpy(p)], [torch.from_numpy(g)]
    ts = [torch.from_numpy(row) for row in state]
    steps = [torch.tensor(float(STEP))]
    name, wd = spec["name"], spec.get("weight_decay", 0.0)
    if name in ("adam", "adamw"):
        op = torch._fused_adamw_ if name == "adamw" else torch._fused_adam_
        return lambda: op(tp, tg, ts[:1], ts[1:], [], steps, lr=LR, beta1=0.9, beta2=0.999,
                          weight_decay=wd, eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
    if name == "sgd":
        mom = spec.get("momentum", 0.0)
        return lambda: torch._fused_sgd_(tp, tg, ts if mom else [], weight_decay=wd, momentum=mom, lr=LR,
                                         dampening=0.0, nesterov=spec.get("nesterov", False),
                                         maximize=False, is_first_step=False)  # fmt: skip
    if name == "adagrad":
        return lambda: torch._fused_adagrad_(tp, tg, ts, steps, lr=LR, lr_decay=0.0, weight_decay=wd,
                                             eps=1e-10, maximize=False)  # fmt: skip
    return None


def _dense(report: Report, sizes: tuple[int, ...], repeats: int, rng: np.random.Generator) -> list[list[Any]]:
    table = []
    for n in sizes:
        src = rng.standard_normal(n).astype(np.float32)
        dst = np.empty_like(src)
        for label, spec in DENSE.items():
            rule = make_rule(**spec)
            bufs = {}
            fns: dict[str, Callable[[], Any]] = {"copy": lambda: np.copyto(dst, src)}  # noqa: B023
            for impl in ("numpy", "numba", "torch-fused"):
                p = (src * 0.1).astype(np.float32)
                g = (rng.standard_normal(n) * 0.01).astype(np.float32)
                state = np.full((rule.state_slots, n), 0.01, np.float32)  # no 0/0 in the first steps
                scratch = np.zeros((rule.scratch_slots, UPDATE_BLOCK), np.float32)
                bufs[impl] = (p, state)
                if impl == "numpy":
                    fns[impl] = _numpy_blocked(rule, p, g, state, scratch)
                elif impl == "numba":
                    fns[impl] = lambda r=rule, p=p, g=g, s=state: r.apply(p, g, s, STEP, LR, None)
                else:
                    fused = torch_fused_step(spec, p, g, state)
                    if fused is not None:
                        fns[impl] = fused
            seconds = dict(zip(fns, interleaved_best(list(fns.values()), repeats), strict=True))
            for impl, (p, state) in bufs.items():
                assert np.isfinite(p).all() and np.isfinite(state).all(), f"{label} {impl} went non-finite"
            copy_gbps = 2 * src.nbytes / seconds["copy"] / 1e9
            min_bytes = n * 4 * (3 + 2 * rule.state_slots)
            ratios = {}
            for impl in ("numpy", "numba", "torch-fused"):
                if impl not in seconds:
                    continue
                gbps = min_bytes / seconds[impl] / 1e9
                ratios[impl] = gbps / copy_gbps
                report.add(
                    SUITE,
                    {"what": "dense", "rule": label, "n": n, "impl": impl, "seconds": seconds[impl],
                     "gbps": gbps, "copy_gbps": copy_gbps, "of_copy_bw": ratios[impl]},
                )  # fmt: skip
            table.append([label, f"{n:.0e}", copy_gbps, ratios["numpy"], ratios["numba"],
                          ratios.get("torch-fused", math.nan),
                          "met" if ratios["numba"] >= TARGET else "MISSED"])  # fmt: skip
    return table


def _rows(report: Report, repeats: int, rng: np.random.Generator) -> list[list[Any]]:
    import torch

    rows_touched = np.sort(rng.choice(TABLE_ROWS, TOUCHED, replace=False)).astype(np.int64)
    ids = rng.permutation(rows_touched)  # unsorted, as an embedding's backward gives them
    values = (rng.standard_normal((TOUCHED, TABLE_DIM)) * 0.01).astype(np.float32)
    init = (rng.standard_normal((TABLE_ROWS, TABLE_DIM)) * 0.1).astype(np.float32)
    table = []
    for name, make_torch in [
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=LR)),
        ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=LR)),
        ("adam", lambda ps: torch.optim.SparseAdam(ps, lr=LR)),
    ]:
        rule = make_rule(name)
        ours_t, ours_s = init.copy(), np.zeros((rule.state_slots, TABLE_ROWS, TABLE_DIM), np.float32)
        torch_t = init.copy()
        param = torch.nn.Parameter(torch.from_numpy(torch_t))
        param.grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], torch.from_numpy(values),
                                             (TABLE_ROWS, TABLE_DIM))  # fmt: skip
        opt = make_torch([param])
        counter = iter(range(1, 10**9))

        def ours() -> None:
            r, v = coalesce(ids, values)  # noqa: B023
            rule.apply_rows(ours_t, ours_s, r, v, next(counter), LR)  # noqa: B023

        fns: dict[str, Callable[[], Any]] = {"ours": ours, "torch": opt.step}
        if name == "sgd":
            fancy_t = init.copy()

            def fancy() -> None:
                order = np.argsort(ids)  # noqa: B023
                fancy_t[ids[order]] -= values[order] * np.float32(LR)  # noqa: B023

            fns["numpy-fancy"] = fancy
        seconds = dict(zip(fns, interleaved_best(list(fns.values()), repeats), strict=True))
        rate = {k: TOUCHED / s for k, s in seconds.items()}
        for impl, s in seconds.items():
            row = {"what": "rows", "rule": name, "impl": impl, "rows": TOUCHED, "seconds": s}
            report.add(SUITE, {**row, "table": f"{TABLE_ROWS}x{TABLE_DIM}", "rows_per_s": rate[impl]})
        table.append(
            [
                name,
                rate["ours"],
                rate["torch"],
                rate["ours"] / rate["torch"],
                rate.get("numpy-fancy", math.nan),
            ]
        )
        del param, opt
    return table


def run(cfg: BenchConfig, report: Report) -> None:
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(cfg.seed)
    repeats = 3 if cfg.quick else max(cfg.repeats, 7)
    torch.set_num_threads(1)  # one thread per worker, as the workers run
    load_before = os.getloadavg()[0]
    with threadpool_limits(1):
        dense = _dense(report, SIZES, repeats, rng)
        rows = _rows(report, repeats, rng)
    report.note(
        SUITE,
        f"numba {numba.__version__}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"on {len(os.sched_getaffinity(0))} cores (above the core count, other jobs shared the machine)",
    )
    report.note(
        SUITE,
        f"dense: one thread, float32, the best single call over {repeats} interleaved rounds; "
        "'of copy' = the rule's minimal traffic per second over np.copyto's on the same n, measured "
        "in the same loop; "
        f"target {TARGET} for the compiled kernel",
    )
    report.table(
        SUITE,
        [
            "rule",
            "n",
            "copy GB/s",
            "numpy passes (of copy)",
            "numba (of copy)",
            "torch fused (of copy)",
            "target",
        ],
        dense,
    )
    missed = [f"{r[0]} at {r[1]}" for r in dense if r[-1] != "met"]
    report.note(SUITE, "every rule met the target" if not missed else f"missed: {', '.join(missed)}")
    report.note(
        SUITE,
        f"rows: {TOUCHED} distinct rows of a {TABLE_ROWS:,} x {TABLE_DIM} float32 table per step, "
        "coalesce + apply_rows against torch.optim on the same sparse COO gradient (one thread)",
    )
    report.table(SUITE, ["rule", "ours rows/s", "torch rows/s", "ours / torch", "numpy fancy rows/s"], rows)
