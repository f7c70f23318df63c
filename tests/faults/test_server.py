"""Faults done to the server (the CLI process): SIGKILL, SIGTERM, SIGINT; bad input.
Each test runs the real entry point in a subprocess and checks what it left behind."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from helpers import config, finish, workers_of

import paramserver as ps
from paramserver.checkpoint import load_checkpoint
from paramserver.models.numpy_models import NumpyMLP
from paramserver.store import TMP_PREFIX, list_segments

TRAIN = [sys.executable, "-m", "paramserver", "train", "--backend", "numpy", "--no-progress"]


def start_training(out, *extra: str, new_session: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*TRAIN, "--epochs", "100000", "--out-dir", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=new_session,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out.exists() and any((d / "metrics.jsonl").stat().st_size for d in out.iterdir())):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"training did not start: {proc.communicate(timeout=10)}")
        time.sleep(0.1)
    return proc


def tmp_dirs_of(pid: int) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), f"{TMP_PREFIX}{pid}-*"))


def only_run_dir(out):
    (d,) = list(out.iterdir())
    return d


def test_workers_exit_on_their_own_when_the_server_is_killed(tmp_path):
    proc = start_training(tmp_path / "runs")
    workers = workers_of(proc.pid)
    assert len(workers) == 2
    proc.kill()  # SIGKILL: no clean-up code of the server runs
    finish(proc)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"orphaned workers still running: {alive}"
    # `paramserver clean` removes whatever the dead run left: segments and its private files.
    out = subprocess.run(
        [sys.executable, "-m", "paramserver", "clean"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert not [n for n, pid, _ in list_segments() if pid == proc.pid]
    assert not tmp_dirs_of(proc.pid)


def test_forkserver_workers_exit_when_the_server_is_killed(tmp_path):
    # Workers forked by a forkserver are its children, not the server's: they die with
    # the forkserver, which must therefore exit with the server.
    pymp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "pymp-*")))
    proc = start_training(
        tmp_path / "runs", "--backend", "torch", "--model", "mlp", "--start-method", "forkserver"
    )
    tree = [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]  # fmt: skip
    assert any("forkserver" in " ".join(p.cmdline()) for p in tree), tree
    assert len(tree) == 3, f"expected the forkserver and 2 workers: {tree}"
    proc.kill()
    proc.wait(10)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        p.kill()
    finish(proc)  # after the orphans: they hold its output pipes open
    assert not alive, f"still running after the server's SIGKILL: {alive}"
    out = subprocess.run(
        [sys.executable, "-m", "paramserver", "clean"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert not [n for n, pid, _ in list_segments() if pid == proc.pid]
    assert not tmp_dirs_of(proc.pid)
    # the forkserver's socket lives in the server's private directory, swept above
    assert not set(glob.glob(os.path.join(tempfile.gettempdir(), "pymp-*"))) - pymp_before


def test_the_next_start_sweeps_what_a_killed_run_left(tmp_path):
    # Kill the whole process group (server, workers, resource tracker), as an OOM kill
    # of a container would: nothing of the run gets to clean up.
    proc = start_training(tmp_path / "runs", new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    left = [n for n, pid, _ in list_segments() if pid == proc.pid]
    assert left, "the killed run left no segment behind: nothing to test"
    assert tmp_dirs_of(proc.pid)
    ps.train(NumpyMLP(64, 10, 8), ps.load_digits(), config(workers=1, steps=5))  # a new run sweeps
    assert not [n for n, pid, _ in list_segments() if pid == proc.pid]
    assert not tmp_dirs_of(proc.pid)


@pytest.mark.parametrize("sig, reason", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_sigterm_and_sigint_stop_cleanly_and_write_a_checkpoint(tmp_path, sig, reason):
    out = tmp_path / "runs"
    proc = start_training(out)
    workers = workers_of(proc.pid)
    proc.send_signal(sig)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr
    assert f"stopped by {reason}" in stdout
    assert "Traceback" not in stderr
    run = only_run_dir(out)
    doc = json.loads((run / "results.json").read_text())
    assert doc["result"]["stop_reason"] == reason
    ckpt = load_checkpoint(str(run))
    assert ckpt.version == doc["result"]["version"] > 0
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive
    assert not tmp_dirs_of(proc.pid)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "workers must be at least 1"),
        (["--policy", "po9"], "invalid choice: 'po9'"),
        (["--lr", "-1"], "lr must be positive"),
        (["--attenuation", "exp", "--attenuation-base", "2"], "attenuation_base must be in"),
        (["--lr-schedule", "cosine", "--lr-min", "5"], "lr_min must be in"),
        (["--max-restarts", "-1"], "max_restarts must be >= 0"),
        (["--checkpoint-every", "10", "--out-dir", ""], "set out_dir"),
        (["--resume", "/nonexistent/checkpoint.npz"], "no checkpoint at"),
        (["--data", "/nonexistent/data.npz"], "data"),
        (["--on-nonfinite", "ignore"], "invalid choice: 'ignore'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, args, message):
    proc = subprocess.Popen(
        [*TRAIN, "--out-dir", str(tmp_path / "runs"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, stderr = finish(proc, timeout=120)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paramserver: error:"), stderr
    assert message in lines[0]
    assert not [n for n, pid, _ in list_segments() if pid == proc.pid]
    assert not tmp_dirs_of(proc.pid)


def wait_for_tmp_dir(proc: subprocess.Popen) -> None:
    """Until the server made its private directory: its segments exist, it is starting."""
    deadline = time.monotonic() + 60
    while not tmp_dirs_of(proc.pid):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.communicate(timeout=10)}")
        time.sleep(0.01)


def assert_left_nothing(proc: subprocess.Popen) -> None:
    assert not [n for n, pid, _ in list_segments() if pid == proc.pid]
    assert not tmp_dirs_of(proc.pid)


@pytest.mark.parametrize("sig, reason", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_a_second_signal_while_stopping_does_not_lose_the_results(tmp_path, sig, reason):
    out = tmp_path / "runs"
    proc = start_training(out)
    proc.send_signal(sig)
    time.sleep(0.1)  # the stop has begun: joining workers, writing results
    proc.send_signal(sig)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert f"stopped by {reason}" in stdout
    run = only_run_dir(out)
    assert json.loads((run / "results.json").read_text())["result"]["stop_reason"] == reason
    assert load_checkpoint(str(run)).version > 0
    assert_left_nothing(proc)


def test_a_third_signal_forces_a_fast_exit_that_leaves_nothing(tmp_path):
    proc = start_training(tmp_path / "runs")
    for _ in range(3):
        proc.send_signal(signal.SIGTERM)
    _, stderr = finish(proc)
    assert proc.returncode in (0, 143), stderr  # 0 if the stop was done before the third
    assert "Traceback" not in stderr
    assert_left_nothing(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_during_start_up_is_handled(tmp_path, sig):
    # Once the private directory exists the segments do too, and the workers may not
    # have been spawned yet. SIGTERM/SIGINT stop the run with its results; SIGUSR1 (the
    # checkpoint trigger) must not kill it: it trains on until the SIGTERM that follows.
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [*TRAIN, "--epochs", "100000", "--out-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_tmp_dir(proc)
    proc.send_signal(sig)
    if sig == signal.SIGUSR1:
        time.sleep(1.0)
        assert proc.poll() is None, finish(proc)
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "stopped by" in stdout
    assert (only_run_dir(out) / "results.json").exists()
    assert_left_nothing(proc)


@pytest.mark.parametrize(
    "sig, delay",
    [*[(signal.SIGTERM, d) for d in (0.05, 0.2, 0.25, 0.3, 0.7, 1.2, 2.0)],
     *[(signal.SIGUSR1, d) for d in (0.3, 0.7, 1.2, 2.0)]],
)  # fmt: skip
def test_a_signal_at_any_moment_of_start_up(tmp_path, sig, delay):
    # Signals at fixed delays after launch land in the phases of start-up in turn (the
    # interpreter and imports, loading the data, the segments, building the evaluator,
    # spawning the workers; which phase a delay hits depends on the machine). Before
    # the server exists SIGTERM ends the command in one line (exit 130), after it the
    # run stops with its results (exit 0); SIGUSR1 never kills it once paramserver runs
    # (before, the interpreter's default action does, with nothing made yet). Nothing
    # is left.
    out, tmp = tmp_path / "runs", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [*TRAIN, "--epochs", "100000", "--out-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(sig)
    if sig == signal.SIGUSR1:
        time.sleep(1.0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc)
    assert "Traceback" not in stderr
    if proc.returncode == -sig:
        # Only while the interpreter starts, before paramserver's first line runs: then
        # nothing exists yet that could be left.
        assert not out.exists(), stderr
    elif proc.returncode == 130:
        assert stderr.strip().splitlines()[-1] == "paramserver: interrupted", stderr
        assert not out.exists() or not list(out.iterdir())
    else:
        assert proc.returncode == 0, stderr
        assert "stopped by" in stdout
        assert (only_run_dir(out) / "results.json").exists()
    assert_left_nothing(proc)
    assert list(tmp.iterdir()) == []


def test_a_sigterm_whose_interrupt_an_import_swallowed_still_stops_the_run(digits):
    # Before a server's handlers, SIGTERM raises KeyboardInterrupt; third-party code
    # running at that moment (an import) may swallow it. The signal is still on record,
    # and the server stops the run at once, with its results.
    from paramserver.supervise import install_early_signals

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        install_early_signals()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # swallowed, as an import's broad except would
        result = ps.train(NumpyMLP(64, 10, 16), digits, config(epochs=1000, out_dir=""))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert result.stop_reason == "terminated", result.summary()
    assert result.updates < 100


def _dead_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


def test_a_live_run_whose_pid_means_nothing_here_is_not_swept(monkeypatch):
    # A server in another PID namespace names its segments with a pid that is dead (or
    # someone else's) here. Its segments, semaphores and private directory must survive
    # `paramserver clean` for as long as it holds them.
    import paramserver.store as store_mod
    from paramserver.layout import Layout

    dead = _dead_pid()
    monkeypatch.setattr(store_mod, "_new_name", lambda: f"{store_mod.PREFIX}{dead}_{os.urandom(8).hex()}")
    seg = store_mod.Segment.create(Layout.pack({"w": ((4,), "float32")}))
    private, lock = store_mod.make_private_dir()
    moved = os.path.join(os.path.dirname(private), f"{TMP_PREFIX}{dead}-{os.urandom(4).hex()}")
    os.rename(private, moved)  # as that server's directory would be named
    try:
        assert (seg.name, dead, True) in list_segments()
        removed = store_mod.sweep_stale()
        assert seg.name not in removed and moved not in removed
        assert os.path.exists(os.path.join(store_mod.SHM_DIR, seg.name)) and os.path.isdir(moved)
    finally:
        seg.unlink()
        seg.close()
        os.close(lock)
    # Once its creator lets go (as the kernel does when it dies), they are stale.
    assert moved in store_mod.sweep_stale()


def test_unshare_pid_namespace_run_survives_a_host_clean(tmp_path):
    # The same, for real: a run in its own PID namespace, `paramserver clean` on the host.
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -p not permitted here: {probe.stderr.decode().strip()}")
    before = {n for n, _, _ in list_segments()}
    out = tmp_path / "runs"
    inner = " ".join([*TRAIN, "--epochs", "100000", "--max-seconds", "6", "--out-dir", str(out)])
    # bash as pid 1, so that the server has a small pid of its own, as a real run would.
    proc = subprocess.Popen(
        ["unshare", "-p", "-f", "--mount-proc", "bash", "-c", f"{inner}; exit $?"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out.exists() and any((d / "metrics.jsonl").stat().st_size for d in out.iterdir())):
        assert time.monotonic() < deadline and proc.poll() is None, finish(proc)
        time.sleep(0.1)
    theirs = {n for n, _, _ in list_segments()} - before
    assert theirs, "the namespaced run has no segment"
    clean = subprocess.run(
        [sys.executable, "-m", "paramserver", "clean"], capture_output=True, text=True, timeout=60
    )
    assert clean.returncode == 0, clean.stderr
    assert not theirs & set(clean.stdout.split()), clean.stdout
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr
    assert "stopped by time" in stdout
    assert not ({n for n, _, _ in list_segments()} - before) & theirs


def test_a_process_group_kill_leaves_no_semaphore_after_clean(tmp_path):
    # SIGKILL to the whole group takes the resource tracker too: nothing of the run
    # unlinks its semaphores, so `clean` must find them.
    proc = start_training(tmp_path / "runs", "--policy", "po1", new_session=True)
    pid = proc.pid
    os.killpg(pid, signal.SIGKILL)
    finish(proc)

    def semaphores_of_the_run() -> list[str]:
        return [
            n for n in os.listdir("/dev/shm") if n.startswith("sem.") and (f"-{pid}-" in n or f"_{pid}_" in n)
        ]

    assert semaphores_of_the_run(), "the killed run left no semaphore: nothing to test"
    out = subprocess.run(
        [sys.executable, "-m", "paramserver", "clean"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert not semaphores_of_the_run()
    assert not [n for n, p, _ in list_segments() if p == pid]
    assert not tmp_dirs_of(pid)
