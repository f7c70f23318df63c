"""Suite "overhead": what paramserver's own work costs per step, against a plain copy.

    python -m paramserver.benchmarks --suites overhead [--quick]

Four measurements, all in this process, on real ``ParamStore`` segments:

1. **update**: one ``store.push(rank, backward, apply)`` of a ready gradient, where ``apply`` runs the
   update rule over ``[lo:hi]`` exactly as ``workers/worker.py`` does (state in the
   segment, scratch rows allocated once, ``t`` from the store's version), for each
   rule and policy and flat vectors of 1e4 to 1e7 float32, side by side with
   ``np.copyto`` of the parameter vector: best of several repeats each, the repeats of
   the two interleaved so that both see the same machine.
2. **hand-off**: the worker's own work between backward and the update:
   ``grad.fill(0)`` (torch backend, before backward) and ``np.isfinite(grad.sum())``.
3. **profile**: where an update misses the target, the time of each NumPy pass of
   the rule (checked bitwise against the rule itself), and the same rule applied in
   cache-sized blocks, to show what the time goes to.
4. **cnn**: the worker's real step (``workers.worker.prepare``) on PyTorch's Hogwild
   CNN (batch 64, one thread) and a data segment, interleaved with the same model's
   forward and backward alone: paramserver's part is the difference (batch slice,
   ``grad.fill``, the finiteness check, the update under po3, the counters).

Bytes: a copy of ``n`` float32 moves ``8n`` bytes (read ``src``, write ``dst``). An
update moves at least the bytes it must read and write: the parameters (read and
write), the gradient (read) and each optimizer-state row (read and write), i.e.
``4n * (3 + 2 * state_rows)``. GB/s is that minimum over the time; the fraction of
copy bandwidth is the update's GB/s over the copy's GB/s (temporaries the rule
writes and reads back are not counted: they are the overhead being measured).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.layout import Layout
from paramserver.optim import UPDATE_BLOCK, Updater, UpdateRule, make_rule
from paramserver.policy import POLICIES, make_policy
from paramserver.store import Gradient, ParamStore

from .common import BenchConfig, Report, timed

SUITE = "overhead"
SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 1_000_000)
RULES: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd"},
    "sgd-m0.9": {"name": "sgd", "momentum": 0.9},
    "adam": {"name": "adam"},
    "rmsprop": {"name": "rmsprop"},
}
STRIPES = 8
LR = 1e-3
TARGET_MIN_SIZE = 1_000_000
TARGET_FRACTION = 0.5
"""The issue's target: updates of 1e6+ parameters at 50% or more of copy bandwidth."""
BLOCK = UPDATE_BLOCK
"""Elements per block in the blocked-update experiment (64 KiB per float32 row)."""
MIN_REPEAT_SECONDS = 0.01
"""Each timed repeat runs the operation enough times to last at least this long."""
CNN_BATCH = 64
CNN_WARMUP = 5


def run(cfg: BenchConfig, report: Report) -> None:
    measure(cfg, report, sizes=QUICK_SIZES if cfg.quick else SIZES, cnn_steps=50)


def measure(
    cfg: BenchConfig,
    report: Report,
    *,
    sizes: tuple[int, ...],
    cnn_steps: int,
    rules: tuple[str, ...] = tuple(RULES),
    policies: tuple[str, ...] = POLICIES,
    target_min_size: int = TARGET_MIN_SIZE,
) -> None:
    """The whole suite, on vectors of ``sizes``; the target is judged on sizes of at least
    ``target_min_size`` (the tests pass tiny ones of both)."""
    repeats = 5 if cfg.quick else 9
    rng = np.random.default_rng(cfg.seed)
    ctx = mp.get_context("spawn")  # the server's context: its locks are what workers take
    results: list[UpdateResult] = []
    handoff: list[dict[str, Any]] = []
    for n in sizes:
        layout = Layout.pack({"w": ((n,), np.float32)})
        assert layout.flat_size == n, f"sizes must be multiples of 16 (64-byte rows), got {n}"
        slots = max(make_rule(**RULES[r]).state_slots for r in rules)
        with ParamStore.create_for(layout, workers=1, state_slots=slots) as store:
            results += _measure_updates(store, rules, policies, ctx, rng, repeats, report)
            handoff.append(_measure_handoff(store, rng, repeats, report))
    _update_tables(report, results)
    report.note(
        SUITE,
        f"timing: best of {repeats} repeats, each repeat at least {MIN_REPEAT_SECONDS * 1e3:.0f} ms of calls "
        "after a warm-up call; each update's repeats interleaved with those of its np.copyto, whose "
        "time is the reference for that row. Bytes: copy 8n, update 4n x (3 + 2 x state rows)",
    )
    _handoff_table(report, handoff, results)
    missed = _target_notes(report, results, target_min_size)
    if missed:
        _profile(report, list(missed), rng, repeats, max(sizes))
    _cnn_step(cfg, report, cnn_steps)
    _plot(report, results)


# -- 1. update vs copy -------------------------------------------------------------------


@dataclass
class UpdateResult:
    rule: str
    policy: str
    n: int
    seconds: float
    copy_seconds: float
    min_bytes: int
    copy_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.min_bytes / self.seconds / 1e9

    @property
    def copy_gbps(self) -> float:
        return self.copy_bytes / self.copy_seconds / 1e9

    @property
    def bw_fraction(self) -> float:
        return self.gbps / self.copy_gbps

    @property
    def copy_ratio(self) -> float:
        """One copy of the parameter vector over one update (1.0: as fast as a copy)."""
        return self.copy_seconds / self.seconds


def _repeat_count(fn: Callable[[], Any]) -> int:
    """Calls per timed repeat so that one repeat lasts at least MIN_REPEAT_SECONDS."""
    t = time.perf_counter()
    fn()  # also the warm-up: touches every page of every buffer
    once = max(time.perf_counter() - t, 1e-7)
    return max(1, math.ceil(MIN_REPEAT_SECONDS / once))


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best-of-``repeats`` seconds per call (after a warm-up call)."""
    return timed(fn, repeat=repeats, number=_repeat_count(fn))


def interleaved_best(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Best-of-``repeats`` seconds per call of each of ``fns``, their repeats interleaved so
    that all see the same machine (caches, clock, neighbours) and their ratios are stable."""
    counts = [_repeat_count(f) for f in fns]
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            best[i] = min(best[i], timed(f, repeat=1, number=counts[i]))
    return best


def _rule_min_bytes(rule: UpdateRule, n: int, itemsize: int) -> int:
    # params read + written, gradient read, each state row read + written
    return n * itemsize * (3 + 2 * rule.state_slots)


def _measure_updates(
    store: ParamStore,
    rules: tuple[str, ...],
    policies: tuple[str, ...],
    ctx: Any,
    rng: np.random.Generator,
    repeats: int,
    report: Report,
) -> list[UpdateResult]:
    params = store.params
    n = params.size
    init = (rng.standard_normal(n) * 0.1).astype(params.dtype)
    grad = (rng.standard_normal(n) * 0.01).astype(params.dtype)  # the worker's local gradient
    copy_dst = np.empty_like(params)
    copy_bytes = 2 * params.nbytes
    out = []
    for rule_name in rules:
        rule = make_rule(**RULES[rule_name])
        for policy_name in policies:
            params[...] = init
            store.state[...] = 0
            policy = make_policy(policy_name, n, ctx, stripes=STRIPES)
            seconds, copy_seconds = _time_step(store, rule, policy, grad, copy_dst, repeats)
            assert np.isfinite(params).all(), f"{rule_name} produced non-finite parameters"
            res = UpdateResult(
                rule_name, policy_name, n, seconds, copy_seconds,
                _rule_min_bytes(rule, n, params.itemsize), copy_bytes,
            )  # fmt: skip
            out.append(res)
            report.add(
                SUITE,
                {
                    "what": "update",
                    "rule": rule_name,
                    "policy": policy_name,
                    "n": n,
                    "seconds": seconds,
                    "gbps": res.gbps,
                    "copy_seconds": copy_seconds,
                    "copy_gbps": res.copy_gbps,
                    "bw_fraction": res.bw_fraction,
                    "copy_ratio": res.copy_ratio,
                    "min_bytes": res.min_bytes,
                },
            )
    return out  # the views die with this frame, before the caller closes the segment


def _time_step(
    store: ParamStore,
    rule: UpdateRule,
    policy: Any,
    grad: np.ndarray,
    copy_dst: np.ndarray,
    repeats: int,
) -> tuple[float, float]:
    """Best seconds of one ``store.push`` (under ``policy``) of a ready gradient through the
    worker's ``Updater``, and of ``np.copyto`` of the parameter vector, interleaved with it."""
    params = store.params
    state = store.state[: rule.state_slots]  # shared state, the worker's default
    gradient = Gradient(grad, finite=bool(np.isfinite(grad.sum())))
    store.policy = policy
    update = Updater(rule, params, grad, state, LR)  # what a worker applies with

    def apply(g: Gradient, a: int, b: int) -> None:
        if not g.finite:
            return
        update.t = store.version() + 1  # shared state: Adam's step counts every update
        update(a, b)

    def ready() -> Gradient:
        return gradient

    step, copy = interleaved_best(
        [lambda: store.push(0, ready, apply), lambda: np.copyto(copy_dst, params)], repeats
    )
    store.policy = None
    return step, copy


def _update_tables(report: Report, results: list[UpdateResult]) -> None:
    sizes = sorted({r.n for r in results})
    policies = list(dict.fromkeys(r.policy for r in results))
    by = {(r.rule, r.policy, r.n): r for r in results}
    copies = {n: [r.copy_seconds for r in results if r.n == n] for n in sizes}
    report.table(
        SUITE,
        ["n", "copy s (best of all)", "copy GB/s (8n bytes)", "worst of the paired copies s"],
        [[n, min(c), 8 * n / min(c) / 1e9, max(c)] for n, c in copies.items()],
    )
    header = ["rule", "n", "min bytes/n"] + [f"{p} s" for p in policies]
    header += [f"{p} GB/s" for p in policies] + [f"{p} of copy bw" for p in policies]
    header += ["po3: copy/update time" if "po3" in policies else f"{policies[0]}: copy/update time"]
    ref = "po3" if "po3" in policies else policies[0]
    rows = []
    for rule in dict.fromkeys(r.rule for r in results):
        for n in sizes:
            rs = [by[rule, p, n] for p in policies]
            rows.append(
                [rule, n, rs[0].min_bytes // n]
                + [r.seconds for r in rs]
                + [r.gbps for r in rs]
                + [r.bw_fraction for r in rs]
                + [by[rule, ref, n].copy_ratio]
            )
    report.table(SUITE, header, rows)


def _target_notes(
    report: Report, results: list[UpdateResult], min_size: int
) -> dict[str, list[UpdateResult]]:
    """One met/missed note per rule; returns the rules that missed, with their results."""
    missed: dict[str, list[UpdateResult]] = {}
    big = [r for r in results if r.n >= min_size]
    if not big:
        report.note(
            SUITE,
            f"target (updates of {min_size:.0e}+ parameters at >= {TARGET_FRACTION:.0%} of "
            "copy bandwidth): not judged, no size this large was measured",
        )
        return missed
    for rule in dict.fromkeys(r.rule for r in big):
        rs = [r for r in big if r.rule == rule]
        worst = min(rs, key=lambda r: r.bw_fraction)
        po3 = ", ".join(
            f"n={r.n:.0e}: {r.bw_fraction:.2f} ({r.gbps:.1f} of {r.copy_gbps:.1f} GB/s; "
            f"copy/update time {r.copy_ratio:.2f})"
            for r in rs
            if r.policy == "po3"
        )
        ok = worst.bw_fraction >= TARGET_FRACTION
        report.note(
            SUITE,
            f"target {rule} (updates of {min_size:.0e}+ parameters at >= {TARGET_FRACTION:.0%} "
            f"of copy bandwidth, bytes = the minimum the rule must move): {'MET' if ok else 'MISSED'}; "
            f"po3 {po3 or 'not measured'}; lowest over policies and sizes {worst.bw_fraction:.2f} "
            f"({worst.policy}, n={worst.n:.0e})",
        )
        if not ok:
            missed[rule] = rs
    return missed


# -- 2. gradient hand-off -------------------------------------------------------------------


def _measure_handoff(
    store: ParamStore, rng: np.random.Generator, repeats: int, report: Report
) -> dict[str, Any]:
    n = store.params.size
    grad = (rng.standard_normal(n) * 0.01).astype(store.params.dtype)  # local, as the worker's
    fill = best_time(lambda: grad.fill(0), repeats)
    grad[...] = rng.standard_normal(n)
    check = best_time(lambda: bool(np.isfinite(grad.sum())), repeats)
    row = {
        "what": "handoff",
        "n": n,
        "fill_seconds": fill,
        "fill_gbps": grad.nbytes / fill / 1e9,  # bytes written
        "check_seconds": check,
        "check_gbps": grad.nbytes / check / 1e9,  # bytes read
    }
    report.add(SUITE, row)
    return row


def _handoff_table(report: Report, handoff: list[dict[str, Any]], results: list[UpdateResult]) -> None:
    ref = {r.n: r for r in results if r.rule == "sgd-m0.9" and r.policy == "po3"}
    header = ["n", "grad.fill(0) s", "fill GB/s (4n written)", "isfinite(sum) s", "check GB/s (4n read)"]
    if ref:
        header.append("both / sgd-m0.9 po3 update")
    rows = []
    for h in handoff:
        row = [h["n"], h["fill_seconds"], h["fill_gbps"], h["check_seconds"], h["check_gbps"]]
        if ref:
            row.append((h["fill_seconds"] + h["check_seconds"]) / ref[h["n"]].seconds)
        rows.append(row)
    report.table(SUITE, header, rows)


# -- 3. profile of a rule that misses ---------------------------------------------------------


def rule_ops(rule: UpdateRule, p, g, state, t, lr, scratch) -> list[tuple[str, int, Callable[[], Any]]]:  # type: ignore[no-untyped-def]
    """The NumPy passes of ``rule.apply`` one by one (no weight decay, no Nesterov):
    ``(label, elements read + written per parameter, call)``. ``_check_ops`` proves
    in each run that they compute exactly what the rule computes."""
    s = scratch[1]
    name = type(rule).__name__
    if name == "SGD" and not rule.momentum:
        return [
            ("multiply(g, lr, out=s)", 2, lambda: np.multiply(g, lr, out=s)),
            ("p -= s", 3, lambda: np.subtract(p, s, out=p)),
        ]
    if name == "SGD":
        buf = state[0]
        return [
            ("buf *= momentum", 2, lambda: np.multiply(buf, rule.momentum, out=buf)),
            ("buf += g", 3, lambda: np.add(buf, g, out=buf)),
            ("multiply(buf, lr, out=s)", 2, lambda: np.multiply(buf, lr, out=s)),
            ("p -= s", 3, lambda: np.subtract(p, s, out=p)),
        ]
    if name == "Adam":
        m, v = state[0], state[1]
        bc1 = 1.0 - rule.beta1**t
        bc2 = 1.0 - rule.beta2**t
        return [
            ("multiply(g, g, out=s)", 2, lambda: np.multiply(g, g, out=s)),
            ("v *= beta2", 2, lambda: np.multiply(v, rule.beta2, out=v)),
            ("s *= 1 - beta2", 2, lambda: np.multiply(s, 1.0 - rule.beta2, out=s)),
            ("v += s", 3, lambda: np.add(v, s, out=v)),
            ("subtract(g, m, out=s)", 3, lambda: np.subtract(g, m, out=s)),
            ("s *= 1 - beta1", 2, lambda: np.multiply(s, 1.0 - rule.beta1, out=s)),
            ("m += s", 3, lambda: np.add(m, s, out=m)),
            ("sqrt(v, out=s)", 2, lambda: np.sqrt(v, out=s)),
            ("s /= sqrt(bc2)", 2, lambda: np.divide(s, math.sqrt(bc2), out=s)),
            ("s += eps", 2, lambda: np.add(s, rule.eps, out=s)),
            ("divide(m, s, out=s)", 3, lambda: np.divide(m, s, out=s)),
            ("s *= lr / bc1", 2, lambda: np.multiply(s, lr / bc1, out=s)),
            ("p -= s", 3, lambda: np.subtract(p, s, out=p)),
        ]
    if name == "RMSProp":
        v = state[0]
        return [
            ("multiply(g, g, out=s)", 2, lambda: np.multiply(g, g, out=s)),
            ("s *= 1 - alpha", 2, lambda: np.multiply(s, 1.0 - rule.alpha, out=s)),
            ("v *= alpha", 2, lambda: np.multiply(v, rule.alpha, out=v)),
            ("v += s", 3, lambda: np.add(v, s, out=v)),
            ("sqrt(v, out=s)", 2, lambda: np.sqrt(v, out=s)),
            ("s += eps", 2, lambda: np.add(s, rule.eps, out=s)),
            ("divide(g, s, out=s)", 3, lambda: np.divide(g, s, out=s)),
            ("s *= lr", 2, lambda: np.multiply(s, lr, out=s)),
            ("p -= s", 3, lambda: np.subtract(p, s, out=p)),
        ]
    raise AssertionError(f"no op list for {name}")


def _buffers(rule: UpdateRule, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    p = (rng.standard_normal(n) * 0.1).astype(np.float32)
    g = (rng.standard_normal(n) * 0.01).astype(np.float32)
    state = np.abs(rng.standard_normal((rule.state_slots, n)) * 1e-4).astype(np.float32)
    scratch = np.zeros((rule.scratch_slots, n), np.float32)
    return p, g, state, scratch


def _check_ops(rule: UpdateRule, rng: np.random.Generator) -> None:
    """The op list must compute bitwise what ``rule.apply`` computes, or the profile lies."""
    p, g, state, scratch = _buffers(rule, 1000, rng)
    p2, state2, scratch2 = p.copy(), state.copy(), scratch.copy()
    for _label, _rw, op in rule_ops(rule, p2, g, state2, 7, LR, scratch2):
        op()
    rule.apply(p, g, state, 7, LR, scratch)
    assert np.array_equal(p, p2) and np.array_equal(state, state2), (
        f"the profile's op list for {type(rule).__name__} no longer matches paramserver.optim; "
        "update rule_ops"
    )


def _profile(report: Report, rules: list[str], rng: np.random.Generator, repeats: int, n: int) -> None:
    """Time each NumPy pass of every rule that missed, and the rule applied in blocks."""
    copy_dst = np.empty(n, np.float32)
    src = rng.standard_normal(n).astype(np.float32)

    def copy() -> None:
        np.copyto(copy_dst, src)

    for rule_name in rules:
        rule = make_rule(**RULES[rule_name])
        _check_ops(rule, rng)
        p, g, state, scratch = _buffers(rule, n, rng)
        # Each pass is timed inside the real sequence (one pass timed over and over would
        # drive its values to zero or infinity, and denormals are slow), next to a copy.
        ops = rule_ops(rule, p, g, state, 10, LR, scratch)
        calls = [copy] + [op for _label, _rw, op in ops]
        best = [math.inf] * len(calls)
        copy()  # warm-up
        for _ in range(max(repeats, 5)):
            for i, call in enumerate(calls):
                t = time.perf_counter()
                call()
                best[i] = min(best[i], time.perf_counter() - t)

        def whole() -> None:
            rule.apply(p, g, state, 10, LR, scratch)  # noqa: B023

        def blocked() -> None:
            for lo in range(0, n, BLOCK):
                hi = min(lo + BLOCK, n)
                rule.apply(p[lo:hi], g[lo:hi], state[:, lo:hi], 10, LR, scratch[:, lo:hi])  # noqa: B023

        whole_s, blocked_s, copy_s = interleaved_best([whole, blocked, copy], repeats)
        copy_gbps = 2 * src.nbytes / min(copy_s, best[0]) / 1e9
        rows = []
        for (label, rw, _op), sec in zip(ops, best[1:], strict=True):
            gbps = rw * p.itemsize * n / sec / 1e9
            rows.append([label, rw, sec, gbps, gbps / copy_gbps])
            report.add(
                SUITE,
                {"what": "profile", "rule": rule_name, "n": n, "op": label, "rw_per_param": rw,
                 "seconds": sec, "gbps": gbps, "of_copy_bw": gbps / copy_gbps},
            )  # fmt: skip
        total = sum(best[1:])
        total_rw = sum(rw for _label, rw, _op in ops)
        min_bytes = _rule_min_bytes(rule, n, p.itemsize)
        min_rw = min_bytes // n // p.itemsize
        report.add(
            SUITE,
            {"what": "profile-total", "rule": rule_name, "n": n, "passes": len(rows),
             "rw_per_param": total_rw, "min_rw_per_param": min_rw, "copy_gbps": copy_gbps,
             "sum_of_ops_seconds": total, "apply_seconds": whole_s,
             "blocked_seconds": blocked_s, "block": BLOCK,
             "apply_of_copy_bw": min_bytes / whole_s / 1e9 / copy_gbps,
             "blocked_of_copy_bw": min_bytes / blocked_s / 1e9 / copy_gbps},
        )  # fmt: skip
        report.table(
            SUITE,
            [f"{rule_name} n={n:.0e}: pass", "elements r+w per param", "s", "GB/s (its r+w)", "of copy bw"],
            rows,
        )
        slow = [r for r in rows if r[4] < TARGET_FRACTION]
        if slow:
            listed = ", ".join(f"{r[0]} at {r[4]:.2f}, {r[2] / total:.0%} of the time" for r in slow)
            verdict = (
                f"slow passes (below {TARGET_FRACTION:.0%} of copy bandwidth on their own bytes): {listed}"
            )
        else:
            verdict = (
                f"every pass runs at {min(r[4] for r in rows):.2f} of copy bandwidth or more on its own "
                f"bytes, so no op is slow: the cost is the number of passes, {total_rw / min_rw:.1f}x "
                "the bytes the update needs"
            )
        report.note(
            SUITE,
            f"profile {rule_name} n={n:.0e}: rule.apply is {len(rows)} NumPy passes moving "
            f"{total_rw} elements per parameter where {min_rw} are needed (temporaries written to "
            f"the scratch row and read back); the passes take {total * 1e3:.3f} ms together "
            f"(apply: {whole_s * 1e3:.3f} ms); {verdict}. Applied as workers apply it (paramserver.optim."
            f"Updater: blocks of {BLOCK} elements, so that its temporaries stay in cache) it "
            f"takes {blocked_s * 1e3:.3f} ms, {min_bytes / blocked_s / 1e9 / copy_gbps:.2f} of copy "
            f"bandwidth vs {min_bytes / whole_s / 1e9 / copy_gbps:.2f} for one apply over the whole vector.",
        )


# -- 4. a real CNN step: torch work vs paramserver's part --------------------------------------


def _cnn_step(cfg: BenchConfig, report: Report, steps: int) -> None:
    import torch

    from paramserver import Dataset, TrainConfig, model_spec
    from paramserver.data import share_training_data
    from paramserver.models.torch_models import HogwildNet
    from paramserver.workers.worker import SupervisedTask, WorkerPlan, prepare

    config = TrainConfig(workers=1, batch_size=CNN_BATCH, epochs=10**6, out_dir="", progress=False)
    rule = config.update_rule()  # the rule a default run uses (sgd, its momentum and lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        x = rng.standard_normal((CNN_BATCH * 8, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, CNN_BATCH * 8).astype(np.int64)
        data = Dataset(x, y, x[:1], y[:1], 10, "cnn-step")
        spec, layout, init = model_spec(HogwildNet(), None, cfg.seed, data)
        with (
            ParamStore.create_for(layout, workers=1, state_slots=rule.state_slots) as store,
            share_training_data(data) as shared,
        ):
            store.params[...] = init
            store.policy = make_policy("po3", layout.flat_size, None)
            task = SupervisedTask(spec, shared, CNN_BATCH, config.epochs)
            plan = WorkerPlan(rank=0, workers=1, cores=None, threads=1, parent_pid=os.getppid())
            marks: list[tuple[str, float]] = []
            clock = time.perf_counter

            def probe(phase: str) -> None:
                marks.append((phase, clock()))

            step = prepare(plan, store, task, config, probe=probe)  # the worker's own step function
            figures = _cnn_steps(step, task, marks, layout.unflatten(store.params), steps)
            del step
            task.close()
            store.unbind()  # the policy's view of the worker's counter row
    finally:
        torch.set_num_threads(threads)
    torch_part = figures["forward"] + figures["backward"] - figures["fill"]
    ps_part = max(0.0, figures["step"] - torch_part)
    fraction = ps_part / figures["step"]
    report.add(
        SUITE,
        {"what": "cnn-step", "model": "HogwildNet", "batch": CNN_BATCH, "params": layout.num_params,
         "steps": steps, "rule": f"{config.optimizer} m{config.momentum}", "policy": "po3",
         **{f"{k}_seconds": v for k, v in figures.items() if k != "views"},
         "paramserver_seconds": ps_part, "paramserver_fraction": fraction},
    )  # fmt: skip
    report.table(
        SUITE,
        ["HogwildNet step of the worker loop (median of steps)", "seconds", "of the step"],
        [[k, figures[k], figures[k] / figures["step"]]
         for k in ("step", "forward", "backward", "fill", "check", "update", "count")]
        + [["(check repeated at once, not in the step)", figures["check_again"], ""]],
    )  # fmt: skip
    report.note(
        SUITE,
        f"cnn: pull is zero copy ({figures['views']:.0f} of {len(layout)} parameter tensors are views "
        f"of the segment, checked by data_ptr); a HogwildNet step of the worker loop itself "
        f"(workers.worker.prepare, timed by its probe; batch {CNN_BATCH}, 1 thread, "
        f"{layout.num_params} parameters, {steps} steps, medians) takes {figures['step'] * 1e3:.2f} ms: "
        f"forward (batch slice + torch) {figures['forward'] * 1e3:.2f} ms, backward (grad.fill "
        f"{figures['fill'] * 1e6:.1f} us, timed alone on the same buffer, + torch) "
        f"{figures['backward'] * 1e3:.2f} ms, finiteness check {figures['check'] * 1e6:.1f} us, "
        f"{config.optimizer} update under po3 {figures['update'] * 1e6:.1f} us, counters "
        f"{figures['count'] * 1e6:.1f} us; paramserver's part (all but torch's forward and backward) "
        f"is {ps_part * 1e6:.0f} us = {fraction:.2%}",
    )


def _cnn_steps(step, task, marks, views, steps):  # type: ignore[no-untyped-def]
    """Median seconds of the worker's step and of each of its phases (from the loop's
    probe ``marks``); ``grad.fill`` and the finiteness check are also timed alone on the
    same buffer right after each step. ``views``: the segment's tensors."""
    backend = task.model
    shared = sum(p.data_ptr() == views[n].ctypes.data for n, p in backend.model.named_parameters())
    grad = task.grad
    parts: dict[str, list[float]] = {
        k: [] for k in ("step", "forward", "backward", "check", "update", "count", "fill", "check_again")
    }
    clock = time.perf_counter
    for i in range(CNN_WARMUP + steps):
        marks.clear()
        t0 = clock()
        assert step(), "the worker's step stopped early"
        t1 = clock()
        grad.fill(0)  # what TorchBackend.backward does first, alone
        t2 = clock()
        bool(np.isfinite(grad.sum()))  # the loop's check, alone, with warm caches
        t3 = clock()
        if i >= CNN_WARMUP:
            parts["step"].append(t1 - t0)
            last = t0
            for phase, t in marks:
                parts[phase].append(t - last)
                last = t
            parts["fill"].append(t2 - t1)
            parts["check_again"].append(t3 - t2)
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["views"] = float(shared)
    return out  # every view dies with this frame, before the segments close


# -- plot --------------------------------------------------------------------------------------


def _plot(report: Report, results: list[UpdateResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    po3 = [r for r in results if r.policy == "po3"]
    if not po3:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for rule in dict.fromkeys(r.rule for r in po3):
        rs = sorted((r for r in po3 if r.rule == rule), key=lambda r: r.n)
        ax.plot([r.n for r in rs], [r.seconds for r in rs], marker="o", label=f"{rule} (po3)")
    copies = sorted({r.n: min(q.copy_seconds for q in po3 if q.n == r.n) for r in po3}.items())
    ax.plot([n for n, _ in copies], [s for _, s in copies], "k--", marker="s", label="np.copyto (params)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (float32)")
    ax.set_ylabel("seconds per step (best of repeats)")
    ax.set_title("update under po3 vs a copy of the parameter vector")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report.plot_path(SUITE, "update-vs-size"), dpi=110)
    plt.close(fig)
