"""Shared-memory segments and the parameter server's store: creation, attachment, errors, cleanup."""

from __future__ import annotations

import errno
import os
import pickle
import stat
import subprocess
import sys
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import psutil
import pytest

from paramserver.layout import Layout
from paramserver.store import (
    CONTROL_FIELDS,
    COUNTER_FIELDS,
    PREFIX,
    SHM_DIR,
    ParamStore,
    Segment,
    SegmentError,
    list_segments,
    shm_free_bytes,
    sweep_stale,
)

LAYOUT = Layout.pack(
    {
        "w": ((3, 5), np.float32),
        "b": ((5,), np.float32),
        "n": ((4,), np.int64),
    }
)
MODEL_LAYOUT = Layout.pack({"w": ((3, 5), np.float32), "b": ((5,), np.float32)})


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _dead_pid() -> int:
    """The pid of a child process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


@pytest.fixture
def seg():
    with Segment.create(LAYOUT, {"kind": "test", "epoch": 3}) as s:
        yield s


@pytest.fixture
def store():
    with ParamStore.create_for(MODEL_LAYOUT, workers=3, state_slots=2, meta={"lr": 0.1}) as s:
        yield s


# -- create and attach ---------------------------------------------------------------------


def test_create_names_zero_fills_and_exposes_layout(seg):
    assert seg.name.startswith(f"{PREFIX}{os.getpid()}_")
    assert os.path.exists(_path(seg.name))
    assert seg.layout == LAYOUT
    assert seg.meta == {"kind": "test", "epoch": 3}
    assert seg.size >= LAYOUT.nbytes
    assert set(seg.arrays) == {"w", "b", "n"}
    assert seg["w"].shape == (3, 5) and seg["w"].dtype == np.float32
    assert seg["n"].shape == (4,) and seg["n"].dtype == np.int64
    for a in seg.arrays.values():
        assert not a.any()
        assert a.flags.writeable


def test_create_attach_round_trip_of_arrays_and_meta(seg):
    w = np.arange(15, dtype=np.float32).reshape(3, 5)
    seg["w"][...] = w
    seg["n"][...] = [1, -2, 3, -4]

    other = Segment.attach(seg.name)
    try:
        assert other.name == seg.name
        assert other.layout == seg.layout
        assert other.layout.fingerprint == LAYOUT.fingerprint
        assert other.meta == {"kind": "test", "epoch": 3}
        np.testing.assert_array_equal(other["w"], w)
        np.testing.assert_array_equal(other["n"], [1, -2, 3, -4])
        assert not other["b"].any()
    finally:
        other.close()


def test_attach_in_same_process_sees_writes_both_ways(seg):
    other = Segment.attach(seg.name, kind="test")
    try:
        seg["b"][2] = 4.5
        assert other["b"][2] == 4.5
        other["n"][0] = 99
        assert seg["n"][0] == 99
    finally:
        other.close()
    # The creator's mapping outlives the attached handle.
    assert seg["n"][0] == 99


def test_pickle_gives_attached_handle_sharing_memory(seg):
    clone = pickle.loads(pickle.dumps(seg))
    try:
        assert isinstance(clone, Segment)
        assert clone is not seg
        assert clone.name == seg.name
        assert clone.meta == seg.meta
        assert "owner=False" in repr(clone)
        seg["w"][1, 2] = 3.25
        assert clone["w"][1, 2] == 3.25
        clone["b"][:] = 1.0
        np.testing.assert_array_equal(seg["b"], np.ones(5, np.float32))
        with pytest.raises(PermissionError, match="only the creator"):
            clone.unlink()
    finally:
        clone.close()


def test_pickle_is_small_and_holds_no_data(seg):
    seg["w"][...] = 1.0

    blob = pickle.dumps(seg)

    assert seg.name.encode() in blob
    assert len(blob) < 200


def test_file_mode_is_owner_only(seg):
    mode = stat.S_IMODE(os.stat(_path(seg.name)).st_mode)

    assert mode == 0o600


def test_empty_layout_segment():
    with Segment.create(Layout.pack({})) as s:
        assert s.arrays == {}
        assert s.size > 0


# -- attach errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["not_ours", "wnsm_1234", "", "PSRV_1_abc"])
def test_attach_rejects_names_without_prefix(name):
    with pytest.raises(SegmentError, match=r"is not a paramserver segment name \(they start with 'psrv_'\)"):
        Segment.attach(name)


def test_attach_rejects_non_string_name():
    with pytest.raises(SegmentError, match="not a paramserver segment name"):
        Segment.attach(123)  # type: ignore[arg-type]


def test_attach_missing_segment():
    name = f"{PREFIX}{os.getpid()}_0000000000000000"
    assert not os.path.exists(_path(name))

    with pytest.raises(SegmentError, match=r"no shared-memory segment named .*the run has ended"):
        Segment.attach(name)


def test_segment_error_is_a_value_error():
    assert issubclass(SegmentError, ValueError)


def test_attach_garbage_segment_is_bad_magic():
    name = f"{PREFIX}{os.getpid()}_badmagic{os.urandom(4).hex()}"
    shm = SharedMemory(name=name, create=True, size=256)
    try:
        shm.buf[:16] = b"definitely not a"
        with pytest.raises(SegmentError, match=r"is not a paramserver segment \(bad magic\)"):
            Segment.attach(name)
    finally:
        shm.close()
        # attach() has already unregistered the name from this process's resource
        # tracker; unlinking through SharedMemory would unregister it a second time.
        os.unlink(_path(name))


def test_attach_too_small_segment():
    name = f"{PREFIX}{os.getpid()}_small{os.urandom(4).hex()}"
    shm = SharedMemory(name=name, create=True, size=8)
    try:
        with pytest.raises(SegmentError, match="too small to be a paramserver segment"):
            Segment.attach(name)
    finally:
        shm.close()
        os.unlink(_path(name))


def test_attach_with_kind_mismatch(seg):
    with pytest.raises(SegmentError, match="holds 'test', expected 'params'"):
        Segment.attach(seg.name, kind="params")


def test_param_store_attach_refuses_other_kinds(seg):
    with pytest.raises(SegmentError, match="expected 'params'"):
        ParamStore.attach(seg.name)


# -- close and unlink ----------------------------------------------------------------------


def test_close_is_idempotent():
    s = Segment.create(LAYOUT)
    s.unlink()
    s.close()
    s.close()

    assert s.size == 0
    with pytest.raises(ValueError, match="is closed"):
        _ = s.arrays


def test_close_before_unlink_still_unlinks():
    s = Segment.create(LAYOUT)
    s.close()
    assert os.path.exists(_path(s.name))

    s.unlink()

    assert not os.path.exists(_path(s.name))


def test_unlink_keeps_creator_mapping_valid():
    s = Segment.create(LAYOUT)
    try:
        s["b"][0] = 2.0
        s.unlink()
        assert not os.path.exists(_path(s.name))
        assert s["b"][0] == 2.0
    finally:
        s.close()


def test_non_owner_unlink_raises_permission_error(seg):
    other = Segment.attach(seg.name)
    try:
        with pytest.raises(PermissionError, match="only the creator"):
            other.unlink()
        assert os.path.exists(_path(seg.name))
    finally:
        other.close()


def test_context_manager_of_attached_handle_does_not_unlink(seg):
    with Segment.attach(seg.name) as other:
        other["n"][1] = 5

    assert os.path.exists(_path(seg.name))
    assert seg["n"][1] == 5


def test_close_with_live_view_raises_buffer_error():
    s = Segment.create(LAYOUT)
    view = s["w"]
    try:
        with pytest.raises(BufferError, match="still has views in use; delete the arrays"):
            s.close()
    finally:
        del view
        s.close()
        s.unlink()

    assert not os.path.exists(_path(s.name))


def test_context_manager_unlinks_even_if_close_fails():
    with pytest.raises(BufferError):  # noqa: SIM117 - the view must outlive the with block
        with Segment.create(LAYOUT) as s:
            view = s["b"]
    assert not os.path.exists(_path(s.name))
    del view
    s.close()


# -- no room in /dev/shm -------------------------------------------------------------------


def test_create_larger_than_free_space_raises_enospc_and_leaves_nothing():
    before = {n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)}
    free_bytes = shm_free_bytes()
    layout = Layout.pack({"x": ((free_bytes // 4 + 1000,), np.float32)})
    assert layout.nbytes > free_bytes

    with pytest.raises(OSError, match=r"free space there .* or enlarge it") as info:
        Segment.create(layout)

    assert info.value.errno == errno.ENOSPC
    after = {n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)}
    assert after <= before


# -- the parameter server's store ----------------------------------------------------------


def test_create_for_array_shapes(store):
    n = MODEL_LAYOUT.flat_size

    assert store.params.shape == (n,) and store.params.dtype == np.float32
    assert store.state.shape == (2, n) and store.state.dtype == np.float32
    assert store.counters.array.shape == (3, len(COUNTER_FIELDS)) and store.counters.array.dtype == np.float64
    assert store.control.shape == (len(CONTROL_FIELDS),) and store.control.dtype == np.int64
    assert store.workers == 3
    assert store.meta["kind"] == "params"
    assert store.meta["lr"] == 0.1
    assert store.meta["counter_fields"] == list(COUNTER_FIELDS)
    assert store.meta["model_fingerprint"] == MODEL_LAYOUT.fingerprint
    assert store.model_layout == MODEL_LAYOUT


def test_create_for_without_state(store):
    with ParamStore.create_for(MODEL_LAYOUT, workers=1) as s:
        assert s.state.shape == (0, MODEL_LAYOUT.flat_size)
        assert s.workers == 1


def test_create_for_rejects_zero_workers():
    with pytest.raises(ValueError, match="workers must be at least 1"):
        ParamStore.create_for(MODEL_LAYOUT, workers=0)


def test_create_for_rejects_mixed_dtype_model():
    mixed = Layout.pack({"w": ((3,), np.float32), "b": ((3,), np.float64)})

    with pytest.raises(ValueError, match="cast the model first"):
        ParamStore.create_for(mixed, workers=1)


def test_version_sums_steps(store):
    assert store.version() == 0

    store.counters.row(0).steps = 4
    store.counters.row(2).steps = 7
    store.counters.row(1).samples = 1000  # not a step

    assert store.version() == 11
    assert isinstance(store.version(), int)


def test_request_stop(store):
    other = ParamStore.attach(store.name)
    try:
        assert not store.stop_requested
        assert not other.stop_requested
        store.request_stop()
        assert store.stop_requested
        assert other.stop_requested
    finally:
        other.close()


def test_pickled_store_is_a_param_store(store):
    store.params[:3] = [1.0, 2.0, 3.0]

    clone = pickle.loads(pickle.dumps(store))
    try:
        assert type(clone) is ParamStore
        np.testing.assert_array_equal(clone.params[:3], [1.0, 2.0, 3.0])
        assert clone.model_layout == MODEL_LAYOUT
    finally:
        clone.close()


def test_check_model_accepts_same_layout(store):
    store.check_model(Layout.pack({"w": ((3, 5), np.float32), "b": ((5,), np.float32)}))


@pytest.mark.parametrize(
    "other",
    [
        Layout.pack({"w": ((5, 3), np.float32), "b": ((5,), np.float32)}),
        Layout.pack({"w": ((3, 5), np.float64), "b": ((5,), np.float64)}),
        Layout.pack({"w": ((3, 5), np.float32)}),
    ],
    ids=["shape", "dtype", "missing"],
)
def test_check_model_rejects_other_layout(store, other):
    with pytest.raises(SegmentError, match=r"the model does not match segment .*build the same model"):
        store.check_model(other)


# -- finding and sweeping stale segments ---------------------------------------------------


def test_list_segments_reports_our_live_segment(seg):
    found = {name: (pid, alive) for name, pid, alive in list_segments()}

    assert found[seg.name] == (os.getpid(), True)


def test_sweep_stale_removes_dead_creators_segments_only(seg):
    dead_pid = _dead_pid()
    stale_name = f"{PREFIX}{dead_pid}_deadbeef"
    shm = SharedMemory(name=stale_name, create=True, size=64)
    # Pretend its creator is gone: our tracker must not unlink it, nor warn about it.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    shm.close()
    try:
        found = {name: (pid, alive) for name, pid, alive in list_segments()}
        assert found[stale_name] == (dead_pid, False)
        assert found[seg.name] == (os.getpid(), True)

        removed = sweep_stale()

        assert stale_name in removed
        assert seg.name not in removed
        assert not os.path.exists(_path(stale_name))
        assert os.path.exists(_path(seg.name))
        assert seg["w"].shape == (3, 5)
        assert stale_name not in {name for name, _, _ in list_segments()}
    finally:
        if os.path.exists(_path(stale_name)):
            os.unlink(_path(stale_name))


def test_sweep_stale_ignores_other_files_and_unparsable_pids_as_dead():
    other = f"psrvx_{os.getpid()}_keep"  # not our prefix
    odd = f"{PREFIX}notapid_{os.urandom(4).hex()}"
    for name in (other, odd):
        with open(_path(name), "wb") as f:
            f.write(b"x")
    try:
        found = {name: (pid, alive) for name, pid, alive in list_segments()}
        assert other not in found
        assert found[odd] == (None, False)

        removed = sweep_stale()

        assert odd in removed
        assert other not in removed
        assert os.path.exists(_path(other))
    finally:
        for name in (other, odd):
            if os.path.exists(_path(name)):
                os.unlink(_path(name))


def test_row_span_equals_a_search_of_the_rows():
    # The fast path (a span covering every row) must give what the searches give.
    from paramserver.store import SparseRows, row_span

    rng = np.random.default_rng(0)
    for _ in range(300):
        n, dim, offset = int(rng.integers(0, 6)), int(rng.integers(1, 5)), int(rng.integers(0, 20))
        rows = np.unique(rng.integers(0, 12, n)).astype(np.int64)
        s = SparseRows(offset, dim, rows, np.zeros((rows.size, dim), np.float32))
        lo, hi = sorted(int(v) for v in rng.integers(-5, offset + 14 * dim, 2))
        a, b = -(-(lo - offset) // dim), -(-(hi - offset) // dim)
        assert row_span(s, lo, hi) == (int(np.searchsorted(rows, a)), int(np.searchsorted(rows, b)))
