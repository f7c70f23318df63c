"""Bad input, tried as a new user or an operator would: each is one line on stderr and
exit code 2 (or, for a run that diverges, a stop that says so), and leaves nothing behind.
The README's "Bad input" table lists the same cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import finish

import paramserver as ps
from paramserver.store import TMP_PREFIX, list_segments

PS = [sys.executable, "-m", "paramserver"]
TRAIN = [*PS, "train", "--backend", "numpy", "--no-progress", "--epochs", "1"]
TORCH = ["--backend", "torch"]  # after TRAIN: the last --backend counts


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


def _params_header(workers: int = 1, counter_width: int | None = None) -> dict:
    """The layout and meta of a real params segment, to damage."""
    from paramserver.layout import Layout
    from paramserver.store import CONTROL_FIELDS, COUNTER_FIELDS

    model = Layout.pack({"w": ((4,), np.float32)})
    width = len(COUNTER_FIELDS) if counter_width is None else counter_width
    layout = Layout.pack(
        {
            "params": ((4,), np.float32),
            "state": ((0, 4), np.float32),
            "counters": ((workers, width), np.float64),
            "control": ((len(CONTROL_FIELDS),), np.int64),
        }
    )
    meta = {"kind": "params", "model_layout": model.to_dict(), "model_fingerprint": model.fingerprint}
    return {"layout": layout.to_dict(), "meta": meta}


def _without(doc: dict, key: str) -> dict:
    return {**doc, "meta": {k: v for k, v in doc["meta"].items() if k != key}}


DAMAGED_HEADERS = {
    "no layout": lambda: json.dumps({"meta": {"kind": "params"}}).encode(),
    "meta a list": lambda: json.dumps({**_params_header(), "meta": []}).encode(),
    "layout fields garbage": lambda: json.dumps({"layout": {"fields": [[1]], "nbytes": 8}}).encode(),
    "params without model layout": lambda: json.dumps(_without(_params_header(), "model_layout")).encode(),
    "model fingerprint wrong": lambda: json.dumps(
        {**_params_header(), "meta": {**_params_header()["meta"], "model_fingerprint": "x"}}
    ).encode(),
    "counters too narrow": lambda: json.dumps(_params_header(counter_width=2)).encode(),
    "deeply nested": lambda: b"[" * 200_000 + b"]" * 200_000,
    "not UTF-8": lambda: b'{"meta": "' + bytes([0xFF, 0xFE]) + b'"}',
}


@pytest.mark.parametrize("case", sorted(DAMAGED_HEADERS))
def test_inspect_of_a_segment_with_a_damaged_header(case):
    # A valid magic, version and sizes, and then a header a crafted or damaged segment
    # might hold: one line naming the segment, exit 2, never a traceback.
    from multiprocessing import shared_memory

    from paramserver import store as S
    from paramserver.layout import Layout

    doc = DAMAGED_HEADERS[case]()
    try:
        body = Layout.from_dict(json.loads(doc)["layout"])
    except Exception:
        body = Layout.pack({"w": ((4,), np.float32)})
    offset = 1 << 20
    shm = shared_memory.SharedMemory(name=S._new_name(), create=True, size=offset + body.nbytes)
    try:
        S._HEADER.pack_into(
            shm.buf, 0, S.MAGIC, S.FORMAT_VERSION, offset, body.nbytes, body.fingerprint.encode(), len(doc)
        )
        shm.buf[S._HEADER.size : S._HEADER.size + len(doc)] = doc
        rc, _, stderr, _ = run([*PS, "inspect", shm.name], timeout=60)
        assert_one_line_exit_2(rc, stderr, "damaged")
        assert shm.name in stderr
    finally:
        shm.close()
        shm.unlink()


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
    assert "RuntimeWarning" not in stderr  # the count says it; NumPy's warnings only repeat it
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


@pytest.mark.parametrize(
    "size, model",
    [*[(size, []) for size in (200_000, 438_272, 507_904, 512_000)], (512_000, [*TORCH, "--model", "cnn"])],
)
def test_a_small_dev_shm_is_one_line_never_sigbus(tmp_path, size, model):
    # Around the size where the segments fit and the semaphores do not (the sizes of
    # the reports: 507,904 was ENOSPC from a semaphore, 512,000 SIGBUS with the torch
    # CNN): either the run trains, or it says there is no room; never SIGBUS (135).
    _needs_unshare_m()
    rc, stdout, stderr, pid = run(_private_shm(size, *TRAIN, *model, "--out-dir", str(tmp_path / "runs")))
    assert rc in (0, 2), (rc, stderr)
    assert "Traceback" not in stderr
    if rc == 2:
        assert_one_line_exit_2(rc, stderr, "shared memory needs")
    else:
        assert "stopped by epochs" in stdout
    assert_left_nothing(pid)


def _float_fields(cls) -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None)]


@pytest.mark.parametrize(
    "cls, name",
    [(cls, name) for cls in (ps.TrainConfig, ps.RLConfig) for name in _float_fields(cls)],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_every_float_option_must_be_finite(cls, name, value):
    # Every float field of the configs, found by type: a new one is covered as it is
    # added. Refused as not finite, or by a range check that names the field.
    with pytest.raises(ValueError, match=rf"^{name} (must be a finite number|is a fraction in)"):
        cls(**{name: value})


def test_inspect_of_another_users_segment():
    # A segment is mode 0600: another user gets one line (EACCES), not a traceback.
    # Needs root (to become that user) and setpriv.
    from paramserver.layout import Layout
    from paramserver.store import ShmStore

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run inspect as another user")
    store = ShmStore.create_for(Layout.pack({"w": ((4,), np.float32)}), workers=1)
    try:
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.run([*nobody, *PS, "inspect", store.name], capture_output=True, text=True,
                              timeout=60, cwd="/")  # fmt: skip
        expected = f"cannot open segment '{store.name}': Permission denied"
        assert_one_line_exit_2(proc.returncode, proc.stderr, expected)
    finally:
        store.close()
        store.unlink()
