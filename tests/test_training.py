"""Training with real worker processes: references, lost updates, zero copy, accuracy."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import pathlib

import numpy as np
import pytest
import safetensors.numpy
import torch
from helpers import ConstantGrad, DyingReLU, config, small

import paramserver as ps
from paramserver.data import epoch_orders
from paramserver.models.numpy_models import NumpyMLP
from paramserver.models.torch_models import MLP
from paramserver.workers.backends import ModelSpec, TorchBackend, recalibrate_batch_norm

POLICIES = ps.POLICIES


# -- one worker equals plain single-process training on the same batches ----------------


@pytest.mark.parametrize("policy", POLICIES)
def test_one_numpy_worker_equals_plain_numpy_training_bitwise(digits, policy):
    data = small(digits)
    model = NumpyMLP(64, 10, hidden=16)
    cfg = config(policy=policy, stripes=3)
    result = ps.train(model, data, cfg)

    # The same arithmetic by hand: SGD with momentum, batches in the worker's order.
    params = model.init(np.random.default_rng(cfg.seed))
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    bufs = {k: np.zeros_like(v) for k, v in params.items()}
    orders = epoch_orders(0, len(data.x_train), cfg.batch_size, cfg.seed)
    for _ in range(cfg.epochs):
        for s in next(orders):
            xb, yb = data.x_train[s : s + cfg.batch_size], data.y_train[s : s + cfg.batch_size]
            model.loss_and_grad(params, xb, yb, grads)
            for k in params:
                bufs[k] *= cfg.momentum
                bufs[k] += grads[k]
                params[k] -= bufs[k] * np.float32(cfg.lr)
    assert result.updates == cfg.epochs * len(next(orders))
    for k in params:
        np.testing.assert_array_equal(result.params[k], params[k], err_msg=k)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_torch_worker_equals_torch_optim_sgd(digits, policy):
    data = small(digits)
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=16)
    reference = copy.deepcopy(model)
    cfg = config(policy=policy, stripes=3)
    result = ps.train(model, data, cfg)

    opt = torch.optim.SGD(reference.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    orders = epoch_orders(0, len(data.x_train), cfg.batch_size, cfg.seed)
    for _ in range(cfg.epochs):
        for s in next(orders):
            xb = torch.from_numpy(data.x_train[s : s + cfg.batch_size])
            yb = torch.from_numpy(data.y_train[s : s + cfg.batch_size])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(xb), yb).backward()
            opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        # The trained values were copied back into the caller's module.
        np.testing.assert_allclose(p.detach().numpy(), result.params[name])
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


# -- lost updates -----------------------------------------------------------------------


def constant_run(policy: str, workers: int, steps: int, n: int = 200_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = ps.make_dataset(rng.normal(size=(64, 4)), rng.integers(0, 2, 64), classes=2)
    cfg = config(policy=policy, workers=workers, steps=workers * steps, epochs=10_000, lr=1.0, momentum=0.0)
    result = ps.train(ConstantGrad(n), data, cfg)
    assert result.updates == workers * steps
    return result.params["w"]


@pytest.mark.parametrize("policy", ["po1", "po2", "striped"])
def test_locking_policies_lose_no_update(policy):
    workers, steps = 2, 150
    w = constant_run(policy, workers, steps)
    # Every update subtracts exactly 1.0 from every element: nothing may be missing.
    np.testing.assert_array_equal(w, np.full_like(w, -workers * steps))


def test_po3_may_lose_updates_but_never_invents_them():
    """Hogwild!: two workers' read-modify-write of the same element can overlap and one
    update is then lost. That is po3's contract; what it must never do is apply an
    update twice or corrupt a value beyond the two it raced between."""
    workers, steps = 2, 150
    w = constant_run("po3", workers, steps)
    assert np.all(w == np.round(w)), "values must be whole numbers of updates (no torn floats)"
    assert np.all(w >= -workers * steps), "more updates than were made"
    assert np.all(w <= -steps), "each worker applied all its own updates at least"
    lost = float((w + workers * steps).sum())
    print(f"po3 lost {lost:.0f} of {workers * steps * w.size} element updates")


# -- zero copy --------------------------------------------------------------------------


def _zero_copy_child(store: ps.ParamStore, payload: bytes, rank: int) -> None:
    spec = ModelSpec("torch", payload)
    backend = TorchBackend(spec, store.model_layout, store.params, np.zeros_like(store.params))
    views = store.model_layout.unflatten(store.params)
    same = all(p.data_ptr() == views[n].ctypes.data for n, p in backend.model.named_parameters())
    first = next(backend.model.parameters())
    store.counters.array[rank, 0] = 1.0 if same else -1.0
    store.counters.array[rank, 1] = float(first.detach().sum())  # what this worker sees
    if rank == 0:
        with torch.no_grad():
            first.add_(1.0)  # an in-place update by worker 0, no message sent
    del backend, views, first
    store.close()


def test_torch_parameters_are_views_of_the_segment_and_updates_are_seen_by_others():
    import pickle

    torch.manual_seed(0)
    model = MLP(8, 3, hidden=4)
    layout = ps.Layout.from_torch(model)
    init = layout.flatten({n: p.detach().numpy() for n, p in model.named_parameters()})
    first_name = layout.names[0]
    before = float(init[: layout[first_name].size].sum())
    ctx = mp.get_context("spawn")
    with ps.ParamStore.create_for(layout, workers=2) as store:
        store.params[...] = init
        for rank in (0, 1):  # one after the other: worker 1 must see worker 0's update
            p = ctx.Process(target=_zero_copy_child, args=(store, pickle.dumps(model), rank))
            p.start()
            p.join(60)
            assert p.exitcode == 0
        assert store.counters.array[0, 0] == 1.0, "worker 0's parameters are not views of the segment"
        assert store.counters.array[1, 0] == 1.0, "worker 1's parameters are not views of the segment"
        assert store.counters.array[0, 1] == pytest.approx(before, abs=1e-4)
        n_first = layout[first_name].size
        assert store.counters.array[1, 1] == pytest.approx(before + n_first, abs=1e-3)


# -- every policy trains with two workers; accuracy ------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_two_numpy_workers_train_under_every_policy(digits, policy):
    result = ps.train(NumpyMLP(64, 10, 32), digits, config(policy=policy, workers=2, epochs=10))
    assert result.stop_reason == "epochs"
    assert [w["status"] for w in result.workers] == [2.0, 2.0]
    assert all(w["steps"] > 0 for w in result.workers)
    assert result.test_accuracy > 0.9


def test_torch_mlp_po3_two_workers_reaches_95_percent(digits):
    torch.manual_seed(0)
    result = ps.train(MLP(64, 10, 64), digits, config(policy="po3", workers=2, epochs=10))
    assert result.test_accuracy >= 0.95, result.summary()


def bn_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )


def test_recalibrate_batch_norm_sets_the_statistics_of_the_inputs():
    model = bn_mlp()
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(1024, 64)).astype(np.float32)
    weight_before = model[1].weight.detach().clone()
    assert recalibrate_batch_norm(model, x, batch=256)
    with torch.no_grad():
        h = model[0](torch.from_numpy(x))
    bn = model[1]
    # Four equal batches: the average of their means is the mean of all.
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, h.var(0), rtol=0.05, atol=1e-3)
    assert bn.momentum == 0.1 and model.training  # restored
    assert torch.equal(bn.weight, weight_before)
    assert not recalibrate_batch_norm(torch.nn.Linear(3, 2), x[:, :3])


def test_torch_batch_norm_model_is_evaluated_with_statistics_of_its_trained_parameters(digits):
    """Buffers are per worker; the server's copy and the caller's model re-estimate them."""
    model = bn_mlp()
    cfg = config(policy="po3", workers=2, epochs=20, target_accuracy=0.99, eval_every=0.05)
    result = ps.train(model, digits, cfg)
    assert result.evaluations, "the server evaluated while training"
    assert result.test_accuracy >= 0.93, result.summary()
    assert model[1].running_var.sub(1).abs().max() > 0.01, "statistics still the initial ones"
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(digits.x_test))
    own = (logits.argmax(1).numpy() == digits.y_test).mean()
    assert abs(own - result.test_accuracy) < 1e-9, (own, result.test_accuracy)


def test_numpy_mlp_two_workers_reaches_95_percent(digits):
    result = ps.train(NumpyMLP(64, 10, 64), digits, config(policy="po3", workers=2, epochs=10))
    assert result.test_accuracy >= 0.95, result.summary()


# -- stop criteria and outputs ------------------------------------------------------------


def test_target_accuracy_stops_the_run_early(digits):
    cfg = config(workers=2, epochs=1000, target_accuracy=0.9, eval_every=0.2)
    result = ps.train(NumpyMLP(64, 10, 32), digits, cfg)
    assert result.stop_reason == "target_accuracy"
    assert result.test_accuracy >= 0.9
    assert result.samples < 1000 * len(digits.x_train)


@pytest.mark.parametrize("watched", [True, False])
def test_the_evaluator_is_never_built_while_the_workers_train(digits, monkeypatch, watched):
    """Building one imports the model's framework: 0.7 s of CPU for torch in a fresh
    process (a cluster node agent), which came out of the workers' cores when it was
    built at the start of the watch. It is built before they start when the run is
    watched (target_accuracy), after they finish when not."""
    import time

    from paramserver import server

    built: list[float] = []
    spawned: list[float] = []

    class Timed(server.Evaluator):
        def __init__(self, *a, **kw):
            built.append(time.time())
            super().__init__(*a, **kw)

    start_workers = server.Server._start_workers

    def timed_start(self, launch):
        spawned.append(time.time())
        return start_workers(self, launch)

    monkeypatch.setattr(server, "Evaluator", Timed)
    monkeypatch.setattr(server.Server, "_start_workers", timed_start)
    target = {"target_accuracy": 0.999, "eval_every": 0.05} if watched else {}
    result = ps.train(NumpyMLP(64, 10, 8), digits, config(workers=2, steps=4000, epochs=1000, **target))
    last = max(w["finished"] for w in result.workers)
    assert len(built) == 1 and len(spawned) == 1
    if watched:
        assert built[0] < spawned[0] and len(result.evaluations) >= 1
    else:
        assert built[0] > last and result.evaluations == []
    assert result.test_accuracy is not None


def test_a_collapsed_model_is_warned_of(digits, tmp_path):
    cfg = config(workers=2, steps=200, epochs=100, out_dir=str(tmp_path))
    with pytest.warns(ps.CollapseWarning, match="gives every test sample the same output") as heard:
        result = ps.train(DyingReLU(64, 10, 16), digits, cfg)
    assert [w.filename for w in heard if issubclass(w.category, ps.CollapseWarning)] == [__file__]
    assert result.stop_reason == "steps"  # it ran on: finite parameters, nothing diverged
    assert result.warnings == [ps.metrics.COLLAPSED]
    assert "warning: the model gives every test sample the same output" in result.summary()
    assert result.test_accuracy <= np.bincount(digits.y_test).max() / len(digits.y_test) + 1e-9
    doc = json.loads((pathlib.Path(result.run_dir) / "results.json").read_text())
    assert doc["result"]["warnings"] == result.warnings


def test_a_model_that_learns_is_not_warned_of(digits, recwarn):
    result = ps.train(NumpyMLP(64, 10, 16), digits, config(workers=2, steps=200, epochs=100))
    assert result.warnings == [] and result.test_accuracy > 0.5
    assert not [w for w in recwarn if issubclass(w.category, ps.CollapseWarning)]


def test_collapse_is_judged_against_the_start(digits):
    # A model that gives every sample the same output at the end has collapsed only if it
    # did not at the start: a zero-initialized model stopped before it learned, or a test
    # split of equal inputs, is not warned of.
    from paramserver.models.numpy_models import SoftmaxRegression
    from paramserver.server import Evaluator

    metric = ps.metrics.resolve("auto", "classify")
    spec, layout, init = ps.model_spec(DyingReLU(64, 10, 16), None, 0, digits)
    dead = init.copy()
    layout.views(dead)["b0"][...] = -100.0
    assert Evaluator(spec, layout, dead, digits).final(metric, init)[2]
    assert not Evaluator(spec, layout, dead, digits).final(metric, dead)[2]
    assert not Evaluator(spec, layout, init, digits).final(metric, init)[2]
    spec, layout, zeros = ps.model_spec(SoftmaxRegression(64, 10), None, 0, digits)
    assert not zeros.any()
    assert not Evaluator(spec, layout, zeros, digits).final(metric, zeros)[2]
    same = ps.Dataset(digits.x_train, digits.y_train, np.repeat(digits.x_test[:1], 5, 0),
                      digits.y_test[:5], digits.classes)  # fmt: skip
    spec, layout, init = ps.model_spec(NumpyMLP(64, 10, 16), None, 0, same)
    assert not Evaluator(spec, layout, init * 2, same).final(metric, init)[2]


def test_constant_outputs_is_exact_about_what_counts_as_the_same():
    from paramserver.metrics import constant_outputs

    rows = np.tile(np.array([0.5, -2.0, 3.0], np.float32), (7, 1))
    assert constant_outputs(rows)
    rows[3, 1] = np.nextafter(rows[3, 1], np.float32(1))  # one float apart: not the same
    assert not constant_outputs(rows)
    assert not constant_outputs(rows[:1])  # one sample says nothing
    assert not constant_outputs(np.full((4, 2), np.nan))
    assert constant_outputs(np.full((5,), 2.5))  # one output per sample (regression)
    assert not constant_outputs(np.arange(5.0))


def test_steps_budget_is_exact_and_results_are_written(digits, tmp_path):
    cfg = config(workers=2, steps=31, epochs=100, out_dir=str(tmp_path))
    result = ps.train(NumpyMLP(64, 10, 8), digits, cfg)
    assert result.stop_reason == "steps"
    assert result.updates == 31
    assert sorted(w["steps"] for w in result.workers) == [15, 16]
    import json

    doc = json.loads((tmp_path / result.run_dir.split("/")[-1] / "results.json").read_text())
    assert doc["result"]["updates"] == 31
    assert doc["machine"]["usable_cores"] >= 1
    saved = safetensors.numpy.load_file(tmp_path / result.run_dir.split("/")[-1] / "params.safetensors")
    np.testing.assert_array_equal(saved["W0"], result.params["W0"])


def test_adam_with_shared_and_per_worker_state_trains(digits):
    for shared in (True, False):
        cfg = config(workers=2, epochs=5, optimizer="adam", lr=0.003, shared_state=shared)
        result = ps.train(NumpyMLP(64, 10, 32), digits, cfg)
        assert result.test_accuracy > 0.9, (shared, result.summary())


class Exploding(NumpyMLP):
    """Raises in a worker's backward pass (the server's own check of the model passes)."""

    def backward(self, params, cache, dlogits, grads):
        import multiprocessing

        if multiprocessing.current_process().name.startswith("paramserver-worker"):
            raise RuntimeError("boom in user code")
        return super().backward(params, cache, dlogits, grads)


# The failing worker's traceback keeps views of the segment alive in this process for a
# moment; the mapping is released when they are collected, and CPython reports the
# collected handle's failed close() as an "unraisable" BufferError.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_worker_that_raises_stops_the_run_with_a_clear_error(digits):
    with pytest.raises(ps.WorkerError, match="worker .* died"):
        ps.train(Exploding(64, 10, 8), digits, config(workers=2))


def test_the_divergence_scan_takes_at_most_a_hundredth_of_the_time_and_always_the_last_look(
    monkeypatch, capsys
):
    """The server's scan of the parameters for NaN/Inf (every poll, 10 a second) took 18 ms
    of every 100 from the workers with a 32M-parameter table: it now waits 100x its own
    duration between scans, and the look at the end of a run always scans."""
    from types import SimpleNamespace

    from paramserver import server as server_module
    from paramserver.store import COUNTER_FIELDS, Counters

    clock = [1000.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: clock[0])
    scans = []

    def scan(values):  # takes 2 ms of the fake clock
        scans.append(clock[0])
        clock[0] += 0.002
        return bool(np.isfinite(values).all())

    monkeypatch.setattr(server_module, "params_finite", scan)
    params = np.zeros(10, np.float32)
    counters = Counters(np.zeros((1, len(COUNTER_FIELDS))))
    store = SimpleNamespace(params=params, counters=counters, version=lambda: 7)
    fake = SimpleNamespace(store=store, config=SimpleNamespace(lr=0.1), _next_scan=0.0)
    diverged = server_module.Server._diverged
    assert not diverged(fake)
    assert len(scans) == 1 and fake._next_scan == pytest.approx(1000.002 + 0.2 - 0.002)
    params[3] = np.nan
    clock[0] += 0.1  # half the wait: no scan, so not seen yet
    assert not diverged(fake) and len(scans) == 1
    assert diverged(fake, final=True) and len(scans) == 2  # the last look always scans
    assert "non-finite after 7 updates" in capsys.readouterr().err
    clock[0] += 1.0
    assert diverged(fake) and len(scans) == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_params_finite_sees_every_nan_and_inf_and_no_overflow(dtype):
    from paramserver.server import params_finite

    p = np.full(1000, np.finfo(dtype).max, dtype)  # a sum would overflow
    assert params_finite(p) and params_finite(np.zeros(0, dtype))
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 500, -1):
            q = p.copy()
            q[where] = bad
            assert not params_finite(q), (bad, where)
