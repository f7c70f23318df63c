"""Damaged, foreign and hostile files: every one is a ValueError that starts with its path.

Checkpoints in both formats (``checkpoint.safetensors`` and the older
``checkpoint.npz``) and RL policy files. No case may surface as a KeyError,
IndexError, UnicodeDecodeError or RecursionError traceback, nor as a library's
advice to allow pickle (NumPy) or to change ``weights_only`` (torch).

The module is reached as ``checkpoint.<name>`` (not imported by name) so that
each test fails on its own account where a function is missing.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from paramserver import checkpoint
from paramserver.layout import Layout
from paramserver.store import COUNTER_FIELDS, Counters

LAYOUT = Layout.from_arrays({"w": np.zeros((3, 5), np.float32), "b": np.zeros(7, np.float32)})
N = LAYOUT.flat_size
WIDTH = len(COUNTER_FIELDS)
DROP = object()
"""A change that removes the key."""


@contextmanager
def refused(path: Any, match: str) -> Iterator[None]:
    """The block must raise a ValueError whose message starts with ``path`` and says ``match``."""
    with pytest.raises(ValueError) as info:
        yield
    msg = str(info.value)
    assert msg.startswith(str(path)), f"the message does not start with the file's path: {msg}"
    assert re.search(match, msg), f"{match!r} not in: {msg}"
    for advice in ("allow_pickle", "weights_only"):
        assert advice not in msg, msg


def _apply(d: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for k, v in changes.items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    params = LAYOUT.flatten({"w": rng.normal(size=(3, 5)), "b": rng.normal(size=7)})
    counters = np.zeros((2, WIDTH))
    Counters(counters).column("steps")[:] = [5, 7]
    Counters(counters).column("epoch")[:] = 1
    return {"params": params, "state": np.zeros((2, N), np.float32), "counters": counters}


# -- format 1: checkpoint.npz, written as the previous release wrote it ----------------------------


def npz_meta(**changes: Any) -> dict[str, Any]:
    meta = {
        "format": "paramserver-checkpoint",
        "format_version": 1,
        "layout": LAYOUT.to_dict(),
        "fingerprint": LAYOUT.fingerprint,
        "version": 12,
        "config": {"lr": 0.1},
        "time": 0.0,
    }
    return _apply(meta, changes)


def write_npz(path: Any, meta: Any = None, **arrays: Any) -> str:
    """A format-1 file; ``meta`` may be a dict/list (JSON-encoded) or raw bytes."""
    meta = npz_meta() if meta is None else meta
    blob = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    parts = {**good_arrays(), **arrays}
    np.savez(path, meta=np.frombuffer(blob, dtype=np.uint8), **parts)
    return str(path)


def counters_with(field: str, value: float) -> np.ndarray:
    c = good_arrays()["counters"]
    Counters(c).column(field)[1] = value
    return c


DEEP = b"[" * 100_000 + b"]" * 100_000

NPZ_CASES = {
    "meta lacks the layout": (dict(meta=npz_meta(layout=DROP)), "lacks the layout"),
    "meta is a list": (dict(meta=[1, 2, 3]), "is a JSON list, expected a dict"),
    "meta is not JSON": (dict(meta=b"{this is not json"), "not valid JSON"),
    "meta is not UTF-8": (dict(meta=b'{"format": "\xff\xfe"}'), "not UTF-8"),
    "meta nested too deeply": (dict(meta=DEEP), "nested too deeply"),
    "layout is a string": (dict(meta=npz_meta(layout="w")), "layout is not a"),
    "layout entry malformed": (dict(meta=npz_meta(layout={"nbytes": 64, "fields": [["w"]]})), "entry 0"),
    "layout offsets overlap": (
        dict(
            meta=npz_meta(
                layout={**LAYOUT.to_dict(), "fields": [["w", 0, [3, 5], "<f4"], ["b", 0, [7], "<f4"]]}
            )
        ),
        "offsets differ",
    ),
    "layout of objects": (
        dict(meta=npz_meta(layout={"nbytes": 64, "fields": [["w", 0, [2], "|O"]]}, fingerprint=DROP)),
        "dtype",
    ),
    "fingerprint does not match": (dict(meta=npz_meta(fingerprint="0" * 32)), "fingerprint"),
    "version of 5000 digits": (dict(meta=b'{"version": ' + b"9" * 5000 + b"}"), "cannot be read as JSON"),
    "version negative": (dict(meta=npz_meta(version=-1)), "version -1 is not"),
    "version NaN": (dict(meta=npz_meta(version=float("nan"))), "version nan is not"),
    "version a fraction": (dict(meta=npz_meta(version=1.5)), "version 1.5 is not"),
    "version text": (dict(meta=npz_meta(version="12")), "version '12' is not"),
    "config a list": (dict(meta=npz_meta(config=[1])), "config is not a JSON object"),
    "counters 1-D": (dict(counters=np.zeros(WIDTH)), "counters: shape"),
    "counters too narrow": (dict(counters=np.zeros((2, WIDTH - 1))), f"counters are 2 x {WIDTH - 1}"),
    "counters of no worker": (dict(counters=np.zeros((0, WIDTH))), "counters are 0 x"),
    "counters as int": (dict(counters=np.zeros((2, WIDTH), np.int64)), "dtype int64"),
    "epoch 1e30": (dict(counters=counters_with("epoch", 1e30)), "worker 1's epoch counter is 1e\\+30"),
    "epoch NaN": (dict(counters=counters_with("epoch", float("nan"))), "epoch counter is nan"),
    "batch negative": (dict(counters=counters_with("batch", -1)), "batch counter is -1"),
    "steps a fraction": (dict(counters=counters_with("steps", 2.5)), "steps counter is 2.5"),
    "params too short": (dict(params=np.zeros(N - 1, np.float32)), f"are {N - 1} long"),
    "params of another dtype": (dict(params=np.zeros(N)), "dtype float64, expected float32"),
    "params 2-D": (dict(params=np.zeros((1, N), np.float32)), "expected 1 dimensions"),
    "state too wide": (dict(state=np.zeros((2, N + 1), np.float32)), f"needs {N} columns"),
    "state 1-D": (dict(state=np.zeros(N, np.float32)), "optimizer state: shape"),
    "state of objects": (dict(state=np.array([None, 1], dtype=object)), "Python objects"),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_a_damaged_npz_checkpoint_is_refused_naming_the_file(tmp_path, case):
    kwargs, match = NPZ_CASES[case]
    path = write_npz(tmp_path / "checkpoint.npz", **kwargs)
    with refused(path, match):
        checkpoint.load_checkpoint(path)


def test_an_npz_checkpoint_the_previous_release_wrote_still_loads(tmp_path):
    path = write_npz(tmp_path / "checkpoint.npz", meta=npz_meta(backend="numpy"))
    ckpt = checkpoint.load_checkpoint(str(tmp_path))  # the run directory finds it
    np.testing.assert_array_equal(ckpt.params, good_arrays()["params"])
    assert ckpt.version == 12 and ckpt.meta["backend"] == "numpy" and ckpt.layout == LAYOUT
    assert checkpoint.find_checkpoint(str(tmp_path)) == path


# -- format 2: checkpoint.safetensors ----------------------------------------------------------------


def write_st(path: Any, metadata: dict[str, Any] | None = None, **tensors: Any) -> str:
    """A format-2 file: a good checkpoint, then its header metadata and tensors changed
    (``DROP`` removes one) and written back by the library, bypassing our checks."""
    path = str(path)
    a = good_arrays()
    checkpoint.save_checkpoint(
        path, layout=LAYOUT, params=a["params"], state=a["state"], counters=a["counters"],
        version=12, config={"lr": 0.1}, extra={"backend": "numpy"},
    )  # fmt: skip
    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        names = f.keys()
        raw = {k: f.get_tensor(k) for k in names}
    raw = _apply(raw, tensors)
    safetensors.numpy.save_file(raw, path, metadata=_apply(meta, metadata or {}))
    return path


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


ST_CASES = {
    "no format": (dict(metadata={"format": DROP}), "names no format"),
    "another format": (dict(metadata={"format": "something-else"}), "not a paramserver-checkpoint file"),
    "a newer format": (dict(metadata={"format_version": "99"}), "newer paramserver"),
    "meta lacks the layout": (dict(metadata={"layout": DROP}), "lacks the layout"),
    "meta lacks the version": (dict(metadata={"version": DROP}), "lacks the version"),
    "layout is a list": (dict(metadata={"layout": "[1, 2]"}), "is a JSON list, expected a dict"),
    "layout is not JSON": (dict(metadata={"layout": "{oops"}), "not valid JSON"),
    "config nested too deeply": (dict(metadata={"config": deep_json(100_000)}), "nested too deeply"),
    "config nested deeper than the limit": (dict(metadata={"config": deep_json(200)}), "deeper than"),
    "extra is a list": (dict(metadata={"extra": "[]"}), "extra metadata is a JSON list"),
    "fingerprint does not match": (dict(metadata={"fingerprint": "0" * 32}), "fingerprint"),
    "version negative": (dict(metadata={"version": "-1"}), "version '-1' is not"),
    "version NaN": (dict(metadata={"version": "nan"}), "version 'nan' is not"),
    "version a fraction": (dict(metadata={"version": "1.5"}), "version '1.5' is not"),
    "time not a number": (dict(metadata={"time": "yesterday"}), "time 'yesterday'"),
    "counters 1-D": (dict(counters=np.zeros(WIDTH)), "counters: shape"),
    "counters too narrow": (dict(counters=np.zeros((2, WIDTH - 1))), f"counters are 2 x {WIDTH - 1}"),
    "counters float32": (dict(counters=np.zeros((2, WIDTH), np.float32)), "dtype float32, expected float64"),
    "counters missing": (dict(counters=DROP), "lacks the tensor 'counters'"),
    "epoch 1e30": (dict(counters=counters_with("epoch", 1e30)), "epoch counter is 1e\\+30"),
    "epoch NaN": (dict(counters=counters_with("epoch", float("nan"))), "epoch counter is nan"),
    "steps too large": (dict(counters=counters_with("steps", 2.0**53)), "steps counter"),
    "a tensor missing": (dict(**{"params.b": DROP}), "lacks the tensor 'params.b'"),
    "a tensor of the wrong shape": (
        dict(**{"params.w": np.zeros((5, 3), np.float32)}),
        "layout says float32",
    ),
    "a tensor of the wrong dtype": (dict(**{"params.w": np.zeros((3, 5))}), "is float64\\[3, 5\\]"),
    "a tensor the layout does not name": (dict(**{"params.extra": np.zeros(2, np.float32)}), "params.extra"),
    "state too narrow": (dict(state=np.zeros((2, N - 1), np.float32)), f"needs {N} columns"),
    "state of another dtype": (dict(state=np.zeros((2, N), np.float16)), "dtype float16"),
}


@pytest.mark.parametrize("case", ST_CASES)
def test_a_damaged_safetensors_checkpoint_is_refused_naming_the_file(tmp_path, case):
    kwargs, match = ST_CASES[case]
    path = write_st(tmp_path / "checkpoint.safetensors", **kwargs)
    with refused(path, match):
        checkpoint.load_checkpoint(path)


def test_a_safetensors_header_that_is_not_utf8_is_refused(tmp_path):
    path = write_st(tmp_path / "checkpoint.safetensors", metadata={"note": "ZZZZ"})
    data = Path(path).read_bytes()
    assert data.count(b"ZZZZ") == 1
    Path(path).write_bytes(data.replace(b"ZZZZ", b"\xff\xfe\xff\xfe"))  # same length: the header stays
    with refused(path, "truncated or damaged"):
        checkpoint.load_checkpoint(path)


# -- whatever else a path may hold -------------------------------------------------------------------


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.npz"
    path.write_text("lr = 0.1\nepochs = 3\n")
    with refused(path, "neither a .safetensors nor a .npz"):
        checkpoint.load_checkpoint(str(path))


@pytest.mark.parametrize("size", [0, 5, 4096])
def test_random_bytes_are_not_a_checkpoint(tmp_path, size):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(np.random.default_rng(size).bytes(size))
    with refused(path, "not a paramserver file"):
        checkpoint.load_checkpoint(str(path))


def test_a_directory_without_a_checkpoint_says_so(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with refused(tmp_path, "holds no checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path))


def test_a_missing_file_says_so(tmp_path):
    with refused(tmp_path / "nothing.safetensors", "no checkpoint at this path"):
        checkpoint.load_checkpoint(str(tmp_path / "nothing.safetensors"))


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_checkpoint_is_refused(tmp_path, fmt, keep):
    path = tmp_path / f"checkpoint.{fmt}"
    write_npz(path) if fmt == "npz" else write_st(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with refused(path, "truncated or damaged"):
        checkpoint.load_checkpoint(str(path))


def test_a_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with refused(path, "not a paramserver checkpoint"):
        checkpoint.load_checkpoint(str(path))


# -- RL policy files ------------------------------------------------------------------------------------

MODEL = {"algo": "a3c", "obs_dim": 4, "n_actions": 2, "hidden": 8}


def policy_state(model: dict[str, Any] = MODEL) -> dict[str, np.ndarray]:
    from paramserver.models.rl_models import build

    torch.manual_seed(0)
    return {k: v.numpy() for k, v in build(**model).state_dict().items()}


def write_policy(path: Any, metadata: dict[str, Any] | None = None, **tensors: Any) -> str:
    """A good policy file, then its header and tensors changed and written back raw."""
    path = str(path)
    checkpoint.save_policy(
        path, policy_state(), {"model": MODEL, "env": "CartPole-v1", "config": {"lr": 0.1}}
    )
    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        names = f.keys()
        raw = {k: f.get_tensor(k) for k in names}
    safetensors.numpy.save_file(_apply(raw, tensors), path, metadata=_apply(meta, metadata or {}))
    return path


def test_a_policy_round_trips(tmp_path):
    state = policy_state()
    path = str(tmp_path / "policy.safetensors")
    checkpoint.save_policy(path, state, {"model": MODEL, "env": "CartPole-v1", "config": {"lr": 0.1}})
    loaded, meta = checkpoint.load_policy_file(path)
    assert meta["model"] == MODEL and meta["env"] == "CartPole-v1" and meta["config"] == {"lr": 0.1}
    assert meta["format"] == "paramserver-rl-policy" and meta["format_version"] == 1
    assert loaded.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(loaded[k], state[k], err_msg=k)
    from paramserver.models.rl_models import build

    build(**meta["model"]).load_state_dict({k: torch.from_numpy(v) for k, v in loaded.items()}, strict=True)


POLICY_CASES = {
    "a tensor missing": (dict(**{"pi.0.weight": DROP}), "missing: \\['pi.0.weight'\\]"),
    "a tensor too many": (dict(extra=np.zeros(1, np.float32)), "unexpected: \\['extra'\\]"),
    "shapes for another model": (
        dict(metadata={"model": json.dumps({**MODEL, "hidden": 16})}),
        "needs float32",
    ),
    "a tensor of another dtype": (dict(**{"pi.0.bias": np.zeros(8)}), "is float64\\[8\\]"),
    "no model arguments": (dict(metadata={"model": DROP}), "lacks the model"),
    "model arguments a list": (dict(metadata={"model": "[]"}), "model arguments is a JSON list"),
    "model arguments incomplete": (dict(metadata={"model": '{"algo": "a3c"}'}), "expected \\['algo'"),
    "an unknown algorithm": (
        dict(metadata={"model": json.dumps({**MODEL, "algo": "os.system"})}),
        "algorithm",
    ),
    "a negative size": (dict(metadata={"model": json.dumps({**MODEL, "hidden": -1})}), "hidden is -1"),
    "a huge size": (dict(metadata={"model": json.dumps({**MODEL, "hidden": 2**40})}), "hidden is"),
    "model arguments nested too deeply": (dict(metadata={"model": deep_json(100_000)}), "nested too deeply"),
    "another format": (dict(metadata={"format": "paramserver-checkpoint"}), "not a paramserver-rl-policy"),
    "no env key": (dict(metadata={"env": DROP}), "lacks the env"),
    "env importing a module": (dict(metadata={"env": "evilmod:CartPole-v1"}), "pass --env"),
    "env in a namespace": (dict(metadata={"env": "evil/CartPole-v1"}), "pass --env"),
    "env without a version": (dict(metadata={"env": "CartPole"}), "pass --env"),
    "env with spaces": (dict(metadata={"env": "Cart Pole-v1"}), "pass --env"),
}


@pytest.mark.parametrize("case", POLICY_CASES)
def test_a_damaged_policy_is_refused_naming_the_file(tmp_path, case):
    kwargs, match = POLICY_CASES[case]
    path = write_policy(tmp_path / "policy.safetensors", **kwargs)
    with refused(path, match):
        checkpoint.load_policy_file(path)


def test_a_policy_naming_a_module_never_imports_it(tmp_path, monkeypatch):
    (tmp_path / "evilmod.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_policy(tmp_path / "policy.safetensors", metadata={"env": "evilmod:CartPole-v1"})
    with refused(path, "pass --env"):
        checkpoint.load_policy_file(path)
    _, meta = checkpoint.load_policy_file(path, need_env=False)  # the caller brings --env
    assert meta["env"] is None
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("env", ["CartPole-v1", "Acrobot-v1"])
def test_evaluate_with_env_given_never_uses_the_files_env(tmp_path, env):
    # --env given on the command line, even when it equals the option's default, is the
    # environment: the file's module-naming env is dropped, never imported, never named.
    import subprocess
    import sys

    (tmp_path / "evilmod.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    path = write_policy(tmp_path / "policy.safetensors", metadata={"env": "evilmod:CartPole-v1"})
    cmd = [sys.executable, "-m", "paramserver", "rl", "--evaluate", path, "--env", env]
    cmd += ["--eval-episodes", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if env == "CartPole-v1":  # the policy's sizes: it runs
        assert proc.returncode == 0, proc.stderr
        assert "1 episodes of CartPole-v1: mean return" in proc.stdout
    else:
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("paramserver: error:") and "trained on an environment it does not name" in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_a_torch_pickle_is_not_a_policy_file(tmp_path):
    path = tmp_path / "policy.pt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in policy_state().items()}}, path)
    with refused(path, "is not a policy.safetensors file"):
        checkpoint.load_policy_file(str(path))


def test_a_truncated_policy_is_refused(tmp_path):
    path = write_policy(tmp_path / "policy.safetensors")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-10])
    with refused(path, "truncated or damaged"):
        checkpoint.load_policy_file(path)


def test_save_policy_refuses_what_load_would_refuse_and_writes_nothing(tmp_path):
    path = tmp_path / "policy.safetensors"
    with refused(path, "pass --env"):
        checkpoint.save_policy(
            str(path), policy_state(), {"model": MODEL, "env": "m:CartPole-v1", "config": {}}
        )
    with refused(path, "missing"):
        checkpoint.save_policy(
            str(path), policy_state({**MODEL, "algo": "dqn"}), {"model": MODEL, "env": None}
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("env", ["CartPole-v1", "LunarLander-v3", "Acrobot-v1", "my_env.Thing-v12"])
def test_plain_env_ids_are_valid(env):
    assert checkpoint.validate_env_id(env) == env


@pytest.mark.parametrize("env", ["mod:Env-v1", "ns/Env-v0", "CartPole", "CartPole-v", "", None, 3, "x-v1\n"])
def test_other_env_ids_are_refused(env):
    with pytest.raises(ValueError, match="pass --env"):
        checkpoint.validate_env_id(env)


def test_a_dtype_numpy_lacks_is_refused(tmp_path):
    path = str(tmp_path / "checkpoint.safetensors")
    safetensors.torch.save_file(
        {"counters": torch.zeros(2, WIDTH, dtype=torch.bfloat16)},
        path,
        metadata={"format": "paramserver-checkpoint", "format_version": "2"},
    )
    with refused(path, "NumPy cannot represent"):
        checkpoint.load_checkpoint(path)


def test_a_dtype_numpy_lacks_is_refused_after_ml_dtypes_is_imported(tmp_path):
    # TensorFlow, JAX and tensorboard import ml_dtypes, which teaches NumPy bfloat16 as a
    # "void"-kind dtype: safetensors then reads the tensor instead of failing.
    pytest.importorskip("ml_dtypes")
    path = str(tmp_path / "checkpoint.safetensors")
    safetensors.torch.save_file(
        {"counters": torch.zeros(2, WIDTH, dtype=torch.bfloat16)},
        path,
        metadata={"format": "paramserver-checkpoint", "format_version": "2"},
    )
    with refused(path, r"NumPy cannot represent \(counters: bfloat16\)"):
        checkpoint.load_checkpoint(path)


def test_a_header_length_past_the_end_is_truncation(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"__metadata__": {}}')
    with refused(path, "truncated or damaged"):
        checkpoint.load_checkpoint(str(path))
