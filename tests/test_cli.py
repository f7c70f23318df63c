"""The real entry point, run in a subprocess with tiny budgets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import paramserver as ps
from paramserver.store import list_segments

TIMEOUT = 120


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "paramserver", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
    )


def only_run_dir(out):
    (run_dir,) = list(out.iterdir())
    return run_dir


@pytest.mark.parametrize("backend,model", [("torch", "mlp"), ("torch", "cnn"), ("numpy", "softmax")])
def test_train_writes_results_and_prints_a_summary(tmp_path, backend, model):
    out = tmp_path / "runs"
    proc = cli("train", "--backend", backend, "--model", model, "--epochs", "2", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "samples/s" in proc.stdout
    run_dir = only_run_dir(out)
    assert f"results written to {run_dir}" in proc.stdout
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["result"]["stop_reason"] == "epochs"
    assert doc["config"]["backend"] == backend and doc["config"]["model"] == model
    assert 0.0 < doc["result"]["test_accuracy"] <= 1.0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all("samples" in json.loads(line) for line in lines)


def test_train_on_an_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    proc = cli(
        "train", "--backend", "numpy", "--model", "softmax", "--data", str(tmp_path / "d.npz"),
        "--epochs", "20", "--out-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((only_run_dir(tmp_path / "runs") / "results.json").read_text())
    assert doc["result"]["test_accuracy"] > 0.9  # a linearly separable problem


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workers", "0"], "workers must be at least 1"),
        (["--policy", "po9"], "invalid choice: 'po9'"),
        (["--lr", "-1"], "lr must be positive"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
        (["--nesterov", "--momentum", "0"], "nesterov needs momentum > 0"),
        (["--data", "missing.npz"], "does not exist"),
        (["--data", "mnist"], "unknown data set 'mnist'"),
        (["--backend", "numpy", "--model", "cnn"], "unknown numpy model 'cnn'"),
        (["--target-accuracy", "97"], r"target_accuracy is a fraction in \(0, 1\]"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(tmp_path, args, message):
    proc = cli("train", *args, "--out-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("paramserver: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists(), "nothing may be written for a bad argument"


def test_npz_without_the_expected_arrays_exits_2(tmp_path):
    np.savez(tmp_path / "bad.npz", features=np.zeros((4, 2)))
    proc = cli("train", "--data", str(tmp_path / "bad.npz"), "--out-dir", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "it needs 'x' (inputs) and 'y' (targets)" in proc.stderr


def test_inspect_shows_layout_and_counters_of_a_live_segment_and_leaves_it_alive():
    layout = ps.Layout.from_arrays({"W": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)})
    with ps.ParamStore.create_for(layout, workers=2, meta={"config": {"policy": "po3"}}) as store:
        store.counters.array[1, 0] = 7  # worker 1 has made 7 steps
        proc = cli("inspect", store.name)
        assert proc.returncode == 0, proc.stderr
        assert "16 parameters in 2 tensors" in proc.stdout
        assert "W" in proc.stdout and "(3, 4)" in proc.stdout
        assert "global version 7" in proc.stdout
        listing = cli("inspect")
        assert store.name in listing.stdout and "running" in listing.stdout
        # Exiting the inspecting process must not have removed the segment.
        assert store.name in [n for n, _, _ in list_segments()]


def test_inspect_of_a_missing_segment_exits_2():
    proc = cli("inspect", "psrv_1_doesnotexist")
    assert proc.returncode == 2
    assert "no shared-memory segment named 'psrv_1_doesnotexist'" in proc.stderr


def test_clean_removes_segments_of_dead_servers_only(tmp_path):
    # A server that dies without cleaning up: SIGKILL itself after creating a segment.
    # Its resource tracker would unlink the segment when it sees the death, so take
    # the segment off the tracker first (as if the tracker had been killed as well).
    code = (
        "import os, signal, numpy as np, paramserver as ps\n"
        "from multiprocessing import resource_tracker\n"
        "s = ps.Segment.create(ps.Layout.from_arrays({'a': np.zeros(4, np.float32)}))\n"
        "resource_tracker.unregister('/' + s.name, 'shared_memory')\n"
        "print(s.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    dead = proc.stdout.strip()
    assert dead.startswith("psrv_")
    live = ps.Segment.create(ps.Layout.from_arrays({"a": np.zeros(4, np.float32)}))
    with live:
        names = [n for n, _, _ in list_segments()]
        assert dead in names
        out = cli("clean")
        assert out.returncode == 0, out.stderr
        assert f"removed {dead}" in out.stdout
        names = [n for n, _, _ in list_segments()]
        assert dead not in names and live.name in names


def test_ctrl_c_stops_the_run_cleanly_and_writes_results(tmp_path):
    import signal
    import time

    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "paramserver", "train", "--backend", "numpy", "--epochs", "100000",
         "--no-progress", "--out-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and any((d / "metrics.jsonl").stat().st_size for d in out.iterdir())):
            assert time.monotonic() < deadline, "training did not start"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    assert "stopped by interrupted" in stdout
    assert "Traceback" not in stderr
    doc = json.loads((only_run_dir(out) / "results.json").read_text())
    assert doc["result"]["stop_reason"] == "interrupted"
    assert doc["result"]["updates"] > 0
