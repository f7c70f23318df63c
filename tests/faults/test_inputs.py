"""Bad input, tried as a new user or an operator would: each is one line on stderr and
exit code 2 (or, for a run that diverges, a stop that says so), and leaves nothing behind.
The README's "Bad input" table lists the same cases."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import finish

from paramserver.store import TMP_PREFIX, list_segments

PS = [sys.executable, "-m", "paramserver"]
TRAIN = [*PS, "train", "--backend", "numpy", "--no-progress", "--epochs", "1"]


def run(args: list[str], timeout: float = 120) -> tuple[int, str, str, int]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = finish(proc, timeout=timeout)
    return proc.returncode, stdout, stderr, proc.pid


def assert_one_line_exit_2(rc: int, stderr: str, message: str) -> None:
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("paramserver: error:"), stderr
    assert "Traceback" not in stderr
    assert message in lines[-1], lines[-1]


def assert_left_nothing(pid: int) -> None:
    import glob
    import tempfile

    assert not [n for n, p, _ in list_segments() if p == pid]
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"{TMP_PREFIX}{pid}-*"))


def save(path, y, **extra) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(len(y), 4)).astype(np.float32), y=np.asarray(y), **extra)
    return str(path)


def labels(n: int = 64, **at: float) -> np.ndarray:
    y = (np.arange(n) % 2).astype(float)
    for i, v in at.items():
        y[int(i[1:])] = v
    return y


@pytest.mark.parametrize(
    "make, message",
    [
        # A label of 10**9 would size the output layer at a billion classes.
        (lambda d: save(d / "big.npz", labels(i0=10**9).astype(np.int64)), "label 1000000000 implies"),
        (lambda d: save(d / "half.npz", labels(i5=0.5)), "found 0.5 (sample"),
        # No test split in the file: the label is in y, whatever the split draws.
        (lambda d: save(d / "neg.npz", labels(i63=-1).astype(np.int64)), "y: training labels must be"),
        (lambda d: (d / "dir.npz").mkdir() or str(d / "dir.npz"), "is a directory"),
        (lambda d: (d / "text.npz").write_text("hi\n") and str(d / "text.npz"), "is not a NumPy .npz file"),
    ],
)
def test_bad_data_files(tmp_path, make, message):
    # --task classify: float labels (the 0.5 file) would otherwise mean regression targets.
    rc, _, stderr, pid = run([*TRAIN, "--out-dir", "", "--task", "classify", "--data", make(tmp_path)])
    assert_one_line_exit_2(rc, stderr, message)
    assert "allow_pickle" not in stderr
    assert_left_nothing(pid)


@pytest.mark.parametrize("out_dir", ["/proc", "afile", "afile/sub"])
def test_an_unwritable_out_dir_is_found_before_workers_start(tmp_path, out_dir):
    (tmp_path / "afile").write_text("x")
    target = out_dir if out_dir.startswith("/") else str(tmp_path / out_dir)
    rc, stdout, stderr, pid = run([*TRAIN, "--out-dir", target])
    assert_one_line_exit_2(rc, stderr, "is not a writable directory")
    assert "stopped by" not in stdout  # nothing was trained for nothing
    assert_left_nothing(pid)


@pytest.mark.parametrize("name", ["psrv_/../x", "psrv_" + "a" * 300])
def test_inspect_of_a_name_the_os_refuses(name):
    rc, _, stderr, _ = run([*PS, "inspect", name], timeout=60)
    assert_one_line_exit_2(rc, stderr, "cannot open segment")


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf"])
def test_a_non_finite_learning_rate_is_refused(lr):
    rc, _, stderr, pid = run([*TRAIN, "--out-dir", "", f"--lr={lr}"])
    assert_one_line_exit_2(rc, stderr, "lr must be a finite number")
    assert_left_nothing(pid)


def test_a_learning_rate_that_overflows_the_parameters_stops_the_run(tmp_path):
    # Finite gradients, finite lr, and still the first update makes the parameters so
    # large that every later step is non-finite: the run must not go on skipping every
    # step and report success.
    rc, stdout, stderr, pid = run([*TRAIN, "--out-dir", "", "--lr", "1e38", "--epochs", "50"])
    assert rc == 1, (stdout, stderr)
    assert "stopped by diverged" in stdout
    assert "the run was stopped" in stderr and "too high?" in stderr
    assert "Traceback" not in stderr
    assert_left_nothing(pid)


def _private_shm(size: int, *command: str) -> list[str]:
    # A mount namespace of its own with a small tmpfs on /dev/shm; `exec` keeps the pid.
    inner = " ".join(command)
    return ["unshare", "-m", "bash", "-c", f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec {inner}"]


def _needs_unshare_m() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(_private_shm(65536, "true"), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m with a tmpfs not permitted here: {probe.stderr.strip()}")


@pytest.mark.parametrize("size", [200_000, 438_272, 512_000])
def test_a_small_dev_shm_is_one_line_never_sigbus(tmp_path, size):
    # Around the size where the segments fit and the semaphores do not: either the run
    # trains, or it says there is no room; never SIGBUS (135).
    _needs_unshare_m()
    rc, stdout, stderr, pid = run(_private_shm(size, *TRAIN, "--out-dir", str(tmp_path / "runs")))
    assert rc in (0, 2), (rc, stderr)
    assert "Traceback" not in stderr
    if rc == 2:
        assert_one_line_exit_2(rc, stderr, "shared memory needs")
    else:
        assert "stopped by epochs" in stdout
    assert_left_nothing(pid)
