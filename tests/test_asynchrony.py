"""Asynchrony controls: staleness, attenuation, learning-rate schedules, stale-first, stop criteria."""

from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest
from helpers import ConstantGrad, config, tiny_data

import paramserver as ps
from paramserver.asynchrony import Attenuation, LRSchedule, StaleFirst
from paramserver.models.numpy_models import NumpyMLP

# -- the formulas, by hand --------------------------------------------------------------


def test_lr_schedules_match_their_formulas():
    lr = 0.1
    assert [LRSchedule(lr)(t) for t in (0, 5, 10_000)] == [lr, lr, lr]
    step = LRSchedule(lr, "step", step=10, gamma=0.5)
    assert [step(t) for t in (0, 9, 10, 19, 20, 35)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.0125]
    exp = LRSchedule(lr, "exp", step=10, gamma=0.5)
    assert exp(5) == pytest.approx(0.1 * 0.5**0.5)
    assert exp(20) == pytest.approx(0.025)
    cos = LRSchedule(lr, "cosine", lr_min=0.01, total=100)
    assert cos(0) == pytest.approx(0.1)
    assert cos(50) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cos(100) == pytest.approx(0.01) and cos(500) == pytest.approx(0.01)
    warm = LRSchedule(lr, "step", step=10, gamma=0.5, warmup=4)
    assert [warm(t) for t in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def test_attenuation_factors_match_their_formulas():
    assert Attenuation("none").factors(7) == (1.0, 1.0)
    assert Attenuation("exp", 0.5).factors(0) == (1.0, 1.0)
    assert Attenuation("exp", 0.5).factors(3) == (0.125, 1.0)  # gradient x base^staleness
    assert Attenuation("inverse").factors(0) == (1.0, 1.0)
    assert Attenuation("inverse").factors(4) == (1.0, 0.25)  # lr / staleness
    assert Attenuation(_halve).factors(2) == (1.0, 0.5)  # a callable scales the lr


def _halve(staleness: int) -> float:
    return 0.5


def _negative(staleness: int) -> float:
    return -1.0


def _linear(staleness: int) -> float:
    return 1.0 + staleness


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(attenuation="cubic"), "unknown attenuation 'cubic'"),
        (dict(attenuation="exp", attenuation_base=1.5), "attenuation_base must be in"),
        (dict(lr_schedule="linear"), "unknown lr schedule 'linear'"),
        (dict(lr_warmup=-1), "lr_warmup must be >= 0"),
        (dict(lr_gamma=0.0), "lr_gamma must be in"),
        (dict(lr_step=0), "lr_step must be at least 1"),
        (dict(lr_min=1.0), "lr_min must be in"),
        (dict(stale_first=-1), "stale_first must be >= 0"),
        (dict(eval_every_updates=-5), "eval_every_updates must be >= 0"),
        (dict(target_train_accuracy=1.5), "target_train_accuracy is a fraction"),
    ],
)
def test_bad_asynchrony_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_a_callable_that_returns_a_bad_factor_is_an_error():
    with pytest.raises(ValueError, match="attenuation callable returned -1.0"):
        Attenuation(_negative).factors(1)


# -- staleness measured in real runs ------------------------------------------------------


def test_staleness_is_zero_with_one_worker():
    result = ps.train(NumpyMLP(64, 10, 16), ps.load_digits(), config(workers=1, steps=200, epochs=100))
    assert result.updates == 200
    assert result.staleness == {"mean": 0.0, "max": 0.0}


def test_staleness_grows_with_workers_under_po3():
    # Four workers on this machine's cores: they interleave, so most updates land on
    # parameters that others changed after the worker read them.
    cfg = config(workers=4, policy="po3", steps=2000, epochs=1000, lr=0.01)
    result = ps.train(NumpyMLP(64, 10, 16), ps.load_digits(), cfg)
    assert result.staleness["mean"] > 0, result.summary()
    assert result.staleness["max"] >= 1
    for w in result.workers:  # the per-worker figures inspect and the metrics show
        assert w["staleness_sum"] >= 0 and w["staleness_max"] <= result.updates


def test_the_lr_schedule_is_applied_from_the_global_update_count():
    # One worker, gradient 1, plain SGD: the parameter is minus the sum of the rates.
    cfg = config(
        workers=1, steps=30, epochs=10_000, lr=0.1, momentum=0.0,
        lr_schedule="step", lr_step=10, lr_gamma=0.5, lr_warmup=3,
    )  # fmt: skip
    result = ps.train(ConstantGrad(8), tiny_data(), cfg)
    schedule = LRSchedule(0.1, "step", step=10, gamma=0.5, warmup=3)
    expected = np.float32(0)
    for t in range(30):
        expected -= np.float32(1.0) * np.float32(schedule(t))
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-6)
    assert result.workers[0]["lr"] == pytest.approx(schedule(29))


def test_attenuation_uses_the_staleness_it_records():
    # po1 loses no update, so with gradient 1 and lr 1 each update subtracts exactly
    # f(s) = 1 + s: the total is the number of updates plus the recorded staleness.
    cfg = config(workers=2, policy="po1", steps=400, epochs=10_000, lr=1.0, momentum=0.0, attenuation=_linear)
    result = ps.train(ConstantGrad(1000), tiny_data(), cfg)
    recorded = sum(w["staleness_sum"] for w in result.workers)
    assert result.updates == 400
    np.testing.assert_array_equal(result.params["w"], -(400 + recorded))


def test_exp_attenuation_damps_stale_gradients():
    cfg = config(
        workers=2, policy="po1", steps=400, epochs=10_000, lr=1.0, momentum=0.0,
        attenuation="exp", attenuation_base=0.5,
    )  # fmt: skip
    result = ps.train(ConstantGrad(1000), tiny_data(), cfg)
    applied = -float(result.params["w"][0])
    smax = result.staleness["max"]
    # Each update adds 0.5**s for its staleness s: between 0.5**max and 1.
    assert 400 * 0.5**smax - 1e-3 <= applied <= 400 + 1e-3
    if result.staleness["mean"] > 0:
        assert applied < 400


# -- stale-first ------------------------------------------------------------------------


def test_stale_first_lets_the_urgent_worker_go_first_without_spinning():
    gate = StaleFirst(threshold=3, timeout=5.0)
    gate.bind(np.zeros(2))
    order: list[str] = []
    assert gate.before(rank=0, staleness=5)  # urgent: goes at once, marks itself
    waiter = threading.Thread(target=lambda: (gate.before(rank=1, staleness=0), order.append("fresh")))
    cpu0 = time.process_time()
    waiter.start()
    time.sleep(0.3)
    order.append("urgent")  # the urgent update lands while the other waits
    assert waiter.is_alive(), "a fresh worker went ahead of an urgent one"
    gate.after(rank=0)
    waiter.join(5)
    assert not waiter.is_alive()
    assert order == ["urgent", "fresh"]
    assert time.process_time() - cpu0 < 0.2, "the waiter spun on the CPU"
    assert gate.before(rank=1, staleness=0) is False  # nobody urgent: no wait, no lock


def _wait_as_fresh(buf: mmap.mmap) -> None:
    gate = StaleFirst(threshold=3, timeout=60.0)
    gate.bind(np.frombuffer(buf, dtype=np.float64))
    gate.before(rank=1, staleness=0)


def test_a_waiter_killed_while_waiting_blocks_nobody():
    # A waiter SIGKILLed in the middle of its wait must not leave anything behind that
    # the urgent worker (or the next waiter) then blocks on: no lock held, no sleeper
    # counted. Forked, so the child shares the anonymous mapping (no file, no segment).
    buf = mmap.mmap(-1, 3 * 8)
    col = np.frombuffer(buf, dtype=np.float64)
    gate = StaleFirst(threshold=3, timeout=60.0)
    gate.bind(col)
    assert gate.before(rank=0, staleness=5)
    waiter = mp.get_context("fork").Process(target=_wait_as_fresh, args=(buf,))
    waiter.start()
    try:
        time.sleep(0.3)
        assert waiter.is_alive(), "the fresh worker did not wait for the urgent one"
        os.kill(waiter.pid, signal.SIGKILL)
        waiter.join(5)
        done = threading.Event()
        threading.Thread(target=lambda: (gate.after(rank=0), done.set()), daemon=True).start()
        assert done.wait(2), "the urgent worker blocked on what the killed waiter left"
        # The gate still works for the others: urgent again, a fresh thread waits, then goes.
        assert gate.before(rank=0, staleness=4)
        went = threading.Event()
        other = threading.Thread(target=lambda: (gate.before(rank=2, staleness=0), went.set()), daemon=True)
        other.start()
        assert not went.wait(0.2)
        gate.after(rank=0)
        assert went.wait(2)
    finally:
        if waiter.is_alive():
            waiter.kill()
        waiter.join(5)
        # The mapping is anonymous (no file, no segment): it goes with its last view, so it
        # is not closed here while the gate's and col's views of it may still be alive.


@pytest.mark.parametrize("policy", ps.POLICIES)
def test_stale_first_runs_under_every_policy(policy):
    cfg = config(workers=4, policy=policy, epochs=3, stale_first=1, lr=0.02)
    result = ps.train(NumpyMLP(64, 10, 16), ps.load_digits(), cfg)
    assert result.stop_reason == "epochs"
    assert result.test_accuracy > 0.8, result.summary()


# -- stop criteria ------------------------------------------------------------------------


def test_test_accuracy_target_fires_within_one_evaluation_interval():
    every = 50
    cfg = config(workers=2, epochs=1000, lr=0.05, target_accuracy=0.9, eval_every_updates=every)
    result = ps.train(NumpyMLP(64, 10, 32), ps.load_digits(), cfg)
    assert result.stop_reason == "target_accuracy"
    evals = result.evaluations
    assert evals and evals[-1]["test_accuracy"] >= 0.9
    assert all(e["test_accuracy"] < 0.9 for e in evals[:-1]), "it should have stopped earlier"
    gaps = np.diff([0] + [e["updates"] for e in evals])
    assert np.all(gaps >= every), gaps  # evaluated every `every` updates, not more often
    # Workers stop at their next step: at most a few updates after the deciding evaluation.
    assert result.updates - evals[-1]["updates"] <= every, (result.updates, evals[-1])


def test_train_accuracy_target_stops_the_run():
    cfg = config(workers=2, epochs=1000, lr=0.05, target_train_accuracy=0.85, eval_every=0.05)
    result = ps.train(NumpyMLP(64, 10, 32), ps.load_digits(), cfg)
    assert result.stop_reason == "target_train_accuracy"
    assert result.evaluations[-1]["train_accuracy"] >= 0.85


def test_a_callback_stops_the_run_and_sees_staleness():
    seen = []

    def callback(info):
        seen.append(info)
        return info["updates"] >= 300

    cfg = config(workers=2, epochs=1000)
    result = ps.train(NumpyMLP(64, 10, 16), ps.load_digits(), cfg, callback=callback)
    assert result.stop_reason == "callback"
    assert {"staleness", "pids", "restarts"} <= set(seen[-1])
    assert len(seen[-1]["pids"]) == 2
