"""Row updates, coalescing and the finiteness check against torch; the on-disk kernel cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import paramserver.optim as optim
from paramserver.benchmarks import rules as rules_bench
from paramserver.optim import UpdateRule, coalesce, finite_check, make_rule, values_finite

ROWS, DIM = 50, 4
STEPS = 6
BATCH = 24
"""Ids per batch, drawn from 50 rows: duplicates in every batch, and rows never touched."""

MakeTorch = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]
ROW_CASES: list[tuple[str, Callable[[], UpdateRule], MakeTorch, float]] = [
    ("sgd", lambda: make_rule("sgd"), lambda ps, lr: torch.optim.SGD(ps, lr=lr), 0.1),
    ("adagrad", lambda: make_rule("adagrad"), lambda ps, lr: torch.optim.Adagrad(ps, lr=lr), 0.1),
    (
        "adagrad-eps",
        lambda: make_rule("adagrad", eps=1e-3),
        lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, eps=1e-3),
        0.1,
    ),
    ("adam", lambda: make_rule("adam"), lambda ps, lr: torch.optim.SparseAdam(ps, lr=lr), 0.01),
    (
        "adam-betas-eps",
        lambda: make_rule("adam", betas=(0.8, 0.99), eps=1e-4),
        lambda ps, lr: torch.optim.SparseAdam(ps, lr=lr, betas=(0.8, 0.99), eps=1e-4),
        0.01,
    ),
]
ROW_IDS = [c[0] for c in ROW_CASES]


@pytest.fixture(params=["compiled", "numpy"])
def kernels_or_numpy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled kernels and again with the NumPy fallback (no numba)."""
    if request.param == "numpy":
        monkeypatch.setattr(optim, "_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize(("make", "make_torch", "lr"), [c[1:] for c in ROW_CASES], ids=ROW_IDS)
def test_row_rule_matches_torch_on_embedding_gradients(make, make_torch, lr, kernels_or_numpy):
    """``nn.Embedding(sparse=True)`` gives uncoalesced gradients; coalesced and applied row by
    row they move the table as torch's optimizer moves the embedding, and leave every row
    outside the batch (parameters and state) bit for bit as it was."""
    rule = make()
    torch.manual_seed(0)
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    opt = make_torch(list(emb.parameters()), lr)
    table = emb.weight.detach().numpy().copy()
    state = np.zeros((rule.state_slots, ROWS, DIM), np.float32)
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.standard_normal((BATCH, DIM)).astype(np.float32))
    touched_ever = set()

    for t in range(1, STEPS + 1):
        ids = rng.integers(0, 20 + 4 * t, BATCH)  # the batches drift over the table
        assert len(np.unique(ids)) < BATCH, "the batch must hold duplicates"
        opt.zero_grad()
        # a loss whose gradient depends on the parameters, so the steps compound
        ((emb(torch.from_numpy(ids)) - target) ** 2).sum().backward()
        grad = emb.weight.grad
        assert grad.is_sparse and not grad.is_coalesced()
        indices, values = grad._indices()[0].numpy(), grad._values().numpy()

        rows, sums = coalesce(indices, values)
        before_t, before_s = table.copy(), state.copy()
        rule.apply_rows(table, state, rows, sums, t, lr)
        opt.step()

        np.testing.assert_allclose(
            table, emb.weight.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {t}"
        )
        untouched = np.setdiff1d(np.arange(ROWS), rows)
        assert untouched.size > 0
        assert table[untouched].tobytes() == before_t[untouched].tobytes()
        assert state[:, untouched].tobytes() == before_s[:, untouched].tobytes()
        assert not np.array_equal(table[rows], before_t[rows])
        touched_ever.update(rows.tolist())

    keys = {"sgd": [], "adagrad": ["sum"], "adam": ["exp_avg", "exp_avg_sq"]}[rule.name]
    for slot, key in zip(state, keys, strict=True):
        np.testing.assert_allclose(
            slot, opt.state[emb.weight][key].numpy(), rtol=1e-5, atol=1e-7, err_msg=key
        )
    assert len(touched_ever) < ROWS


@pytest.mark.parametrize("make", [c[1] for c in ROW_CASES], ids=ROW_IDS)
def test_row_kernels_equal_the_numpy_fallback_bitwise(make, monkeypatch):
    rule = make()
    rng = np.random.default_rng(4)
    init = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    tables = {"compiled": init.copy(), "numpy": init.copy()}
    states = {k: np.zeros((rule.state_slots, ROWS, DIM), np.float32) for k in tables}
    batches = [coalesce(rng.integers(0, ROWS, BATCH), rng.standard_normal((BATCH, DIM)).astype(np.float32))
               for _ in range(STEPS)]  # fmt: skip
    for which in tables:
        if which == "numpy":
            monkeypatch.setattr(optim, "_kernels", lambda: None)
        for t, (rows, values) in enumerate(batches, start=1):
            rule.apply_rows(tables[which], states[which], rows, values, t, 0.05)
    assert tables["compiled"].tobytes() == tables["numpy"].tobytes()
    assert states["compiled"].tobytes() == states["numpy"].tobytes()
    assert not np.array_equal(tables["compiled"], init)


def test_row_rules_keep_float64():
    rule = make_rule("adagrad")
    table = np.ones((5, 3))
    state = np.zeros((1, 5, 3))
    rule.apply_rows(table, state, np.array([1, 3]), np.full((2, 3), 2.0), 1, 0.5)
    # Adagrad's first step moves each touched parameter by lr (g / sqrt(g * g)), here 0.5
    np.testing.assert_allclose(table[[1, 3]], 0.5, rtol=1e-9)
    np.testing.assert_array_equal(table[[0, 2, 4]], 1.0)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([3, 1], "sorted and unique"),
        ([1, 1], "sorted and unique"),
        ([-1, 2], r"rows must lie in \[0, rows of the table\)"),
        ([2, ROWS], r"rows must lie in \[0, rows of the table\)"),
    ],
)
@pytest.mark.parametrize("make", [c[1] for c in ROW_CASES], ids=ROW_IDS)
def test_bad_rows_raise_and_change_nothing(make, rows, message, kernels_or_numpy):
    rule = make()
    table = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    state = np.ones((rule.state_slots, ROWS, DIM), np.float32)
    before_t, before_s = table.tobytes(), state.tobytes()
    with pytest.raises(ValueError, match=message):
        rule.apply_rows(table, state, np.array(rows, np.int64), np.ones((2, DIM), np.float32), 1, 0.1)
    assert table.tobytes() == before_t and state.tobytes() == before_s


def test_sgd_ids_equal_torch_on_uncoalesced_gradients(kernels_or_numpy):
    """SGD takes a row gradient as torch gives it (ids in any order, repeated): the table moves
    as torch.optim.SGD moves the embedding, and as coalescing first would, and the rows of no
    id keep their bytes."""
    rule = make_rule("sgd")
    assert rule.takes_ids
    torch.manual_seed(0)
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    table = emb.weight.detach().numpy().copy()
    coalesced = table.copy()
    rng = np.random.default_rng(3)
    for t in range(STEPS):
        ids = rng.integers(0, 20 + 4 * t, BATCH)
        assert len(np.unique(ids)) < BATCH and not (np.diff(ids) > 0).all(), "repeats, out of order"
        opt.zero_grad()
        (emb(torch.from_numpy(ids)) ** 2).sum().backward()
        indices, values = emb.weight.grad._indices()[0].numpy(), emb.weight.grad._values().numpy()
        before = table.copy()
        rule.apply_ids(table, indices, values, 0.1)
        rule.apply_rows(coalesced, np.zeros((0, ROWS, DIM), np.float32), *coalesce(indices, values), 1, 0.1)
        opt.step()
        np.testing.assert_allclose(
            table, emb.weight.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=f"step {t}"
        )
        np.testing.assert_allclose(table, coalesced, rtol=1e-6, atol=1e-7)
        untouched = np.setdiff1d(np.arange(ROWS), ids)
        assert table[untouched].tobytes() == before[untouched].tobytes()


@pytest.mark.parametrize("ids", [[3, -1, 3], [ROWS, 0], [2, 2, ROWS + 5]])
def test_bad_ids_raise_and_change_nothing(ids, kernels_or_numpy):
    rule = make_rule("sgd")
    table = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    before = table.tobytes()
    with pytest.raises(ValueError, match=r"rows must lie in \[0, rows of the table\)"):
        rule.apply_ids(table, np.array(ids, np.int64), np.ones((len(ids), DIM), np.float32), 0.1)
    assert table.tobytes() == before


@pytest.mark.parametrize(
    ("ids", "values"),
    [
        (np.array([1, 2], np.int32), np.ones((2, DIM), np.float32)),  # ids must be int64
        (np.array([[1, 2]]), np.ones((2, DIM), np.float32)),  # 1-D
        (np.array([1, 2]), np.ones((3, DIM), np.float32)),  # one row per id
        (np.array([1, 2]), np.ones((2, DIM), np.float64)),  # the table's dtype
    ],
)
def test_ids_of_the_wrong_kind_are_refused(ids, values):
    table = np.zeros((ROWS, DIM), np.float32)
    with pytest.raises(ValueError, match="apply_ids needs 1-D int64 ids"):
        make_rule("sgd").apply_ids(table, ids, values, 0.1)
    assert not table.any()


@pytest.mark.parametrize(
    "kw",
    [
        {"name": "sgd", "momentum": 0.9},
        {"name": "sgd", "weight_decay": 0.1},
        {"name": "adagrad"},
        {"name": "adam"},
        {"name": "rmsprop"},
    ],
)
def test_only_plain_sgd_takes_ids(kw):
    rule = make_rule(**kw)
    assert not rule.takes_ids
    with pytest.raises(ValueError, match="needs coalesced rows|no momentum"):
        rule.apply_ids(np.zeros((ROWS, DIM), np.float32), np.array([1]), np.ones((1, DIM), np.float32), 0.1)


def test_row_tables_must_be_float32_or_float64():
    rule = make_rule("sgd")
    with pytest.raises(TypeError, match="row updates take float32 or float64 tables"):
        rule.apply_rows(np.zeros((ROWS, DIM), np.float16), np.zeros((0, ROWS, DIM), np.float16),
                        np.array([1]), np.ones((1, DIM), np.float16), 1, 0.1)  # fmt: skip


def test_rows_must_be_int64():
    rule = make_rule("sgd")
    table = np.zeros((ROWS, DIM), np.float32)
    with pytest.raises(TypeError, match="rows must be 1-D int64"):
        rule.apply_rows(table, np.zeros((0, ROWS, DIM), np.float32), np.array([1], np.int32),
                        np.ones((1, DIM), np.float32), 1, 0.1)  # fmt: skip


@pytest.mark.parametrize(
    ("table_shape", "values_shape", "values_dtype"),
    [
        ((ROWS * DIM,), (1, DIM), np.float32),
        ((ROWS, DIM), (1, DIM + 1), np.float32),
        ((ROWS, DIM), (1, DIM), np.float64),
    ],
)
def test_shapes_and_dtypes_are_checked(table_shape, values_shape, values_dtype):
    rule = make_rule("adagrad")
    table = np.zeros(table_shape, np.float32)
    state = np.zeros((1, *table_shape), np.float32)
    with pytest.raises(ValueError, match="apply_rows needs|values must be"):
        rule.apply_rows(table, state, np.array([1]), np.ones(values_shape, values_dtype), 1, 0.1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_rule("sgd", momentum=0.9), "sgd row updates take no momentum and no weight decay"),
        (lambda: make_rule("sgd", weight_decay=0.1), "sgd row updates take no momentum and no weight decay"),
        (lambda: make_rule("adagrad", weight_decay=0.1), "adagrad row updates take no weight decay"),
        (lambda: make_rule("adam", weight_decay=0.1), "adam row updates take no weight decay"),
        (lambda: make_rule("adamw", weight_decay=0.1), "adamw row updates take no weight decay"),
        (lambda: make_rule("rmsprop"), "rmsprop has no update for sparse gradients.*use sgd"),
    ],
)
def test_row_updates_torch_refuses_name_the_fix(make, message):
    rule = make()
    table = np.zeros((ROWS, DIM), np.float32)
    state = np.zeros((rule.state_slots, ROWS, DIM), np.float32)
    with pytest.raises(ValueError, match=message):
        rule.apply_rows(table, state, np.array([1]), np.ones((1, DIM), np.float32), 1, 0.1)


@pytest.mark.parametrize(
    ("kw", "rows"),
    [({"name": "sgd"}, True), ({"name": "sgd", "momentum": 0.9}, False),
     ({"name": "sgd", "weight_decay": 0.1}, False), ({"name": "adagrad"}, True),
     ({"name": "adagrad", "weight_decay": 0.1}, False), ({"name": "adam"}, True),
     ({"name": "adamw", "weight_decay": 0.1}, False), ({"name": "rmsprop"}, False)],
)  # fmt: skip
def test_supports_rows_says_whether_apply_rows_works(kw, rows):
    rule = make_rule(**kw)
    assert rule.supports_rows is rows
    rule.warm_up()  # compiles what this rule runs, row kernels only where it has them
    table = np.zeros((ROWS, DIM), np.float32)
    state = np.zeros((rule.state_slots, ROWS, DIM), np.float32)
    call = lambda: rule.apply_rows(table, state, np.array([1]), np.ones((1, DIM), np.float32), 1, 0.1)  # noqa: E731
    if rows:
        call()
        assert table[1].any() and not table[0].any()
    else:
        with pytest.raises(ValueError, match="row updates take no|no update for sparse gradients"):
            call()


def test_torch_refuses_weight_decay_on_sparse_gradients():
    """The reason adagrad and sgd row updates refuse weight decay (checked with torch 2.13)."""
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    for opt in (torch.optim.SGD(emb.parameters(), lr=0.1, weight_decay=0.1),
                torch.optim.Adagrad(emb.parameters(), lr=0.1, weight_decay=0.1)):  # fmt: skip
        emb(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError):
            opt.step()
        emb.zero_grad()


# -- coalesce and finiteness ---------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["compiled", "numpy"])
def test_coalesce_matches_torch(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(optim, "_kernels", lambda: None)
    rng = np.random.default_rng(2)
    indices = rng.integers(0, 30, 200)
    values = rng.standard_normal((200, 3)).astype(np.float32)
    rows, sums = coalesce(indices, values)
    ref = torch.sparse_coo_tensor(
        torch.from_numpy(indices)[None], torch.from_numpy(values), (30, 3)
    ).coalesce()
    assert rows.dtype == np.int64 and sums.dtype == np.float32
    np.testing.assert_array_equal(rows, ref.indices()[0].numpy())
    np.testing.assert_allclose(sums, ref.values().numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(rows) > 0)


def test_coalesce_sums_duplicates_in_input_order_and_keeps_large_ids():
    ids = np.array([2**40 + 1, 7, 2**40 + 1, 7, 7])  # above 2**24, where float32 would merge ids
    values = np.array([[1.0], [1e8], [2.0], [1.0], [-1e8]], np.float32)
    rows, sums = coalesce(ids, values)
    np.testing.assert_array_equal(rows, [7, 2**40 + 1])
    # (1e8 + 1) - 1e8 in float32 is 0: the order of the input decides, and it is kept
    np.testing.assert_array_equal(sums, [[0.0], [3.0]])


def test_coalesce_empty_and_bad_shapes():
    rows, sums = coalesce(np.zeros(0, np.int64), np.zeros((0, 5), np.float32))
    assert rows.shape == (0,) and sums.shape == (0, 5)
    with pytest.raises(ValueError, match="coalesce needs"):
        coalesce(np.zeros(3, np.int64), np.zeros((2, 5), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 17, -1])
def test_values_finite_finds_every_non_finite(dtype, bad, where):
    values = np.ones((6, 5), dtype)
    assert values_finite(values)
    values.reshape(-1)[where] = bad
    assert not values_finite(values)
    assert not values_finite(values[:, ::2] if where in (0, -1) else values)  # strided views too


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_a_bound_finite_check_reads_the_array_as_it_is_now(dtype, kernels_or_numpy):
    """A worker binds the check to its gradient buffer once; every later call must see the
    values written since (a view, never a copy)."""
    buffer = np.zeros(40, dtype)
    check = finite_check(buffer[8:24])
    assert check()
    buffer[23] = np.inf
    assert not check()
    buffer[23] = 1.0
    buffer[24] = np.nan  # outside the bound range
    assert check()
    buffer[8] = np.nan
    assert not check()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_finite_takes_every_finite_value_and_no_nan_payload(dtype):
    info = np.finfo(dtype)
    edge = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0], dtype)
    assert values_finite(edge)
    big = np.full(1000, info.max, dtype)
    assert values_finite(big), "finite values whose sum overflows are finite"
    unsigned, exponent = (np.uint32, 0x7F80_0000) if dtype == np.float32 else (np.uint64, 0x7FF0 << 48)
    sign = 1 << (8 * np.dtype(dtype).itemsize - 1)
    payloads = [1, 1 << (info.nmant - 1), (1 << info.nmant) - 1]  # quiet, signalling, all bits
    for bits in [exponent | p for p in payloads] + [sign | exponent | 1]:
        nan = np.array([bits], unsigned).view(dtype)[0]
        assert np.isnan(nan)
        assert not values_finite(np.array([1.0, nan, 2.0], dtype))


# -- the on-disk cache ---------------------------------------------------------------------

_CACHE_PROBE = """
import json
import numpy as np
from numba.core.registry import CPUDispatcher
from paramserver import kernels
from paramserver.optim import RULES, coalesce, make_rule, values_finite

p, g = np.ones(64, np.float32), np.ones(64, np.float32)
for name, kw in [("sgd", {}), ("sgd", {"weight_decay": 0.1}), ("sgd", {"momentum": 0.9})] + [
    (r, {}) for r in RULES if r != "sgd"
]:
    rule = make_rule(name, **kw)
    rule.apply(p, g, np.zeros((rule.state_slots, 64), np.float32), 1, 0.1, None)
table, rows, vals = np.ones((8, 4), np.float32), np.array([1, 5]), np.ones((2, 4), np.float32)
for name in ("sgd", "adagrad", "adam"):
    rule = make_rule(name)
    rule.apply_rows(table, np.zeros((rule.state_slots, 8, 4), np.float32), rows, vals, 1, 0.1)
make_rule("sgd").apply_ids(table, np.array([5, 1, 5]), np.ones((3, 4), np.float32), 0.1)
coalesce(rows, vals)
values_finite(vals)
stats = {
    name: {"hits": sum(f.stats.cache_hits.values()), "misses": sum(f.stats.cache_misses.values()),
           "index": f.stats.cache_path}
    for name, f in vars(kernels).items() if isinstance(f, CPUDispatcher)
}
print(json.dumps(stats))
"""


def _probe(script: str = _CACHE_PROBE, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_kernels_from_disk():
    """What N spawned workers do: the second process (the first may compile, if the cache is
    cold) loads every kernel it calls from numba's on-disk cache and compiles none."""
    _probe()
    stats = _probe()
    assert stats, "no compiled kernels found in paramserver.kernels"
    # check_rows and the private helpers are compiled into their callers' code, so nobody
    # calls their dispatchers
    used = {name: s for name, s in stats.items() if name != "check_rows" and not name.startswith("_")}
    assert all(s["misses"] == 0 for s in used.values()), stats
    assert all(s["hits"] >= 1 for s in used.values()), stats
    assert all(s["index"] for s in used.values()), stats


# -- the rules benchmark compares like with like -------------------------------------------


@pytest.mark.parametrize("label", list(rules_bench.DENSE))
def test_bench_torch_fused_contender_computes_the_same_rule(label):
    """The rules suite's PyTorch contender must do the work our kernel does, or its ratio
    compares different things."""
    spec = rules_bench.DENSE[label]
    rule = make_rule(**spec)
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(256).astype(np.float32)
    g = rng.standard_normal(256).astype(np.float32)
    ours, theirs = p0.copy(), p0.copy()
    state0 = np.full((rule.state_slots, 256), 0.01, np.float32)
    state_o, state_t = state0.copy(), state0.copy()
    step = rules_bench.torch_fused_step(spec, theirs, g, state_t)
    if step is None:
        assert spec["name"] == "rmsprop"  # torch has no fused RMSprop
        return
    for _ in range(3):
        rule.apply(ours, g, state_o, rules_bench.STEP, rules_bench.LR, None)
        step()
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state_t, state_o, rtol=1e-5, atol=1e-7)


_WARM_UP_PROBE = (
    _CACHE_PROBE[: _CACHE_PROBE.index("p, g = ")]
    + """
make_rule("sgd").warm_up()
stats = {
    name: {"hits": sum(f.stats.cache_hits.values()), "misses": sum(f.stats.cache_misses.values())}
    for name, f in vars(kernels).items()
    if isinstance(f, CPUDispatcher) and f.signatures and name != "check_rows"  # inlined, never called
}
print(json.dumps(stats))
"""
)


@pytest.mark.slow  # compiles four kernels from nothing: 5-20 s on 2 cores
def test_warm_up_fills_a_cold_cache_that_the_next_process_loads(tmp_path):
    """A server warms up with an empty cache (NUMBA_CACHE_DIR, which numba prefers to the
    folder next to the source): it compiles and writes; a worker started after it compiles
    nothing."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    first = _probe(_WARM_UP_PROBE, env)
    assert set(first) == {"sgd", "sgd_rows", "sgd_ids", "coalesce", "all_finite"}, first
    assert all(s["misses"] >= 1 and s["hits"] == 0 for s in first.values()), first
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*")), "no cache index written"
    second = _probe(_WARM_UP_PROBE, env)
    assert all(s["misses"] == 0 and s["hits"] >= 1 for s in second.values()), second


_NO_NUMBA = """
import sys
sys.modules["numba"] = None  # import numba now raises ImportError, as where it is not installed
import numpy as np
from paramserver.optim import RULES, coalesce, make_rule, values_finite

p, g = np.ones(64, np.float32), np.full(64, 0.5, np.float32)
for name in RULES:
    rule = make_rule(name)
    assert not rule.fused
    rule.apply(p, g, np.zeros((rule.state_slots, 64), np.float32), 1, 0.1,
               np.zeros((rule.scratch_slots, 64), np.float32))
    if rule.supports_rows:
        rows, vals = coalesce(np.array([5, 1, 5]), np.ones((3, 4), np.float32))
        rule.apply_rows(np.ones((8, 4), np.float32), np.zeros((rule.state_slots, 8, 4), np.float32),
                        rows, vals, 1, 0.1)
assert values_finite(p) and not values_finite(np.array([np.nan], np.float32))
assert "paramserver.kernels" not in sys.modules
print("ok")
"""


def test_everything_runs_without_numba():
    out = subprocess.run([sys.executable, "-c", _NO_NUMBA], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
