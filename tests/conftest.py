"""Shared fixtures. Every test proves it left nothing behind in /dev/shm: no segment and
no semaphore that its own processes created."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator

import psutil
import pytest

import paramserver as ps
from paramserver.store import SHM_DIR, list_segments

LOKY_SEMAPHORE = re.compile(r"^sem\.loky-(\d+)-")
"""Semaphores named by joblib's loky (which replaces multiprocessing's naming) carry the pid."""


@pytest.fixture(scope="session", autouse=True)
def torch_cache_of_the_session(tmp_path_factory) -> Iterator[None]:
    """torch.optim's first step (the plain-process references) makes torch's compile
    cache directory, ``<tmp>/torchinductor_<user>``, and keeps it: in the session's own
    temporary directory instead, so that the tests leave nothing in /tmp."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
    yield


@pytest.fixture(scope="session")
def digits() -> ps.Dataset:
    """scikit-learn's digits, split as ``ps.load_digits()`` splits it (read-only in tests)."""
    return ps.load_digits()


class _ProcessTree:
    """The pids of this process and of every process it started while the test ran
    (polled: a subprocess of a test lives for seconds at least)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.pids = {self.me.pid}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="test-process-tree", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            self._note()
            if self._done.wait(0.1):
                return

    def _note(self) -> None:
        try:
            self.pids.update(p.pid for p in self.me.children(recursive=True))
        except psutil.Error:
            pass

    def stop(self) -> set[int]:
        self._done.set()
        self._thread.join(5)
        self._note()
        return self.pids


def _ours(names_by_pid: dict[str, int | None], pids: set[int]) -> set[str]:
    return {name for name, pid in names_by_pid.items() if pid in pids}


def _shm_names() -> dict[str, int | None]:
    """Our segments and semaphores, and loky-named semaphores, with their creator's pid."""
    found: dict[str, int | None] = {name: pid for name, pid, _ in list_segments()}
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        entries = []
    for name in entries:
        m = LOKY_SEMAPHORE.match(name)
        if m:
            found[name] = int(m.group(1))
    return found


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fail any test that leaves a paramserver segment or semaphore in /dev/shm.

    Only what this test's own processes created counts: other runs on this machine
    (a second test session, a benchmark) create and leave their own."""
    before, sems_before = set(_shm_names()), _semaphores()
    tree = _ProcessTree()
    yield
    pids = tree.stop()
    leaked = _ours({n: p for n, p in _shm_names().items() if n not in before}, pids)
    for name in leaked:  # clean up so one leak does not fail every later test
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not leaked, f"test left shared-memory segments or semaphores behind: {sorted(leaked)}"
    # Every other semaphore that appeared during the test and is still there (a name
    # without a creator pid, such as multiprocessing's own sem.mp-*, which it unlinks at
    # once): left by this test, unless another program on the machine made it meanwhile.
    strays = _semaphores() - sems_before - set(_shm_names())
    assert not strays, f"test left semaphores behind: {sorted(strays)}"


def _semaphores() -> set[str]:
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith("sem.")}
    except FileNotFoundError:
        return set()


# -- the default run's length -----------------------------------------------------------------

SLOW_VARIANTS = {
    # Benchmarks: the memory suite starts every contender at once.
    "tests/test_bench_overhead_memory.py::test_memory_suite_reads_every_process_and_judges_the_target",
    "tests/test_bench.py::test_every_throughput_contender_measures_a_positive_rate[single]",
    "tests/test_bench.py::test_every_throughput_contender_measures_a_positive_rate[manager]",
    "tests/test_bench.py::test_every_throughput_contender_measures_a_positive_rate[paramserver-po1]",
    # One more variant of a case the default run covers with another parameter.
    "tests/test_cli.py::test_train_writes_results_and_prints_a_summary[torch-cnn]",
    "tests/test_tf.py::test_every_policy_runs_two_tf_workers_and_locking_ones_lose_no_update[po1]",
    "tests/test_tf.py::test_every_policy_runs_two_tf_workers_and_locking_ones_lose_no_update[po2]",
    "tests/test_tf.py::test_keras_models_reach_95_percent_on_digits_with_two_workers[subclassed]",
    "tests/test_tf.py::test_every_policy_runs_two_tf_workers_and_locking_ones_lose_no_update[striped]",
    "tests/test_tasks.py::test_a_keras_model_of_two_inputs_gets_a_dict_and_learns",
    "tests/test_cluster.py::test_downpour_loses_no_delta[1000]",
    "tests/test_rl.py::test_a_killed_worker_is_restarted_and_the_run_finishes[a3c-po1]",
    "tests/test_rl.py::test_a3c_under_a_locking_policy_with_an_env_factory[striped]",
    "tests/test_training.py::test_one_torch_worker_equals_torch_optim_sgd[po2]",
    "tests/test_training.py::test_one_torch_worker_equals_torch_optim_sgd[striped]",
    "tests/test_training.py::test_two_numpy_workers_train_under_every_policy[po2]",
    "tests/test_training.py::test_two_numpy_workers_train_under_every_policy[striped]",
    "tests/faults/test_workers.py::test_a_nan_gradient_is_never_applied[po1]",
    "tests/faults/test_workers.py::test_a_nan_gradient_is_never_applied[po2]",
    "tests/faults/test_workers.py::test_sigkill_of_a_worker_mid_run_is_survived[po2]",
    "tests/faults/test_workers.py::test_sigkill_of_a_worker_mid_run_is_survived[striped]",
    "tests/test_asynchrony.py::test_stale_first_runs_under_every_policy[po1]",
    "tests/test_asynchrony.py::test_stale_first_runs_under_every_policy[po2]",
    "tests/test_asynchrony.py::test_stale_first_runs_under_every_policy[striped]",
    # Covered in the default run by the supervised twin (tests/faults/test_workers.py).
    "tests/test_rl.py::test_a_hung_worker_is_killed_and_restarted",
    "tests/test_seam.py::test_rl_without_matplotlib_finishes_with_a_note_and_no_run_prints_a_buffer_error",
    "tests/test_seam.py::test_an_rl_run_resumed_from_its_checkpoint_continues_its_update_count",
}
"""Tests left out of the default run (which must stay well under 15 minutes on 2 cores) and
run with ``-m slow``: further parameters of cases the default run covers, and benchmarks."""


@pytest.hookimpl(tryfirst=True)  # before -m selects by marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_VARIANTS:
            item.add_marker(pytest.mark.slow)
