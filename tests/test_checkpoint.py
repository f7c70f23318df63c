"""Checkpoints: atomic files, bitwise round trips, resuming, loading into a model."""

from __future__ import annotations

import glob
import os
import signal

import numpy as np
import pytest
import torch
from helpers import config

import paramserver as ps
from paramserver.checkpoint import load_checkpoint, save_checkpoint
from paramserver.models.numpy_models import NumpyMLP
from paramserver.models.torch_models import MLP


def test_save_and_load_round_trip_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    layout = ps.Layout.from_arrays({"a": np.zeros((3, 5), np.float32), "b": np.zeros(7, np.float32)})
    params = rng.normal(size=layout.flat_size).astype(np.float32)
    state = rng.normal(size=(2, layout.flat_size)).astype(np.float32)
    counters = rng.normal(size=(3, 4))
    path = str(tmp_path / "c.npz")
    save_checkpoint(
        path, layout=layout, params=params, state=state, counters=counters, version=42, config={"lr": 0.1}
    )
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.params, params)
    np.testing.assert_array_equal(ckpt.state, state)
    np.testing.assert_array_equal(ckpt.counters, counters)
    assert ckpt.version == 42 and ckpt.config == {"lr": 0.1}
    assert ckpt.layout.fingerprint == layout.fingerprint
    assert os.listdir(tmp_path) == ["c.npz"], "the temporary file must be gone"


def test_a_run_writes_a_checkpoint_equal_to_its_final_state(digits, tmp_path):
    cfg = config(workers=2, epochs=2, optimizer="adam", lr=0.003, out_dir=str(tmp_path))
    result = ps.train(NumpyMLP(64, 10, 16), digits, cfg)
    assert result.checkpoint and os.path.dirname(result.checkpoint) == result.run_dir
    ckpt = load_checkpoint(result.checkpoint)
    for name, value in ckpt.named_params().items():
        np.testing.assert_array_equal(value, result.params[name], err_msg=name)
    assert ckpt.state.shape == (2, ckpt.layout.flat_size)  # Adam's two moments, shared
    assert np.abs(ckpt.state).sum() > 0
    assert ckpt.version == result.version == result.updates
    assert ckpt.config["optimizer"] == "adam"


def test_resuming_continues_exactly_where_the_run_stopped(digits, tmp_path):
    # One worker is deterministic: 2 epochs + 2 resumed epochs == 4 epochs in one go,
    # bit for bit (parameters, momentum, batch order, learning-rate schedule).
    base = dict(workers=1, lr=0.05, lr_schedule="step", lr_step=50, lr_gamma=0.9)
    whole = ps.train(NumpyMLP(64, 10, 16), digits, config(epochs=4, **base))
    first = ps.train(NumpyMLP(64, 10, 16), digits, config(epochs=2, out_dir=str(tmp_path), **base))
    second = ps.train(NumpyMLP(64, 10, 16), digits, config(epochs=4, resume=first.checkpoint, **base))
    assert second.version == whole.version == first.updates + second.updates
    for name in whole.params:
        np.testing.assert_array_equal(second.params[name], whole.params[name], err_msg=name)


def test_a_checkpoint_loads_into_a_torch_model(digits, tmp_path):
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=16)
    result = ps.train(model, digits, config(workers=2, epochs=2, out_dir=str(tmp_path)))
    fresh = MLP(64, 10, hidden=16)
    load_checkpoint(result.checkpoint).apply_to(fresh)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_periodic_checkpoints_are_written_while_training(digits, tmp_path):
    seen = []

    def watch(info):
        seen.extend(glob.glob(str(tmp_path / "*" / "checkpoint.npz")))
        return bool(seen)

    cfg = config(workers=2, epochs=10_000, checkpoint_every=200, out_dir=str(tmp_path), max_seconds=60)
    result = ps.train(NumpyMLP(64, 10, 16), digits, cfg, callback=watch)
    assert result.stop_reason == "callback", "no checkpoint appeared while training"


def test_sigusr1_writes_a_checkpoint_on_demand(digits, tmp_path):
    asked = []

    def ask_then_watch(info):
        if not asked and info["updates"] > 100:
            os.kill(os.getpid(), signal.SIGUSR1)
            asked.append(info["updates"])
        return bool(glob.glob(str(tmp_path / "*" / "checkpoint.npz")))

    cfg = config(workers=2, epochs=10_000, out_dir=str(tmp_path), max_seconds=60)
    result = ps.train(NumpyMLP(64, 10, 16), digits, cfg, callback=ask_then_watch)
    assert asked and result.stop_reason == "callback"


def test_resume_errors_name_the_problem(digits, tmp_path):
    first = ps.train(NumpyMLP(64, 10, 16), digits, config(epochs=1, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="does not match the model"):
        ps.train(NumpyMLP(64, 10, 32), digits, config(epochs=2, resume=first.checkpoint))
    with pytest.raises(ValueError, match="resume with --optimizer sgd"):
        ps.train(NumpyMLP(64, 10, 16), digits, config(epochs=2, optimizer="adam", resume=first.checkpoint))
    with pytest.raises(ValueError, match="no checkpoint at"):
        ps.train(NumpyMLP(64, 10, 16), digits, config(resume=str(tmp_path / "nothing.npz")))
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a paramserver checkpoint"):
        ps.train(NumpyMLP(64, 10, 16), digits, config(resume=str(other)))
    with pytest.raises(ValueError, match="raise --steps to train on"):
        ps.train(NumpyMLP(64, 10, 16), digits, config(steps=5, resume=first.checkpoint))
