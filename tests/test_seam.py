"""The Store seam: the worker loop and the server run against the Store interface alone.

Two other implementations prove it: ``MemoryStore`` (plain NumPy arrays in this
process, no shared memory: the loop runs here, in a thread-free call) and
``InterfaceOnlyStore`` (a wrapper that exposes nothing but the interface around
a shared-memory store and counts every push in a tally segment of its own: a
whole server run with spawned workers goes through it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import config, small

import paramserver as ps
from paramserver.data import share_training_data
from paramserver.layout import Layout
from paramserver.models.numpy_models import NumpyMLP
from paramserver.store import COUNTER_FIELDS, Counters, Segment, ShmStore, Store
from paramserver.workers.worker import SupervisedTask, WorkerPlan, prepare


class MemoryStore(Store):
    """Parameters, state and counters as process-local arrays; pushes under one lock."""

    def __init__(self, layout: Layout, *, workers: int, state_slots: int = 0):
        self._layout = layout
        self._params = np.zeros(layout.flat_size, layout.dtype)
        self._state = np.zeros((state_slots, layout.flat_size), layout.dtype)
        self._counters = Counters(np.zeros((workers, len(COUNTER_FIELDS))))
        self._stop = np.zeros(1, np.int64)
        self._lock = threading.Lock()
        self.pushes = 0

    @property
    def model_layout(self) -> Layout:
        return self._layout

    @property
    def params(self) -> np.ndarray:
        return self._params

    @property
    def state(self) -> np.ndarray:
        return self._state

    @property
    def counters(self) -> Counters:
        return self._counters

    def push(self, rank, backward, apply):  # type: ignore[no-untyped-def]
        with self._lock:
            apply(backward(), 0, self._params.size)
            self.pushes += 1

    def request_stop(self) -> None:
        self._stop[0] = 1

    def stop_word(self) -> np.ndarray:
        return self._stop

    def set_base_version(self, version: int) -> None:
        self._counters.base_version = version


class InterfaceOnlyStore(Store):
    """Only the Store interface of a shared-memory store (``__slots__``, no ``__getattr__``:
    any other attribute the server or a worker reached for would raise), plus a tally
    segment where each worker counts its pushes."""

    __slots__ = ("_inner", "_tally")

    def __init__(self, inner: ShmStore, tally: Segment):
        self._inner, self._tally = inner, tally

    @classmethod
    def create(cls, layout, *, workers, state_slots=0, meta=None):  # type: ignore[no-untyped-def]
        tally = Segment.create(Layout.pack({"pushes": ((workers,), np.int64)}), {"kind": "tally"})
        return cls(ShmStore.create_for(layout, workers=workers, state_slots=state_slots, meta=meta), tally)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (InterfaceOnlyStore, (self._inner, self._tally))  # both pickle to names

    @property
    def model_layout(self) -> Layout:
        return self._inner.model_layout

    @property
    def params(self) -> np.ndarray:
        return self._inner.params

    @property
    def state(self) -> np.ndarray:
        return self._inner.state

    @property
    def counters(self) -> Counters:
        return self._inner.counters

    def push(self, rank, backward, apply):  # type: ignore[no-untyped-def]
        self._tally["pushes"][rank] += 1
        self._inner.push(rank, backward, apply)

    def request_stop(self) -> None:
        self._inner.request_stop()

    def stop_word(self) -> np.ndarray:
        return self._inner.stop_word()

    def prepare(self, ctx, config) -> None:  # type: ignore[no-untyped-def]
        self._inner.prepare(ctx, config)

    def set_base_version(self, version: int) -> None:
        self._inner.set_base_version(version)

    def recover(self, alive, dead):  # type: ignore[no-untyped-def]
        return self._inner.recover(alive, dead)

    def bind(self, rank: int) -> None:
        self._inner.bind(rank)

    def unbind(self) -> None:
        self._inner.unbind()

    def pushes(self) -> int:
        return int(self._tally["pushes"].sum())

    def unlink(self) -> None:
        self._inner.unlink()
        self._tally.unlink()

    def close(self) -> None:
        self._inner.close()
        self._tally.close()


def _numpy_model_spec(seed: int = 0):  # type: ignore[no-untyped-def]
    return ps.model_spec(NumpyMLP(64, 10, hidden=16), None, seed)


def test_the_worker_loop_runs_against_a_store_that_is_not_shared_memory(digits):
    # One worker, in this process, on a MemoryStore; the same run under the server (a
    # spawned worker, the shared-memory store) must end with the very same parameters.
    data = small(digits, 256)
    cfg = config(workers=1, epochs=2, batch_size=32, lr=0.05)
    spec, layout, init = _numpy_model_spec()
    store = MemoryStore(layout, workers=1, state_slots=cfg.update_rule().state_slots)
    store.params[...] = init
    with share_training_data(data) as shared:
        task = SupervisedTask(spec, shared, cfg.batch_size, cfg.epochs)
        plan = WorkerPlan(rank=0, workers=1, cores=None, threads=1, parent_pid=os.getppid())
        step = prepare(plan, store, task, cfg)
        while step():
            pass
        del step
        task.close()
    batches = -(-len(data.x_train) // cfg.batch_size) * cfg.epochs
    assert store.pushes == batches == store.version()
    assert store.counters.row(0).epoch == cfg.epochs

    with ps.ParameterServer(spec, layout, init, data, cfg) as server:
        result = server.run()
    assert result.updates == batches
    np.testing.assert_array_equal(layout.flatten(result.params), store.params)


@pytest.mark.parametrize("policy", ["po1", "striped"])
def test_the_server_and_workers_use_the_store_interface_alone(digits, policy):
    data = small(digits, 256)
    cfg = config(workers=2, epochs=2, policy=policy)
    spec, layout, init = _numpy_model_spec()
    stores: list[InterfaceOnlyStore] = []

    def factory(*args, **kw):  # type: ignore[no-untyped-def]
        stores.append(InterfaceOnlyStore.create(*args, **kw))
        return stores[-1]

    with ps.ParameterServer(spec, layout, init, data, cfg, store_factory=factory) as server:
        result = server.run()
        pushes = stores[0].pushes()
    assert result.stop_reason == "epochs" and result.test_accuracy is not None
    assert pushes == result.updates + sum(w["nonfinite"] for w in result.workers) > 0


def _rl_config(**kw):  # type: ignore[no-untyped-def]
    base = {"workers": 2, "policy": "po3", "max_steps": 6_000, "out_dir": "", "progress": False,
            "target_return": 1e9, "envs_per_worker": 2}  # fmt: skip
    return ps.RLConfig(**{**base, **kw})


def test_rl_updates_record_staleness_and_learning_rate(tmp_path):
    two = ps.train_rl(_rl_config())
    assert two.updates > 0
    assert two.staleness["mean"] > 0, "2 lock-free A3C workers saw no update of the other"
    assert all(w["lr"] == pytest.approx(7e-4) for w in two.workers)
    one = ps.train_rl(_rl_config(workers=1))
    assert one.updates > 0 and one.staleness == {"mean": 0.0, "max": 0.0}


def test_an_rl_run_resumed_from_its_checkpoint_continues_its_update_count(tmp_path):
    first = ps.train_rl(_rl_config(out_dir=str(tmp_path / "a")))
    assert first.checkpoint is not None and first.version == first.updates > 0
    ckpt = ps.load_checkpoint(first.checkpoint)
    assert ckpt.version == first.version
    second = ps.train_rl(_rl_config(out_dir=str(tmp_path / "b"), resume=first.checkpoint))
    assert second.updates > 0
    assert second.version == first.version + second.updates
    doc = (tmp_path / "b").glob("*/metrics.jsonl")
    assert next(doc).stat().st_size > 0  # RL runs write the same metrics.jsonl as training


# -- fixed on the way --------------------------------------------------------------------------


def _cli(args: list[str], *, block: str = "") -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter; ``block``: a module made unimportable there first."""
    prelude = f"import sys; sys.modules[{block!r}] = None; " if block else ""
    code = prelude + "from paramserver.cli import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", "import sys; " + code, *args],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_rl_without_matplotlib_finishes_with_a_note_and_no_run_prints_a_buffer_error(tmp_path):
    # What `pip install .[torch,rl]` gives: no matplotlib. The plot is optional.
    rl = _cli(["rl", "--workers", "2", "--max-steps", "3000", "--out-dir", str(tmp_path), "--no-progress"],
              block="matplotlib")  # fmt: skip
    assert rl.returncode == 0, rl.stderr
    assert "reward_curve.png not drawn" in rl.stderr and "pip install" in rl.stderr
    run_dir = next(tmp_path.glob("*-rl-*"))
    assert (run_dir / "results.json").is_file() and (run_dir / "policy.safetensors").is_file()
    assert not (run_dir / "reward_curve.png").exists()
    train = _cli(["train", "--model", "mlp", "--epochs", "2", "--out-dir", str(tmp_path), "--no-progress"])
    assert train.returncode == 0, train.stderr
    for proc in (rl, train):  # a finalizer's BufferError reads like a crash
        assert "Exception ignored" not in proc.stderr and "BufferError" not in proc.stderr, proc.stderr


def test_rl_results_are_written_atomically(tmp_path, monkeypatch):
    import paramserver.server as server_mod

    replaced: list[str] = []
    real = server_mod.os.replace

    def spy(src, dst):  # type: ignore[no-untyped-def]
        replaced.append(str(dst))
        return real(src, dst)

    monkeypatch.setattr(server_mod.os, "replace", spy)
    result = ps.train_rl(_rl_config(out_dir=str(tmp_path), max_steps=2_000))
    assert result.run_dir is not None
    assert os.path.join(result.run_dir, "results.json") in replaced  # a temporary file, renamed
    assert not list(tmp_path.glob("*/*.tmp"))


def test_load_checkpoint_is_exported():
    from paramserver.checkpoint import load_checkpoint

    assert ps.load_checkpoint is load_checkpoint and "load_checkpoint" in ps.__all__
