"""Training across (simulated) machines on a local Ray instance: paramserver.cluster.

One Ray instance serves the whole module (starting one takes seconds); every
test stops what it started, and the module's fixture shuts Ray down.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import DyingReLU

import paramserver as ps
from paramserver.cluster import (
    MAX_POLL_SECONDS,
    POLL_SECONDS,
    RAY_MISSING,
    ClusterConfig,
    SyncSchedule,
    train_cluster,
)
from paramserver.models.numpy_models import NumpyMLP, NumpyModel

ray = pytest.importorskip("ray")

TIMEOUT = 120


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with room for three simulated nodes of one worker."""
    from paramserver.cluster import local_ray

    with local_ray(num_cpus=3):
        yield


def config(**kw) -> ps.TrainConfig:
    base = dict(workers=1, epochs=30, batch_size=32, lr=0.05, momentum=0.9, out_dir="", progress=False)
    return ps.TrainConfig(**{**base, **kw})


def mlp(data: ps.Dataset) -> NumpyMLP:
    return NumpyMLP(data.input_shape[0], data.classes, hidden=32)


class ConstantGradient(NumpyModel):
    """Gradient 0.5 everywhere, whatever the batch: with lr 0.25 each update moves every
    parameter by exactly -0.125 (a power of two, so float32 sums of them are exact)."""

    def __init__(self, n: int):
        self.n = n

    def shapes(self):
        return {"w": (self.n,)}

    def init(self, rng):
        return {"w": np.zeros(self.n, np.float32)}

    def forward(self, params, x):
        return np.zeros((len(x), 2), np.float32), None

    def backward(self, params, cache, dlogits, grads):
        grads["w"][...] = 0.5


# -- bad input: one line, exit code 2, before anything starts --------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"sync_every": 0}, "sync_every must be at least 1"),
        ({"sync_rule": "gossip"}, "unknown sync_rule"),
        ({"elastic_alpha": 1.5}, "elastic_alpha"),
        ({"cluster": "somewhere"}, "cluster must be"),
        ({"shards": -1}, "shards must be >= 0"),
    ],
)
def test_bad_cluster_config_names_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        ClusterConfig(**{"cluster": "local", **kw})


def run_cli(
    *args: str, code: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    code = code or "import sys\nfrom paramserver.cli import main\nsys.exit(main(['train', *sys.argv[1:]]))"
    cmd = [sys.executable, "-c", code]
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT, env={**environ, **(env or {})}
    )


@pytest.mark.parametrize(
    "args,match",
    [
        (["--cluster", "local", "--nodes", "0"], "nodes must be at least 1"),
        (["--cluster", "local", "--sync-every", "0"], "sync_every must be at least 1"),
        # Port 9 (discard) on this machine: nothing listens, the connection is refused.
        (["--cluster", "127.0.0.1:9", "--connect-timeout", "3"], "cannot reach the Ray cluster"),
        (["--cluster", "ray://127.0.0.1:9", "--connect-timeout", "3"], "cannot reach the Ray cluster"),
        (["--cluster", "auto"], "no Ray cluster at 'auto'"),  # none is running: Ray says so at once
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, match):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], proc.stderr


def test_auto_with_a_dead_address_fails_fast():
    # What `ray.init(address="auto")` would retry for a long time: RAY_ADDRESS (or the file a
    # head killed with SIGKILL leaves behind) naming a cluster that is gone.
    proc = run_cli("--cluster", "auto", "--connect-timeout", "3", env={"RAY_ADDRESS": "127.0.0.1:9"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at auto" in lines[0], proc.stderr


def test_missing_ray_names_the_extra():
    code = (
        "import sys; sys.modules['ray'] = None\n"  # makes `import ray` raise ImportError
        "from paramserver.cli import main\n"
        "sys.exit(main(['train', *sys.argv[1:]]))"
    )
    proc = run_cli("--cluster", "local", code=code)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"paramserver: error: {RAY_MISSING}"


def simulate_syncs(step_seconds: float, every: int, seconds: float = 0.0, steps: int = 400):
    """A sync thread driven by SyncSchedule against a worker that makes one update every
    ``step_seconds`` (simulated time; a sync takes 3 ms): the version at each sync, and
    the number of wake-ups."""
    now, sync_cost = 0.0, 0.003
    version = lambda t: min(steps, int(t / step_seconds))  # noqa: E731
    schedule = SyncSchedule(every, seconds, 0, now)
    sent, wakes, wait = [], 0, POLL_SECONDS
    while version(now) < steps:
        now += wait
        wakes += 1
        if schedule.due(version(now), now):
            sent.append(version(now))
            now += sync_cost
            schedule.synced(sent[-1], now)
        wait = schedule.wait(version(now), now)
    return sent, wakes


@pytest.mark.parametrize("step_ms", [0.05, 0.8, 2.0, 20.0])
def test_syncs_come_every_sync_every_updates_whatever_the_step_time(step_ms):
    sent, wakes = simulate_syncs(step_ms / 1000, every=10)
    assert len(sent) >= 2
    # Each sync is the first after a new multiple of sync_every: never two within one period.
    assert all(b // 10 > a // 10 for a, b in itertools.pairwise(sent)), sent
    if step_ms * 10 > 3:  # a period outlasts a sync: each sync at most one update late (but
        # the first: until two reads have seen updates the rate is unknown, and it sleeps long)
        assert all(v % 10 <= 1 for v in sent[1:]), sent
    # Far fewer wake-ups than one per POLL_SECONDS over the simulated run.
    run_seconds = 400 * step_ms / 1000
    assert wakes <= max(50, 0.25 * run_seconds / POLL_SECONDS), wakes


def test_an_idle_node_sleeps_long():
    # No update yet (workers starting): sleep MAX_POLL_SECONDS, even with sync_seconds set
    # (nothing new to send, so no deadline).
    schedule = SyncSchedule(10, 0.001, 0, 0.0)
    assert schedule.wait(0, 5.0) == MAX_POLL_SECONDS
    assert not schedule.due(0, 5.0)
    assert schedule.due(1, 5.0)  # an update, and sync_seconds past: due
    schedule.synced(1, 5.0)
    assert schedule.wait(1, 5.0005) == MAX_POLL_SECONDS  # nothing new since that sync
    assert schedule.wait(2, 5.0009) == POLL_SECONDS  # new update, sync_seconds' deadline near


def test_sync_seconds_alone_syncs_by_time():
    sent, _ = simulate_syncs(0.001, every=10**9, seconds=0.05, steps=500)
    assert 6 <= len(sent) <= 10, sent  # 0.5 s of updates, a sync every 0.05 s (+ 3 ms each)


# -- training ------------------------------------------------------------------------


def test_a_node_syncs_while_it_trains_and_not_more_often_than_sync_every(local_ray, digits):
    # The schedule in a real run: syncs during training (not only the final one), and never
    # more than one per sync_every updates (+1: the final sync).
    cc = ClusterConfig(cluster="local", nodes=1, sync_every=25)
    result = train_cluster(mlp(digits), digits, config(steps=1000, epochs=1000), cc)
    (node,) = result.nodes
    assert node["updates"] == 1000
    assert 2 <= node["syncs"] <= 1000 // 25 + 1, node


@pytest.mark.parametrize("rule", ["downpour", "easgd"])
def test_two_nodes_learn_digits(local_ray, digits, rule):
    cc = ClusterConfig(cluster="local", nodes=2, sync_every=10, sync_rule=rule, elastic_alpha=0.2)
    # 50 epochs: at 30, downpour ended below 95% in 2 of 16 runs on a loaded 2-core
    # machine (0.922, 0.933; the others 0.961-0.978); at 50, 5 of 5 reached 0.964-0.978.
    result = train_cluster(mlp(digits), digits, config(epochs=50), cc)
    assert result.test_accuracy >= 0.95, result.summary()
    assert [n["node"] for n in result.nodes] == [0, 1]
    assert all(n["syncs"] >= 1 and n["bytes_sent"] > 0 for n in result.nodes)
    assert result.updates == sum(n["updates"] for n in result.nodes)


@pytest.mark.parametrize("rule", ["downpour", "easgd"])
def test_a_collapsed_model_on_a_cluster_is_warned_of(local_ray, digits, rule):
    cfg = config(steps=200, epochs=100, cluster="local", nodes=2, sync_every=10, sync_rule=rule)
    with pytest.warns(ps.CollapseWarning, match="gives every test sample the same output") as heard:
        if rule == "downpour":
            result = train_cluster(DyingReLU(64, 10, 16), digits, cfg)
        else:  # the same through paramserver.train
            result = ps.train(DyingReLU(64, 10, 16), digits, cfg)
    assert len(result.warnings) == 1 and "warning: the model gives" in result.summary()
    (said,) = [w for w in heard if issubclass(w.category, ps.CollapseWarning)]
    assert str(said.message) == result.warnings[0] and said.filename == __file__  # the caller's line
    assert ("with downpour each node keeps its own momentum" in str(said.message)) == (rule == "downpour")
    assert result.stop_reason == "steps"


def test_a_regression_on_a_cluster_is_scored_by_the_driver_alone(local_ray):
    # Nodes get no test split (they never score it); the driver scores the global values
    # as one machine does: the test loss for a regression. LinearRegression starts at
    # zero, the same output for every sample, so its end is judged against its start.
    from paramserver.models.numpy_models import LinearRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    data = ps.make_dataset(x, x @ np.arange(1.0, 6.0, dtype=np.float32), task="regress")
    cfg = config(steps=300, epochs=100, lr=0.01, cluster="local", nodes=2, sync_every=10)
    result = train_cluster(LinearRegression(5), data, cfg)
    assert result.test_accuracy is None and result.metric == "loss"
    # The mean squared error of the global values on the test split. (How low it is
    # depends on the syncs: a node can make its 150 updates before its first sync, and
    # downpour then adds two whole deltas.)
    p = result.params
    mse = np.mean((data.x_test @ p["W"] + p["b"] - data.y_test.reshape(-1, 1)) ** 2)
    assert result.test_metric == pytest.approx(mse, rel=1e-5)
    assert result.warnings == []  # constant outputs at the start (zeros), not at the end


def test_a_target_accuracy_stops_every_node(local_ray, digits):
    # The driver scores the global values every eval_every seconds, with the evaluator
    # that scores the final values.
    cc = ClusterConfig(cluster="local", nodes=2, sync_every=10)
    result = train_cluster(mlp(digits), digits, config(epochs=1000, target_accuracy=0.9, eval_every=0.05), cc)
    assert result.stop_reason == "target_accuracy", result.summary()
    assert result.evaluations and result.evaluations[-1]["test_accuracy"] >= 0.9
    assert all(e["test_accuracy"] < 0.9 for e in result.evaluations[:-1])
    assert result.updates < 1000 * len(digits.x_train) // 32


def test_one_node_syncing_every_update_equals_one_machine(local_ray, digits):
    # One worker, no momentum, po3: the single-machine run is deterministic, and with one
    # node every sync hands back the node's own values, so nothing changes.
    cfg = config(momentum=0.0, policy="po3", steps=200, epochs=1000)
    model = mlp(digits)
    alone = ps.train(model, digits, cfg)
    cc = ClusterConfig(cluster="local", nodes=1, sync_every=1)
    spread = train_cluster(model, digits, cfg, cc)
    assert spread.updates == alone.updates == 200
    assert spread.nodes[0]["syncs"] > 1
    for name, value in alone.params.items():
        np.testing.assert_allclose(spread.params[name], value, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("sync_every", [1, 1000])
def test_downpour_loses_no_delta(local_ray, sync_every):
    # po1: the write-back takes the update lock, so neither a local update nor another
    # node's delta can be lost; every one of the 3 x 40 updates must reach the global values.
    # sync_every 1: many round trips while the workers update; 1000: only the final sync.
    nodes, per_node = 3, 40
    cfg = config(momentum=0.0, lr=0.25, policy="po1", steps=nodes * per_node, epochs=1000)
    cc = ClusterConfig(cluster="local", nodes=nodes, shards=2, sync_every=sync_every)
    rng = np.random.default_rng(0)
    data = ps.make_dataset(rng.normal(size=(96, 4)), rng.integers(0, 2, 96), classes=2)
    result = train_cluster(ConstantGradient(50), data, cfg, cc)
    assert [n["updates"] for n in result.nodes] == [per_node] * nodes
    np.testing.assert_array_equal(result.params["w"], np.full(50, -0.125 * nodes * per_node, np.float32))


def test_results_json_has_per_node_figures(local_ray, digits, tmp_path):
    import json

    cfg = config(epochs=2, out_dir=str(tmp_path))
    result = train_cluster(mlp(digits), digits, cfg, ClusterConfig(cluster="local", nodes=2))
    (run_dir,) = tmp_path.iterdir()
    assert result.run_dir == str(run_dir)
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["cluster"]["nodes"] == 2
    assert {"syncs", "bytes_sent", "bytes_received", "sync_seconds", "staleness_mean"} <= set(
        doc["result"]["nodes"][0]
    )
    assert (run_dir / "params.safetensors").exists()


# -- faults ----------------------------------------------------------------------------


def kill_once(role: str, after: float):
    """A callback that SIGKILLs the first ``role`` actor (agents or shards) ``after`` s into
    training."""
    fired: list[int] = []

    def callback(figures):
        if not fired and figures["elapsed"] >= after:
            pid = ray.get(figures[role][0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            fired.append(pid)
        return False

    return callback, fired


@pytest.mark.slow
def test_a_killed_node_agent_is_restarted_and_the_run_completes(local_ray, digits):
    callback, fired = kill_once("agents", after=1.0)
    cfg = config(epochs=100000, max_seconds=6.0)
    cc = ClusterConfig(cluster="local", nodes=2, sync_every=10)
    result = train_cluster(mlp(digits), digits, cfg, cc, callback=callback)
    assert fired, "the callback never ran"
    assert result.nodes[0]["agent_restarted"]
    assert result.test_accuracy >= 0.90, result.summary()


@pytest.mark.slow
def test_a_killed_shard_is_reseeded_and_the_run_completes(local_ray, digits):
    callback, fired = kill_once("shards", after=1.0)
    cfg = config(epochs=100000, max_seconds=6.0)
    cc = ClusterConfig(cluster="local", nodes=2, sync_every=10)
    result = train_cluster(mlp(digits), digits, cfg, cc, callback=callback)
    assert fired, "the callback never ran"
    assert all(np.isfinite(v).all() for v in result.params.values())
    assert result.test_accuracy >= 0.90, result.summary()


def cluster_cli(tmp: str, *args: str) -> subprocess.Popen:
    """``paramserver train`` on 2 local nodes, its temporary files under ``tmp``."""
    cmd = [sys.executable, "-m", "paramserver", "train", "--cluster", "local", "--nodes", "2",
           "--workers", "1", "--backend", "numpy", "--out-dir", "", *args]  # fmt: skip
    env = {**os.environ, "TMPDIR": tmp}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def short_tmp():
    """A fresh, short TMPDIR (Ray's socket paths below it must fit in 107 bytes)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="pst", dir="/tmp")
    try:
        yield pathlib.Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_local_cluster_leaves_no_ray_session_files(short_tmp):
    proc = cluster_cli(str(short_tmp), "--epochs", "1")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "stopped by epochs" in out, err
    assert list(short_tmp.iterdir()) == []  # Ray's logs and sockets went with its instance
    # No line that reads like trouble: actor handles among an agent's constructor arguments
    # made Ray print one at every run (the handles now come with run()).
    assert "constructor arguments in the object store" not in err, err


def _holding(path: pathlib.Path) -> list:
    """This user's processes with a file open (or their working directory) under path."""
    import psutil

    inside, out = f"{path}/", []
    for proc in psutil.process_iter():
        try:
            links = [os.readlink(f"/proc/{proc.pid}/cwd")]
            links += [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
        except OSError:
            continue
        if any(link.startswith(inside) for link in links):
            out.append(proc)
    return out


def test_a_sigkilled_driver_leaves_nothing_after_clean(short_tmp):
    """Ray's agents outlive a driver killed with SIGKILL (they keep their logs open in
    the instance's directory): `paramserver clean` stops them and removes the directory,
    with the nodes' segments and directories."""
    import time

    import psutil

    proc = cluster_cli(str(short_tmp), "--epochs", "100000")
    try:
        deadline = time.monotonic() + 60  # both node servers have made their directories
        while len(list(short_tmp.glob("paramserver-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(short_tmp.glob("paramserver-*"))) >= 3, proc.stderr.read() if proc.poll() else ""
        time.sleep(1)
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
        time.sleep(1)  # Ray's own processes that do go with the driver, gone
        env = {**os.environ, "TMPDIR": str(short_tmp)}
        clean = subprocess.run([sys.executable, "-m", "paramserver", "clean"], env=env,
                               capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
        assert clean.returncode == 0, clean.stderr
        assert _holding(short_tmp) == []
        assert list(short_tmp.iterdir()) == []
    finally:
        left = _holding(short_tmp)
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=10)


@pytest.mark.slow
def test_sigterm_stops_every_node_and_leaves_nothing(short_tmp):
    import time

    proc = cluster_cli(str(short_tmp), "--epochs", "100000")
    time.sleep(12)  # Ray's start, then some training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "stopped by terminated" in out, err
    assert list(short_tmp.iterdir()) == []


def test_a_sigterm_swallowed_during_start_up_stops_the_driver():
    # As on one machine (tests/faults/test_server.py): a SIGTERM whose KeyboardInterrupt
    # an import swallowed is on record, and the driver's handlers take it as a stop.
    import time

    from paramserver.cluster import _stop_signals
    from paramserver.supervise import install_early_signals

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        install_early_signals()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
        with _stop_signals() as heard:
            assert heard.get("reason") == "terminated"
        with _stop_signals() as heard:  # the record is used once
            assert heard == {}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
