"""Update rules: the same steps as torch.optim, whole or stripe by stripe, fused or as NumPy
passes, and their argument checks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import paramserver.optim as optim
from paramserver.optim import RULES, SGD, Adagrad, Adam, RMSProp, Updater, UpdateRule, make_rule

N = 1000
STEPS = 5

# (id, our rule, the torch optimizer with the same settings, learning rate)
MakeTorch = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]
CASES: list[tuple[str, Callable[[], UpdateRule], MakeTorch, float]] = [
    ("sgd", lambda: make_rule("sgd"), lambda ps, lr: torch.optim.SGD(ps, lr=lr), 0.05),
    (
        "sgd-momentum",
        lambda: make_rule("sgd", momentum=0.9),
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
        0.05,
    ),
    (
        "sgd-nesterov",
        lambda: make_rule("sgd", momentum=0.9, nesterov=True),
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
        0.05,
    ),
    (
        "sgd-weight-decay",
        lambda: make_rule("sgd", weight_decay=0.1),
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, weight_decay=0.1),
        0.05,
    ),
    (
        "sgd-nesterov-weight-decay",
        lambda: make_rule("sgd", momentum=0.8, nesterov=True, weight_decay=0.05),
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.8, nesterov=True, weight_decay=0.05),
        0.05,
    ),
    ("adam", lambda: make_rule("adam"), lambda ps, lr: torch.optim.Adam(ps, lr=lr), 0.01),
    (
        "adam-betas-eps",
        lambda: make_rule("adam", betas=(0.8, 0.99), eps=1e-6),
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.8, 0.99), eps=1e-6),
        0.01,
    ),
    (
        "adam-weight-decay",
        lambda: make_rule("adam", weight_decay=0.1),
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, weight_decay=0.1),
        0.01,
    ),
    (
        "adamw-weight-decay",
        lambda: make_rule("adamw", weight_decay=0.1),
        lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1),
        0.01,
    ),
    ("rmsprop", lambda: make_rule("rmsprop"), lambda ps, lr: torch.optim.RMSprop(ps, lr=lr), 0.01),
    (
        "rmsprop-weight-decay",
        lambda: make_rule("rmsprop", alpha=0.9, weight_decay=0.1),
        lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.9, weight_decay=0.1),
        0.01,
    ),
    ("adagrad", lambda: make_rule("adagrad"), lambda ps, lr: torch.optim.Adagrad(ps, lr=lr), 0.05),
    (
        "adagrad-weight-decay-eps",
        lambda: make_rule("adagrad", weight_decay=0.1, eps=1e-6),
        lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, weight_decay=0.1, eps=1e-6),
        0.05,
    ),
]
IDS = [c[0] for c in CASES]


def _problem(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Initial parameters and one gradient per step, float32."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(STEPS)]
    # A few zeros and tiny values, where eps and weight decay decide the update.
    grads[0][:5] = 0.0
    grads[1][5:10] = 1e-7
    return p0, grads


def _buffers(rule: UpdateRule, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((rule.state_slots, n), np.float32), np.zeros((rule.scratch_slots, n), np.float32)


@pytest.mark.parametrize(("make", "make_torch", "lr"), [c[1:] for c in CASES], ids=IDS)
def test_rule_matches_torch_optim(make, make_torch, lr):
    rule = make()
    p0, grads = _problem()
    p = p0.copy()
    state, scratch = _buffers(rule)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = make_torch([tp], lr)

    for t, g in enumerate(grads, start=1):
        g_before = g.copy()
        rule.apply(p, g, state, t, lr, scratch)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()

        np.testing.assert_array_equal(g, g_before)  # the gradient is read only
        assert p.dtype == np.float32
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
    assert not np.array_equal(p, p0)


@pytest.mark.parametrize(("make", "make_torch", "lr"), [c[1:] for c in CASES], ids=IDS)
def test_rule_matches_torch_state(make, make_torch, lr):
    """The state rows hold what torch calls momentum_buffer / exp_avg, exp_avg_sq / square_avg."""
    rule = make()
    p0, grads = _problem(seed=1)
    p = p0.copy()
    state, scratch = _buffers(rule)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = make_torch([tp], lr)
    for t, g in enumerate(grads, start=1):
        rule.apply(p, g, state, t, lr, scratch)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()

    torch_state = opt.state[tp]
    keys = {
        SGD: ["momentum_buffer"],
        Adam: ["exp_avg", "exp_avg_sq"],
        RMSProp: ["square_avg"],
        Adagrad: ["sum"],
    }[type(rule)][: rule.state_slots]
    assert len(keys) == rule.state_slots
    for row, key in zip(state, keys, strict=True):
        np.testing.assert_allclose(row, torch_state[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


STRIPES = [(0, 1), (1, 7), (7, 64), (64, 65), (65, 333), (333, 900), (900, N)]


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_stripes_equal_whole_vector_bitwise(make):
    rule = make()
    p0, grads = _problem(seed=2)
    lr = 0.01

    whole = p0.copy()
    state_w, scratch_w = _buffers(rule)
    striped = p0.copy()
    state_s, scratch_s = _buffers(rule)
    for t, g in enumerate(grads, start=1):
        rule.apply(whole, g, state_w, t, lr, scratch_w)
        for lo, hi in STRIPES:
            rule.apply(striped[lo:hi], g[lo:hi], state_s[:, lo:hi], t, lr, scratch_s[:, lo:hi])

    assert sum(hi - lo for lo, hi in STRIPES) == N
    np.testing.assert_array_equal(striped.view(np.uint32), whole.view(np.uint32))
    np.testing.assert_array_equal(state_s.view(np.uint32), state_w.view(np.uint32))


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_stripes_in_any_order_with_own_scratch(make):
    """Stripes applied out of order, each with a scratch of its own length, change nothing."""
    rule = make()
    p0, grads = _problem(seed=3)
    lr = 0.01

    whole = p0.copy()
    state_w, scratch_w = _buffers(rule)
    striped = p0.copy()
    state_s = np.zeros_like(state_w)
    for t, g in enumerate(grads, start=1):
        rule.apply(whole, g, state_w, t, lr, scratch_w)
        for lo, hi in reversed(STRIPES):
            scratch = np.full((rule.scratch_slots, hi - lo), np.nan, np.float32)
            rule.apply(striped[lo:hi], g[lo:hi], state_s[:, lo:hi], t, lr, scratch)

    np.testing.assert_array_equal(striped.view(np.uint32), whole.view(np.uint32))


def test_float64_stays_float64():
    rule = make_rule("adam", weight_decay=0.01)
    p0 = np.linspace(-1, 1, 10)
    p = p0.copy()
    g = np.linspace(1, -1, 10)
    state = np.zeros((rule.state_slots, 10))
    scratch = np.zeros((rule.scratch_slots, 10))

    rule.apply(p, g, state, 1, 0.1, scratch)

    assert p.dtype == np.float64
    # Adam's first step moves each parameter by lr against the sign of its (decayed) gradient.
    np.testing.assert_allclose(p - p0, -0.1 * np.sign(g + 0.01 * p0), rtol=1e-6)


# -- fused kernels and NumPy passes ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_fused_equals_numpy_passes_bitwise(make, dtype):
    """The compiled pass rounds exactly as the NumPy passes do, so either may run anywhere."""
    rule = make()
    assert rule.fused, "numba is a dependency: the kernels must be importable here"
    p0, grads = _problem(seed=4)
    fused, passes = p0.astype(dtype), p0.astype(dtype)
    state_f = np.zeros((rule.state_slots, N), dtype)
    state_p, scratch = np.zeros_like(state_f), np.zeros((rule.scratch_slots, N), dtype)
    for t, g in enumerate(grads, start=1):
        rule.apply(fused, g.astype(dtype), state_f, t, 0.01, scratch)
        rule.apply_numpy(passes, g.astype(dtype), state_p, t, 0.01, scratch)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(fused.view(bits), passes.view(bits))
    np.testing.assert_array_equal(state_f.view(bits), state_p.view(bits))
    assert not np.array_equal(fused, p0.astype(dtype))


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_without_numba_apply_runs_the_numpy_passes(make, monkeypatch):
    """With the kernels unavailable (no numba), ``apply`` is ``apply_numpy``."""
    rule = make()
    p0, grads = _problem(seed=5)
    expected, state_e, scratch = p0.copy(), *_buffers(rule)
    for t, g in enumerate(grads, start=1):
        rule.apply_numpy(expected, g, state_e, t, 0.01, scratch)

    monkeypatch.setattr(optim, "_kernels", lambda: None)
    assert not rule.fused
    got, state_g, _ = p0.copy(), *_buffers(rule)
    for t, g in enumerate(grads, start=1):
        rule.apply(got, g, state_g, t, 0.01, np.full_like(scratch, np.nan))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_mixed_dtypes_take_the_numpy_passes():
    """A float64 gradient on float32 parameters: NumPy's promotion decides, as before."""
    rule = make_rule("adam")
    p0, grads = _problem(seed=6)
    a, b = p0.copy(), p0.copy()
    state_a, scratch = _buffers(rule)
    state_b = state_a.copy()
    rule.apply(a, grads[0].astype(np.float64), state_a, 1, 0.01, scratch)
    rule.apply_numpy(b, grads[0].astype(np.float64), state_b, 1, 0.01, scratch)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "numpy"])
@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_updater_ranges_equal_one_apply(make, fused, monkeypatch):
    """The updater (whole ranges when fused, blocks of 64 otherwise) gives the bits of one
    ``apply_numpy`` over the vector."""
    if not fused:
        monkeypatch.setattr(optim, "_kernels", lambda: None)
    rule = make()
    p0, grads = _problem(seed=7)
    expected, state_e, scratch = p0.copy(), *_buffers(rule)
    params, grad, state = p0.copy(), np.zeros(N, np.float32), np.zeros_like(state_e)
    up = Updater(rule, params, grad, state, lr=0.01, block=64)
    for t, g in enumerate(grads, start=1):
        rule.apply_numpy(expected, g, state_e, t, 0.01, scratch)
        grad[...] = g
        up.t = t
        up(0, 500)
        up(500, N)
    np.testing.assert_array_equal(params.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(state.view(np.uint32), state_e.view(np.uint32))


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_float16_takes_the_numpy_passes(make):
    """numba has no float16 arithmetic on a CPU; NumPy's passes still run there."""
    rule = make()
    p0, grads = _problem(seed=9)
    a, b = p0.astype(np.float16), p0.astype(np.float16)
    state_a = np.zeros((rule.state_slots, N), np.float16)
    state_b, scratch = state_a.copy(), np.zeros((rule.scratch_slots, N), np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):  # eps 1e-8 is 0 in float16: 0 / 0
        rule.apply(a, grads[0].astype(np.float16), state_a, 1, 0.01, scratch)
        rule.apply_numpy(b, grads[0].astype(np.float16), state_b, 1, 0.01, scratch)
    assert a.dtype == np.float16
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_updater_with_a_float64_gradient_goes_block_by_block():
    """Mixed dtypes take the NumPy passes, which need their block-long scratch rows."""
    rule = make_rule("adam")
    p0, grads = _problem(seed=8)
    expected, state_e, scratch = p0.copy(), *_buffers(rule)
    params, grad, state = p0.copy(), np.zeros(N, np.float64), np.zeros_like(state_e)
    up = Updater(rule, params, grad, state, lr=0.01, block=64)
    assert not up.whole_ranges
    for t, g in enumerate(grads, start=1):
        rule.apply_numpy(expected, g.astype(np.float64), state_e, t, 0.01, scratch)
        grad[...] = g
        up.t = t
        up(0, N)
    np.testing.assert_array_equal(params, expected)


# -- construction ----------------------------------------------------------------------------


def test_make_rule_names_and_slots():
    assert RULES == ("sgd", "adam", "adamw", "rmsprop", "adagrad")
    sgd = make_rule("sgd")
    assert isinstance(sgd, SGD) and sgd.state_slots == 0
    assert make_rule("sgd", momentum=0.9).state_slots == 1
    adam = make_rule("adam")
    assert isinstance(adam, Adam) and not adam.decoupled and adam.state_slots == 2
    adamw = make_rule("adamw", weight_decay=0.01)
    assert isinstance(adamw, Adam) and adamw.decoupled and adamw.weight_decay == 0.01
    rms = make_rule("rmsprop", alpha=0.95)
    assert isinstance(rms, RMSProp) and rms.alpha == 0.95 and rms.state_slots == 1
    ada = make_rule("adagrad")
    assert isinstance(ada, Adagrad) and ada.state_slots == 1
    # eps defaults to each rule's own, as in torch.optim
    assert ada.eps == 1e-10 and adam.eps == 1e-8 and rms.eps == 1e-8
    assert make_rule("adagrad", eps=1e-6).eps == 1e-6
    for name in RULES:
        rule = make_rule(name)
        assert rule.scratch_slots >= 1


@pytest.mark.parametrize("name", ["lion", "SGD", "", "adam "])
def test_make_rule_unknown_name_names_the_choices(name):
    with pytest.raises(
        ValueError, match=r"unknown optimizer .*choose one of sgd, adam, adamw, rmsprop, adagrad"
    ):
        make_rule(name)


def test_sgd_nesterov_without_momentum():
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        make_rule("sgd", nesterov=True)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        SGD(nesterov=True, momentum=0.0)


def test_sgd_negative_momentum():
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        SGD(momentum=-0.1)


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.999)])
def test_adam_betas_out_of_range(betas):
    with pytest.raises(ValueError, match=r"beta[12] must be in \[0, 1\)"):
        make_rule("adam", betas=betas)
