"""Checkpoints: atomic safetensors files, bitwise round trips, old .npz files, resuming,
loading into a model."""

from __future__ import annotations

import glob
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from helpers import config

import paramserver as ps
from paramserver.checkpoint import (
    FILENAME,
    LEGACY_FILENAME,
    PARAMS_FILENAME,
    load_checkpoint,
    save_checkpoint,
    save_params,
)
from paramserver.models.numpy_models import NumpyMLP
from paramserver.models.torch_models import MLP
from paramserver.store import COUNTER_FIELDS, Counters

LAYOUT = ps.Layout.from_arrays({"a": np.zeros((3, 5), np.float32), "b": np.zeros(7, np.float32)})


def parts(seed: int = 0) -> dict[str, np.ndarray]:
    """Parameters (zero padding between tensors, as every layout keeps it), Adam-like
    state and counter rows of two workers."""
    rng = np.random.default_rng(seed)
    params = LAYOUT.flatten({"a": rng.normal(size=(3, 5)), "b": rng.normal(size=7)})
    state = rng.normal(size=(2, LAYOUT.flat_size)).astype(np.float32)
    counters = rng.normal(size=(2, len(COUNTER_FIELDS)))
    for field in ("steps", "epoch", "batch"):
        Counters(counters).column(field)[:] = rng.integers(0, 100, 2)
    return {"params": params, "state": state, "counters": counters}


def save(path: str, seed: int = 0) -> dict[str, np.ndarray]:
    a = parts(seed)
    save_checkpoint(path, layout=LAYOUT, version=42, config={"lr": 0.1}, extra={"backend": "numpy"}, **a)
    return a


def test_save_and_load_round_trip_bitwise(tmp_path):
    path = str(tmp_path / FILENAME)
    a = save(path)
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.params, a["params"])
    np.testing.assert_array_equal(ckpt.state, a["state"])
    np.testing.assert_array_equal(ckpt.counters, a["counters"])
    assert ckpt.params.dtype == np.float32 and ckpt.counters.dtype == np.float64
    assert ckpt.version == 42 and ckpt.config == {"lr": 0.1} and ckpt.meta["backend"] == "numpy"
    assert ckpt.layout == LAYOUT
    assert os.listdir(tmp_path) == [FILENAME], "the temporary file must be gone"
    assert load_checkpoint(str(tmp_path)).version == 42, "a run directory finds its checkpoint"


def test_other_tools_read_a_checkpoints_tensors_by_name(tmp_path):
    path = str(tmp_path / FILENAME)
    a = save(path)
    named = safetensors.numpy.load_file(path)
    assert set(named) == {"params.a", "params.b", "state", "counters"}
    np.testing.assert_array_equal(named["params.b"], LAYOUT.unflatten(a["params"])["b"])
    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "paramserver-checkpoint" and json.loads(meta["layout"]) == LAYOUT.to_dict()


def test_a_params_file_loads_into_a_fresh_torch_module_strictly(tmp_path):
    torch.manual_seed(0)
    trained = MLP(64, 10, hidden=16)
    path = str(tmp_path / PARAMS_FILENAME)
    save_params(path, {k: v.detach().numpy() for k, v in trained.named_parameters()}, {"run": "r1"})
    fresh = MLP(64, 10, hidden=16)
    fresh.load_state_dict(safetensors.torch.load_file(path), strict=True)
    for (name, p), (_, q) in zip(trained.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "paramserver-params", "run": "r1"}


def test_an_old_npz_checkpoint_still_loads(tmp_path):
    # Written exactly as the format-1 writer wrote it: arrays plus JSON meta as uint8.
    a = parts()
    meta = {
        "format": "paramserver-checkpoint", "format_version": 1, "layout": LAYOUT.to_dict(),
        "fingerprint": LAYOUT.fingerprint, "version": 42, "config": {"lr": 0.1}, "time": 1.0,
        "backend": "numpy",
    }  # fmt: skip
    path = tmp_path / LEGACY_FILENAME
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **a)
    ckpt = load_checkpoint(str(tmp_path))
    for k in ("params", "state", "counters"):
        np.testing.assert_array_equal(getattr(ckpt, k), a[k], err_msg=k)
    assert ckpt.version == 42 and ckpt.meta["backend"] == "numpy" and ckpt.layout == LAYOUT


def test_a_crash_at_the_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / FILENAME)
    save(path, seed=0)
    before = Path(path).read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash at the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(path, seed=1)
    with pytest.raises(OSError, match="simulated crash"):
        save_params(str(tmp_path / PARAMS_FILENAME), {"w": np.ones(3, np.float32)})
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    assert os.listdir(tmp_path) == [FILENAME], "no temporary file may remain"
    np.testing.assert_array_equal(load_checkpoint(path).params, parts(0)["params"])


def test_a_crash_while_writing_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / FILENAME)
    save(path, seed=0)
    before = Path(path).read_bytes()
    real = safetensors.numpy.save_file

    def half_then_crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt  # anything, even ^C, half-way through the write

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save(path, seed=1)
    assert Path(path).read_bytes() == before
    assert os.listdir(tmp_path) == [FILENAME], "no temporary file may remain"


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
        seen.extend(glob.glob(str(tmp_path / "*" / FILENAME)))
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
        return bool(glob.glob(str(tmp_path / "*" / FILENAME)))

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


class TransposedMLP(NumpyMLP):
    """NumpyMLP's counts with its first weight's shape turned round: a checkpoint of one
    must not resume into the other."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = super().shapes()
        out["W0"] = out["W0"][::-1]
        return out

    def init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = super().init(rng)
        out["W0"] = np.ascontiguousarray(out["W0"].T)
        return out

    def forward(self, params, x):
        return super().forward({**params, "W0": params["W0"].T}, x)

    def backward(self, params, cache, dlogits, grads):
        turned = {**grads, "W0": np.zeros_like(grads["W0"].T)}
        super().backward({**params, "W0": params["W0"].T}, cache, dlogits, turned)
        grads["W0"][...] = turned["W0"].T


def test_a_mismatch_with_equal_counts_names_the_tensor(digits, tmp_path):
    first = ps.train(NumpyMLP(64, 10, 16), digits, config(epochs=1, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"tensor 'W0' is \(64, 16\) float32 there, 'W0' \(16, 64\)"):
        ps.train(TransposedMLP(64, 10, 16), digits, config(epochs=2, resume=first.checkpoint))


@pytest.mark.parametrize("version", [-1, 1.5, True])
def test_save_checkpoint_refuses_a_version_load_would_refuse(tmp_path, version):
    with pytest.raises(ValueError, match="version must be a non-negative integer"):
        save_checkpoint(str(tmp_path / FILENAME), layout=LAYOUT, version=version, config={}, **parts())
    assert os.listdir(tmp_path) == []
