"""Sparse models: row gradients end to end, checked against PyTorch and for lost updates."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import config
from torch import nn

import paramserver as ps
from paramserver.checkpoint import load_checkpoint
from paramserver.data import epoch_orders, share_training_data
from paramserver.models.numpy_models import MatrixFactorization, NumpyModel
from paramserver.models.torch_models import BagOfWords

TOKENS, IDS = 500, 6
EPS = {"sgd": 1e-8, "adagrad": 1e-10, "adam": 1e-8}


def bag_data(n: int = 256, tokens: int = TOKENS, unused: tuple[int, ...] = ()) -> ps.Dataset:
    """Token ids (int64) with labels from their parity; ids in ``unused`` never occur."""
    rng = np.random.default_rng(1)
    pool = np.setdiff1d(np.arange(tokens), unused)
    x = rng.choice(pool, (n, IDS))
    y = (x.sum(axis=1) % 2).astype(np.int64)
    return ps.make_dataset(x, y, x_test=x[:32], y_test=y[:32], classes=2)


def reference_optimizer(name: str, model: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """torch.optim's rule for the table (sparse gradients) and for the dense layer."""
    table, dense = [model.embedding.weight], list(model.out.parameters())
    if name == "sgd":
        return [torch.optim.SGD(table + dense, lr=lr)]
    if name == "adagrad":
        return [torch.optim.Adagrad(table + dense, lr=lr)]
    return [torch.optim.SparseAdam(table, lr=lr), torch.optim.Adam(dense, lr=lr)]


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_one_worker_with_each_row_rule_equals_torch(optimizer):
    data = bag_data()
    torch.manual_seed(0)
    model = BagOfWords(TOKENS, 2, dim=8)
    reference = copy.deepcopy(model)
    # eps as torch's default for each (TrainConfig's eps is 1e-8 whatever the rule).
    cfg = config(optimizer=optimizer, momentum=0.0, lr=0.05, epochs=2, eps=EPS[optimizer])
    result = ps.train(model, data, cfg)

    opts = reference_optimizer(optimizer, reference, cfg.lr)
    orders = epoch_orders(0, len(data.x_train), cfg.batch_size, cfg.seed)
    for _ in range(cfg.epochs):
        for s in next(orders):
            xb = torch.from_numpy(data.x_train[s : s + cfg.batch_size])
            yb = torch.from_numpy(data.y_train[s : s + cfg.batch_size])
            for o in opts:
                o.zero_grad()
            nn.functional.cross_entropy(reference(xb), yb).backward()
            assert reference.embedding.weight.grad.is_sparse
            for o in opts:
                o.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), result.params[name])
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_a_sparse_step_never_touches_a_row_no_sample_uses(optimizer, tmp_path):
    unused = (0, 7, 123, TOKENS - 1)
    data = bag_data(unused=unused)
    torch.manual_seed(0)
    model = BagOfWords(TOKENS, 2, dim=8)
    before = model.embedding.weight.detach().numpy().copy()
    cfg = config(
        optimizer=optimizer, momentum=0.0, lr=0.05, epochs=1, workers=2, policy="striped", stripes=4,
        out_dir=str(tmp_path),
    )  # fmt: skip
    result = ps.train(model, data, cfg)
    table = result.params["embedding.weight"]
    used = np.unique(data.x_train)
    unused = tuple(np.setdiff1d(np.arange(TOKENS), used))  # those above, and any never drawn
    for r in unused:  # the same bytes, not merely close
        assert table[r].tobytes() == before[r].tobytes(), f"row {r} changed"
    assert (table[used] != before[used]).any(axis=1).all(), "every row a sample uses was updated"
    ckpt = load_checkpoint(result.checkpoint)
    field = ckpt.layout["embedding.weight"]
    lo = field.offset // 4
    state = ckpt.state[:, lo : lo + field.size].reshape(-1, *field.shape)
    assert state.shape[0] == {"sgd": 0, "adagrad": 1, "adam": 2}[optimizer]
    for r in unused:  # the state of an untouched row stays zero too
        assert not state[:, r].any(), f"state of row {r} changed"
    if state.shape[0]:
        assert state[0][used].any(axis=1).all()


def test_a_rule_without_row_updates_is_refused_before_workers_start():
    model = BagOfWords(TOKENS, 2, dim=8)
    for kw in ({"optimizer": "rmsprop"}, {"optimizer": "sgd", "momentum": 0.9}):
        with pytest.raises(ValueError, match="embedding.weight get sparse gradients.*adagrad"):
            ps.train(model, bag_data(), config(**kw))


class ConstantRows(NumpyModel):
    """Row gradient 1 on rows 0..rows-1 of a table (every worker, every step: they collide),
    gradient 1 on a dense vector too."""

    def __init__(self, n: int = 4096, dim: int = 8, rows: int = 64):
        self.n, self.dim, self.rows = n, dim, rows

    def shapes(self):
        return {"table": (self.n, self.dim), "w": (16,)}

    def sparse_tensors(self):
        return ("table",)

    def init(self, rng):
        return {"table": np.zeros((self.n, self.dim), np.float32), "w": np.zeros(16, np.float32)}

    def forward(self, params, x):
        return np.zeros((len(x), 2), np.float32), None

    def backward(self, params, cache, dlogits, grads):
        grads["w"][...] = 1.0
        # Every row twice: coalescing must sum the repeats (2 per step).
        idx = np.concatenate([np.arange(self.rows), np.arange(self.rows)[::-1]])
        return {"table": (idx, np.ones((idx.size, self.dim), np.float32))}


@pytest.mark.parametrize(
    ("policy", "optimizer", "sorts"),
    [("po3", "sgd", False), ("po1", "sgd", False), ("striped", "sgd", True), ("po3", "adagrad", True)],
)
def test_a_worker_sorts_row_gradients_only_where_the_update_needs_it(policy, optimizer, sorts, monkeypatch):
    """SGD adds each id's gradient in, as torch.optim.SGD does, so a push applied in one piece
    needs no coalescing (a sort of every id of the batch, each step); stripes (rows found
    by search) and adagrad (the square of each row's summed gradient) do."""
    import os

    from paramserver import kernels
    from paramserver.policy import make_policy
    from paramserver.store import ShmStore
    from paramserver.workers import worker

    calls = []
    real = kernels.coalesce  # what every coalescing runs, wherever it is called from
    monkeypatch.setattr(kernels, "coalesce", lambda *a: calls.append(1) or real(*a))
    data = bag_data()
    torch.manual_seed(0)
    model = BagOfWords(TOKENS, 2, dim=8)
    cfg = config(optimizer=optimizer, momentum=0.0, policy=policy, epochs=1)
    spec, layout, init = ps.model_spec(model, None, 0, data)
    rule = cfg.update_rule()
    with (
        ShmStore.create_for(layout, workers=1, state_slots=rule.state_slots) as store,
        share_training_data(data) as shared,
    ):
        store.params[...] = init
        store.policy = make_policy(policy, layout.flat_size, torch.multiprocessing.get_context("spawn"))
        task = worker.SupervisedTask(spec, shared, cfg.batch_size, cfg.epochs)
        plan = worker.WorkerPlan(rank=0, workers=1, cores=None, threads=1, parent_pid=os.getppid())
        step = worker.prepare(plan, store, task, cfg)
        calls.clear()  # the rule's warm-up
        for _ in range(5):
            assert step()
        del step
        table = store.params[: TOKENS * 8].copy()
        task.close()
        store.unbind()
    assert len(calls) == (5 if sorts else 0), calls
    assert not np.array_equal(table, init[: TOKENS * 8]), "the table was not updated"


def test_a_row_gradient_is_taken_as_given_or_refused_in_one_line():
    from paramserver.workers.backends import ids_and_values

    rows = ids_and_values(80, 4, np.array([3, 1, 3], np.int32), np.ones((3, 4), np.float32))
    assert not rows.coalesced and rows.rows.dtype == np.int64 and rows.rows.tolist() == [3, 1, 3]
    assert rows.offset == 80 and rows.values.shape == (3, 4)
    flat = ids_and_values(0, 4, [2], np.ones(4, np.float32))  # one row, given flat
    assert flat.values.shape == (1, 4)
    with pytest.raises(TypeError, match="row ids must be integers, got float64"):
        ids_and_values(0, 4, np.array([2.7]), np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="one row of 4 values per id"):
        ids_and_values(0, 4, np.array([1, 2]), np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="1-D ids"):
        ids_and_values(0, 4, np.array([[1, 2]]), np.ones((2, 4), np.float32))


@pytest.mark.parametrize("policy", ["po1", "po2", "striped"])
def test_locking_policies_lose_no_row_update_when_rows_collide(policy):
    workers, steps = 2, 100
    rng = np.random.default_rng(0)
    data = ps.make_dataset(rng.normal(size=(64, 4)), rng.integers(0, 2, 64), classes=2)
    model = ConstantRows()
    cfg = config(policy=policy, workers=workers, steps=workers * steps, epochs=10_000, lr=1.0, momentum=0.0)
    result = ps.train(model, data, cfg)
    assert result.updates == workers * steps
    table = result.params["table"]
    np.testing.assert_array_equal(table[: model.rows], -2.0 * workers * steps)
    np.testing.assert_array_equal(table[model.rows :], 0.0)
    np.testing.assert_array_equal(result.params["w"], -1.0 * workers * steps)


def test_int64_ids_above_2_pow_24_arrive_intact_in_the_batch():
    big = np.array([[2**24 + 1, 2**40 + 3], [2**31 + 7, 2**53 - 1]], np.int64)
    data = ps.make_dataset(np.repeat(big, 8, axis=0), np.arange(16) % 2, classes=2)
    assert data.x_train.dtype == np.int64
    with share_training_data(data) as shared:
        seg = shared.segment
        x = seg["x"]
        assert x.dtype == np.int64
        assert set(map(tuple, x.tolist())) == set(map(tuple, big.tolist()))
        del x


class Recorder(NumpyModel):
    """Writes every id of every batch it sees to a file (what reached the worker)."""

    def __init__(self, path: str):
        self.path = path

    def shapes(self):
        return {"w": (4,)}

    def init(self, rng):
        return {"w": np.zeros(4, np.float32)}

    def forward(self, params, x):
        with open(self.path, "a") as f:
            f.write(f"{x.dtype} " + " ".join(map(str, x.ravel().tolist())) + "\n")
        return np.zeros((len(x), 2), np.float32), None

    def backward(self, params, cache, dlogits, grads):
        grads["w"][...] = 0.0


def test_int64_ids_arrive_intact_in_a_worker(tmp_path):
    ids = np.array([2**24 + 1, 2**24 + 3, 2**40 + 5, 2**62 + 7], np.int64)
    x = np.stack([ids, ids[::-1]], axis=1)
    data = ps.make_dataset(x, np.array([0, 1, 0, 1]), x_test=x, y_test=np.array([0, 1, 0, 1]), classes=2)
    path = str(tmp_path / "seen.txt")
    ps.train(Recorder(path), data, config(epochs=1, batch_size=4, momentum=0.0))
    with open(path) as f:
        lines = f.read().split("\n")
    seen = [line.split() for line in lines if line.startswith("int64")]
    assert seen, "the worker saw no batch"
    got = {int(v) for line in seen for v in line[1:]}
    assert got == set(ids.tolist())


def test_matrix_factorization_trains_through_ps_train():
    rng = np.random.default_rng(0)
    users, items, n = 60, 80, 8000
    pu, qi = rng.standard_normal((users, 2)), rng.standard_normal((items, 2))
    x = np.stack([rng.integers(0, users, n), rng.integers(0, items, n)], axis=1)
    y = ((pu[x[:, 0]] * qi[x[:, 1]]).sum(axis=1) > 0).astype(np.int64)  # a rank-2 teacher
    data = ps.make_dataset(x, y, classes=2)
    model = MatrixFactorization(users, items, dim=4)
    result = ps.train(model, data, config(workers=2, optimizer="adagrad", lr=0.1, momentum=0.0, epochs=5))
    # Held-out (user, item) pairs: above chance only if the factors generalise.
    assert result.test_accuracy > 0.8, result.summary()


def rating_triples(users: int, items: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) int64 pairs and float32 ratings of a biased rank-2 teacher plus noise 0.1."""
    rng = np.random.default_rng(seed)
    p, q = rng.standard_normal((users, 2)), rng.standard_normal((items, 2))
    x = np.stack([rng.integers(0, users, n), rng.integers(0, items, n)], axis=1)
    bias = 3.0 + 0.5 * rng.standard_normal(users)[x[:, 0]]
    r = bias + (p[x[:, 0]] * q[x[:, 1]]).sum(axis=1) + 0.1 * rng.standard_normal(n)
    return x, r.astype(np.float32)


def test_rating_factorization_gradient_matches_finite_differences():
    model = MatrixFactorization(7, 5, dim=3, ratings=True)
    params = {k: v.astype(np.float64) for k, v in model.init(np.random.default_rng(0)).items()}
    for v in params.values():
        v += np.random.default_rng(1).normal(0, 0.3, v.shape)  # biases off zero too
    x = np.array([[0, 1], [3, 1], [0, 4], [6, 2]])  # user 0 and item 1 twice: rows repeat
    r = np.array([1.0, -2.0, 0.5, 3.0])

    def loss(p):
        from paramserver.models.numpy_models import mean_squared_error

        return mean_squared_error(model.forward(p, x)[0], r)

    _, d = loss(params)
    rows = model.backward(params, model.forward(params, x)[1], d, {})
    assert set(rows) == {"U", "V"} and set(model.shapes()) == {"U", "V"}  # no dense parameter
    for name, (idx, values) in rows.items():
        dense = np.zeros_like(params[name])
        np.add.at(dense, idx, values)
        numeric = np.zeros_like(dense)
        for j in np.ndindex(dense.shape):
            up, down = copy.deepcopy(params), copy.deepcopy(params)
            up[name][j] += 1e-6
            down[name][j] -= 1e-6
            numeric[j] = (loss(up)[0] - loss(down)[0]) / 2e-6
        np.testing.assert_allclose(dense, numeric, rtol=1e-5, atol=1e-8)
        assert np.abs(dense[:, -1]).sum() > 0  # the bias column learns


def test_rating_factorization_reaches_the_noise_floor_with_two_workers():
    users, items = 50, 60
    x, r = rating_triples(users, items, 6000)
    model = MatrixFactorization(users, items, dim=2, ratings=True)
    result = ps.train(model, (x, r), config(workers=2, optimizer="sgd", lr=0.5, momentum=0.0, epochs=30))
    assert result.metric == "loss"
    test_rmse = result.test_metric**0.5  # the test loss is the MSE
    # Ratings vary by about 1.5 around their mean and the noise is 0.1: only learned
    # biases and factors get the held-out RMSE this low.
    assert test_rmse < 0.25, result.summary()
    assert np.all(np.isfinite(result.params["U"])) and result.params["U"].shape == (users, 3)


def test_rating_factorization_from_the_command_line(tmp_path):
    x, r = rating_triples(40, 40, 4000)
    np.savez(tmp_path / "ratings.npz", x=x, y=r)
    cmd = [sys.executable, "-m", "paramserver", "train", "--backend", "numpy", "--model", "mf",
           "--data", str(tmp_path / "ratings.npz"), "--hidden", "2", "--lr", "0.5", "--momentum", "0",
           "--epochs", "30", "--workers", "2", "--out-dir", ""]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loss = float(proc.stdout.split("test loss ")[1].split(",")[0])
    assert loss < 0.25**2, proc.stdout


def test_mf_refuses_inputs_that_are_not_id_pairs():
    from paramserver.models.numpy_models import build

    with pytest.raises(ValueError, match="int \\(user, item\\) pairs"):
        build("mf", (3,), 1, tokens=10, task="regress")
    with pytest.raises(ValueError, match="one float rating per pair"):
        build("mf", (2,), 3, tokens=10, task="regress")
    with pytest.raises(ValueError, match="takes int \\(user, item\\) pairs"):
        MatrixFactorization(3, 3, ratings=True).forward({}, np.zeros((4, 2), np.float32))


MEMORY_SCRIPT = r"""
import sys, numpy as np, psutil, torch
import paramserver as ps
from paramserver.models.torch_models import BagOfWords

class Probe(BagOfWords):
    # Runs in the worker: its memory after 20 steps (the 21st forward pass).
    def forward(self, x):
        out = super().forward(x)
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen == 21:
            m = psutil.Process().memory_full_info()
            open(sys.argv[1], "w").write(f"{m.uss} {m.pss}")
        return out

if __name__ == "__main__":
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, int(sys.argv[2]), (32 * 25, 10))
    data = ps.make_dataset(x, x[:, 0] % 2, x_test=x[:32], y_test=x[:32, 0] % 2, classes=2)
    cfg = ps.TrainConfig(workers=1, steps=24, epochs=1, batch_size=32, lr=0.1, momentum=0.0,
                         out_dir="", progress=False)
    ps.train(Probe(int(sys.argv[2]), 2, dim=32), data, cfg)
"""


def worker_memory(tmp_path, tokens: int) -> tuple[int, int]:
    """(USS, PSS) of a worker after 20 steps on a ``tokens`` x 32 table."""
    script, out = tmp_path / "mem.py", tmp_path / f"mem-{tokens}.txt"
    script.write_text(MEMORY_SCRIPT)
    subprocess.run([sys.executable, str(script), str(out), str(tokens)], check=True, timeout=240)
    uss, pss = map(int, out.read_text().split())
    return uss, pss


def test_a_worker_holds_the_touched_rows_not_the_table(tmp_path):
    """A worker training a 1M x 32 table (128 MB) holds privately what a worker with a
    1,000-row table holds, plus at most 10% of the table: the table lives in the shared
    segment, and its part of the gradient buffer is never written, so never resident."""
    table = 1_000_000 * 32 * 4
    big, small_ = worker_memory(tmp_path, 1_000_000), worker_memory(tmp_path, 1_000)
    mib = [v / 2**20 for v in (*big, *small_, table)]
    print(
        "worker USS/PSS: 1M x 32 table {:.1f}/{:.1f} MiB, 1k x 32 {:.1f}/{:.1f} MiB; table {:.0f} MiB".format(
            *mib
        )
    )
    assert big[0] - small_[0] <= 0.1 * table, f"the table adds {big[0] - small_[0]} private bytes"
