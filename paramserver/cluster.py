"""Beyond one machine: one shared-memory server per machine, global parameter shards on Ray.

    paramserver train --cluster local --nodes 2 --workers 1     # simulated on this machine
    ray start --head                                                        # on the first machine
    ray start --address HEAD:6379                                           # on every other machine
    paramserver train --cluster auto --nodes 4 --workers 8      # on any of them

(Ray 2.60 starts clusters with token authentication: the driver needs the
cluster's token, ``RAY_AUTH_TOKEN``, or every process ``RAY_AUTH_MODE=disabled``.)

The hierarchy: inside each machine nothing changes. A **node agent** (a Ray
actor, one per machine) runs the usual :class:`~paramserver.server.ParameterServer`
with its Hogwild! workers on its share of the data. The flat parameter vector is
split into K contiguous **shards**, each a Ray actor holding the global values of
its slice. Every ``sync_every`` local updates (or ``sync_seconds``) a sync thread
in the agent sends each shard its slice and writes what comes back into the
segment while the workers keep training:

- ``downpour``: the node sends ``delta = local - base`` (``base``: the global
  values it last received); the shard adds it (``global += delta``: additive, no
  node's work is lost) and returns the new global values;
- ``easgd`` (elastic averaging, Zhang, Choromanska & LeCun 2015): the node sends
  its values ``x``; with ``diff = alpha * (x - c)`` the shard moves its centre
  ``c += diff`` and returns ``x - diff``.

Either way the node writes ``returned + (current_local - sent)``, i.e. adds
``returned - sent`` in place: updates its workers made during the round trip
stay. A sync that changes nothing writes nothing (only coordinates whose
correction is non-zero are stored), so one node alone trains exactly as one
machine does. What a local worker may see: under po3 a read during the
write-back can mix pre- and post-sync coordinates, and a worker update racing
the write-back of the same coordinate can be lost (po3's usual contract); under
po1, po2 and striped the write-back takes the policy's update locks, so no
update is lost. Optimizer state (momentum, Adam moments) stays per node.

Bytes per sync and node: 4P pushed and 4P pulled (P float32 parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ClusterConfig, TrainConfig
from .config import cluster_address as _address
from .data import Dataset, shard, take
from .layout import Layout
from .metrics import COLLAPSED, resolve
from .server import Evaluator, ParameterServer, TrainResult, warn_of
from .store import make_private_dir, private_dir_prefix, sweep_stale
from .supervise import run_span, take_early_signal

RAY_MISSING = "the cluster needs Ray: pip install 'paramserver[ray]'"
POLL_SECONDS = 0.0005
"""The shortest wait of a node's sync thread between two reads of the update count: a
callback a few times a second is too slow for syncs every 1-10 updates."""
MAX_POLL_SECONDS = 0.01
"""The longest wait (also while no update has been made yet)."""
DRIVER_POLL_SECONDS = 0.05
RESEED_WAIT = 5.0
"""Seconds a starting node waits for another node to re-seed a restarted shard."""
STOP_TIMEOUT = 60.0
"""Seconds the nodes get to stop and report once told to, before they are killed."""
DOWNPOUR_HINT = (
    "; with downpour each node keeps its own momentum and the shards add every node's steps "
    "whole: use easgd, or less momentum"
)


class SyncSchedule:
    """When a node's sync thread syncs, and how long it sleeps between two reads of the
    update count: a sync each time the count passes a multiple of ``every``, or ``seconds``
    after the last one if an update has been made since. The thread wakes after half the
    time the remaining updates take at the last measured rate (measured between the last
    two reads that saw new updates, so a read that saw none keeps it), within
    [POLL_SECONDS, MAX_POLL_SECONDS]: waking every POLL_SECONDS whatever the rate took 4% of
    a core per idle node."""

    def __init__(self, every: int, seconds: float, version: int, now: float):
        self.every, self.seconds = every, seconds
        self.rate = 0.0
        self.seen, self.seen_at = version, now
        self.synced(version, now)

    def synced(self, version: int, now: float) -> None:
        """A sync that sent ``version`` ended at ``now``."""
        self.sent, self.last = version, now
        self.next_at = (version // self.every + 1) * self.every

    def due(self, version: int, now: float) -> bool:
        if version >= self.next_at:
            return True
        return bool(self.seconds) and version > self.sent and now - self.last >= self.seconds

    def wait(self, version: int, now: float) -> float:
        """Seconds to sleep before the next read of the update count."""
        if version > self.seen and now > self.seen_at:
            self.rate = (version - self.seen) / (now - self.seen_at)
            self.seen, self.seen_at = version, now
        wait = 0.5 * (self.next_at - version) / self.rate if self.rate > 0 else MAX_POLL_SECONDS
        if self.seconds and version > self.sent:
            wait = min(wait, self.last + self.seconds - now)
        return min(max(wait, POLL_SECONDS), MAX_POLL_SECONDS)


def _model_spec(model: Any, loss: Any, seed: int, data: Dataset) -> tuple[Any, Layout, np.ndarray]:
    # paramserver.api.model_spec, through the registry itself (the API dispatches here).
    from paramserver.workers.backends import backend_for

    return backend_for(model).make_spec(model, loss, seed, data)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


@dataclass
class ClusterResult(TrainResult):
    """A :class:`TrainResult` of the global parameters, with per-node figures."""

    nodes: list[dict[str, Any]] = field(default_factory=list)
    """Per node: updates, samples, samples/s, syncs, bytes sent and received, seconds
    syncing, staleness across nodes (other nodes' updates folded in between two of
    its syncs), whether its agent was restarted."""
    cluster: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        out = super().summary()
        for n in self.nodes:
            out += (
                f"\nnode {n['node']}: {n['updates']} updates, {n['samples_per_second']:,.0f} samples/s, "
                f"{n['syncs']} syncs ({n['sync_seconds']:.2f} s, {n['bytes_sent'] / 2**20:.1f} MiB sent, "
                f"{n['bytes_received'] / 2**20:.1f} MiB received), cross-node staleness mean "
                f"{n['staleness_mean']:.1f}, max {n['staleness_max']:.0f}"
            )
            if n["agent_restarted"]:
                out += "; its agent was restarted"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "nodes": self.nodes, "cluster": self.cluster}


# -- the shard actor ---------------------------------------------------------------


class _Shard:
    """The global values of one contiguous slice of the flat parameter vector.

    Ray restarts it after a crash with an empty slice (``values is None``): the
    next node to sync re-seeds it from its own copy, the freshest there is.
    """

    def __init__(self, rule: str, alpha: float):
        self.rule = rule
        self.alpha = np.float32(alpha)
        self.values: np.ndarray | None = None
        self.updates = 0
        """Updates folded in from all nodes (this life)."""
        self.seen: dict[int, int] = {}
        self.node_updates: dict[int, int] = {}

    def pid(self) -> int:
        return os.getpid()

    def seed(self, values: np.ndarray) -> None:
        self.values = np.array(values, dtype=values.dtype)  # ours to write: Ray's copy is read-only

    def get(self) -> np.ndarray | None:
        return self.values

    def get_or_seed(self, values: np.ndarray) -> np.ndarray:
        """The global values; ``values`` first become them if this shard is empty."""
        if self.values is None:
            self.seed(values)
        return self.values

    def done_updates(self, node: int) -> int:
        return self.node_updates.get(node, 0)

    def push_pull(
        self, node: int, payload: np.ndarray, updates: int, fallback: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, int]:
        """Fold in one node's payload; return what the node should hold now and the
        other nodes' updates folded in since this node's previous sync.

        ``fallback``: the node's values, to re-seed a restarted (empty) shard; without
        it an empty shard returns None and the node calls again with it.
        """
        if self.values is None:
            if fallback is None:
                return None, 0
            self.seed(fallback)
            out = self.values
        elif self.rule == "downpour":
            self.values += payload
            out = self.values
        else:  # easgd: both move alpha of their gap towards each other
            diff = self.alpha * (payload - self.values)
            self.values += diff
            out = payload - diff
        staleness = self.updates - self.seen.get(node, 0)
        self.updates += updates
        self.seen[node] = self.updates
        self.node_updates[node] = self.node_updates.get(node, 0) + updates
        return out, staleness


# -- the node agent ----------------------------------------------------------------


@dataclass
class _NodePlan:
    """What one node agent trains: sent once, when the agent starts."""

    node: int
    spec: Any
    layout: Layout
    data: Any
    """A Ray object reference to this node's Dataset (put once by the driver)."""
    config: TrainConfig
    cluster: ClusterConfig
    bounds: list[tuple[int, int]]
    init: np.ndarray
    """The initial parameters: the last resort for a shard that lost its values."""
    budget: int
    """This node's updates in all (0: its epochs decide)."""
    cores: tuple[int, ...] | None
    """Simulated nodes: the cores this node may use; None: the whole machine."""


class _NodeAgent:
    """Runs one machine's shared-memory server and syncs it with the shards."""

    def __init__(self) -> None:
        # The plan and the shards' handles come with run(), not here: with actor handles
        # among its constructor's arguments, Ray 2.60 prints at every start that a restart
        # may fail for want of them (ray#53727). A retried run() gets its arguments again.
        import ray

        self.plan: _NodePlan | None = None
        self.shards: list[Any] = []
        with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated name
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._stop = threading.Event()
        self._live: dict[str, Any] = {"updates": 0}
        self.figures = {"syncs": 0, "bytes_sent": 0, "bytes_received": 0, "sync_seconds": 0.0}
        self.staleness: list[int] = []
        self.base: np.ndarray | None = None
        self._synced_version = 0
        """The local update count at the last sync."""
        self._sync_error: BaseException | None = None

    def pid(self) -> int:
        return os.getpid()

    def live(self) -> dict[str, Any]:
        return dict(self._live)

    def stop(self) -> None:
        self._stop.set()

    def _pull(self, plan: _NodePlan) -> np.ndarray:
        """The global values. A shard that restarted before any node could re-seed it is
        given a few seconds for a training node to do so (its copy is fresher), then
        seeded with the initial values."""
        import ray

        deadline = time.monotonic() + RESEED_WAIT
        while True:
            parts = ray.get([s.get.remote() for s in self.shards])
            if all(p is not None for p in parts) or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for i, (lo, hi) in enumerate(plan.bounds):
            if parts[i] is None:
                parts[i] = ray.get(self.shards[i].get_or_seed.remote(plan.init[lo:hi]))
        return np.concatenate(parts).astype(plan.layout.dtype, copy=False)

    def run(self, plan: _NodePlan, shards: list[Any]) -> TrainResult:
        """Train this node's share until its budget is spent or the driver says stop."""
        import ray

        self.plan, self.shards = plan, shards
        if plan.cores is not None:
            # Set before the server starts: its workers inherit the mask, and the server
            # pins worker r to the r-th core of it.
            os.sched_setaffinity(0, plan.cores)
        cfg = plan.config
        if plan.budget:
            # A restarted agent trains what its earlier lives did not (as far as the
            # shards have heard of it).
            done = ray.get(self.shards[0].done_updates.remote(plan.node))
            cfg = dataclasses.replace(cfg, steps=max(1, plan.budget - done))
        init = self._pull(plan)
        self.base = init.copy()
        data = ray.get(plan.data)

        def callback(figures: dict[str, Any]) -> bool:
            self._live = {"updates": figures["updates"], "samples": figures["samples"]}
            return self._stop.is_set()

        with ParameterServer(plan.spec, plan.layout, init, data, cfg, callback=callback) as server:
            done_event = threading.Event()
            syncer = threading.Thread(target=self._sync_loop, args=(server, done_event), daemon=True)
            syncer.start()
            try:
                result = server.run()
            finally:
                done_event.set()
                syncer.join()
            if self._sync_error is not None:  # e.g. a shard past its restarts
                raise RuntimeError(
                    f"node {plan.node} could not sync: {self._sync_error}"
                ) from self._sync_error
            self._sync(server)  # the workers' last updates reach the shards
        # The server's closures hold it in a reference cycle: collect it now, so that its
        # locks are unlinked while the agent is whole, not at its exit (benchmark runs
        # showed the agent's resource tracker gone by then, and relaunched to unregister).
        del server
        gc.collect()
        result.params = {}  # the global values live in the shards
        result.workers = [{**row, "node": float(plan.node)} for row in result.workers]
        return result

    def report(self) -> dict[str, Any]:
        stale = self.staleness
        return {
            **self.figures,
            "staleness_mean": float(np.mean(stale)) if stale else 0.0,
            "staleness_max": float(max(stale, default=0)),
            "agent_restarted": self.restarted,
        }

    def _sync_loop(self, server: ParameterServer, done: threading.Event) -> None:
        """Sync every ``sync_every`` local updates (or ``sync_seconds``) until ``done``; a
        sync that fails stops this node's run (the error is raised by ``run``)."""
        try:
            self._sync_until(server, done)
        except BaseException as e:
            self._sync_error = e
            self._stop.set()

    def _sync_until(self, server: ParameterServer, done: threading.Event) -> None:
        assert self.plan is not None, "the sync thread runs inside run()"
        cc = self.plan.cluster
        store = server.store
        schedule = SyncSchedule(cc.sync_every, cc.sync_seconds, store.version(), time.monotonic())
        wait = POLL_SECONDS
        while not done.wait(wait):
            if schedule.due(store.version(), time.monotonic()):
                self._sync(server)
                schedule.synced(self._synced_version, time.monotonic())
            wait = schedule.wait(store.version(), time.monotonic())

    def _sync(self, server: ParameterServer) -> None:
        import ray

        plan = self.plan
        assert plan is not None, "syncs run inside run()"
        store = server.store
        params = store.params
        t0 = time.perf_counter()
        version = store.version()
        updates = version - self._synced_version
        self._synced_version = version
        assert self.base is not None
        sent = params.copy()  # po3: may hold half-applied updates, as any live read does
        payload = sent - self.base if plan.cluster.sync_rule == "downpour" else sent
        calls = [
            s.push_pull.remote(plan.node, payload[lo:hi], updates)
            for s, (lo, hi) in zip(self.shards, plan.bounds, strict=True)
        ]
        outs = ray.get(calls)
        for i, (values, _) in enumerate(outs):
            if values is None:  # restarted empty: re-seed it from our copy
                lo, hi = plan.bounds[i]
                outs[i] = ray.get(
                    self.shards[i].push_pull.remote(plan.node, payload[lo:hi], updates, sent[lo:hi])
                )
        target = np.concatenate([values for values, _ in outs])
        self.staleness.append(int(outs[0][1]))
        correction = target - sent
        with server.store.exclusive():
            # Only coordinates that changed are written: a worker's update to any other
            # coordinate cannot be overwritten, and one node alone stays exact.
            np.add(params, correction, out=params, where=correction != 0)
        self.base = target
        f = self.figures
        f["syncs"] += 1
        f["bytes_sent"] += payload.nbytes
        f["bytes_received"] += target.nbytes
        f["sync_seconds"] += time.perf_counter() - t0


# -- the driver --------------------------------------------------------------------


def _split(data: Dataset, nodes: int) -> list[Dataset]:
    """Each node's contiguous share of the training split, and no test split: the driver
    scores the global values, a node would only score its own copy. A node receives its
    share by value: mapped files are read, not mapped, on other machines."""
    out = []
    none = slice(0, 0)
    x_test = take(data.x_test, none)
    y_test = None if data.y_test is None else take(data.y_test, none)
    for i in range(nodes):
        lo, hi = shard(len(data), i, nodes)
        y = None if data.y_train is None else data.y_train[lo:hi]
        share = take(data.x_train, slice(lo, hi))
        out.append(Dataset(share, y, x_test, y_test, data.classes, data.name, data.task))
    return out


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A Ray instance on this machine for simulated nodes, shut down on exit: what
    ``cluster="local"`` does when Ray is not running yet.

    Its session files (logs, sockets) go to a directory of its own, removed on exit:
    Ray's default, ``<tmp>/ray/session_*``, keeps every session's files for good. Ray's
    sockets live about 64 characters below that directory, within the 107 of a socket
    path: under a longer ``TMPDIR`` than that leaves room for, it goes to ``/tmp``."""
    ray = _import_ray()
    base, prefix = tempfile.gettempdir(), private_dir_prefix()
    # <base>/<prefix + 8 random>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
    longest = len(base) + 1 + len(prefix) + 8 + len("/session_2026-12-03_11-57-42_843402_4194304") + 21
    if longest > 107 and os.path.isdir("/tmp"):
        base = "/tmp"
    # A private directory like a server's: if this process is SIGKILLed, `paramserver
    # clean` (and the sweep at every start) removes it and stops Ray's agents, which
    # outlive a killed driver.
    root, lock_fd = make_private_dir(base)
    # Ray workers must import the caller's modules (a model class defined next to the
    # script): on this machine, give them the driver's import path.
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    try:
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, runtime_env=env, configure_logging=False,
            _temp_dir=root,
        )  # fmt: skip
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        os.close(lock_fd)


def _auto_address() -> tuple[str, int] | None:
    """The address ``ray.init(address="auto")`` will try, so that a dead one fails fast
    (Ray retries it for a long time): ``RAY_ADDRESS``, else the file a running head
    writes. Ray 2.60 names that file ``<tmp>/ray/ray_current_cluster`` and has no
    public call that returns it; a head killed with SIGKILL leaves it behind."""
    text = os.environ.get("RAY_ADDRESS", "")
    if not text:
        try:
            with open(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")) as f:
                text = f.read().strip()
        except OSError:
            return None  # Ray itself says that no instance is running
    return _address(text)


def _connect(ray: Any, cc: ClusterConfig, config: TrainConfig, stack: contextlib.ExitStack) -> None:
    """Start or join Ray, leaving on ``stack`` its shutdown if this call started it."""
    if ray.is_initialized():
        return
    if cc.cluster == "local":
        stack.enter_context(local_ray(cc.nodes * config.workers))
        return
    address = _address(cc.cluster) if cc.cluster != "auto" else _auto_address()
    if address is not None:
        try:  # Ray waits long for an address that does not answer: fail fast instead
            socket.create_connection(address, timeout=cc.connect_timeout).close()
        except OSError as e:
            raise ValueError(
                f"cannot reach the Ray cluster at {cc.cluster} ({e}); start it with `ray start --head` "
                "there, or pass --cluster local"
            ) from None
    try:
        ray.init(address=cc.cluster, include_dashboard=False, configure_logging=False)
    except ConnectionError as e:
        raise ValueError(
            f"no Ray cluster at {cc.cluster!r} ({e}); start one with `ray start --head`, or --cluster local"
        ) from None
    stack.callback(ray.shutdown)


def train_cluster(
    model: Any,
    data: Any,
    config: TrainConfig,
    cluster: ClusterConfig | None = None,
    *,
    loss: Callable[..., Any] | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    _via_train: bool = False,
) -> ClusterResult:
    """Train ``model`` on ``data`` across ``cluster.nodes`` machines (or simulated ones).

    Each node runs ``config.workers`` workers on its share of the data, as
    ``paramserver.train`` would; the result holds the global parameters. Stop
    criteria: ``steps`` (split across nodes), ``epochs`` (each node over its
    share), ``max_seconds`` and ``target_accuracy`` (checked by this process on
    the global values every ``eval_every`` seconds), ``callback`` (called about
    20 times a second with ``elapsed``, ``test_accuracy`` and the Ray handles of the
    ``agents`` and ``shards``, e.g. for their ``pid``; returning True stops every node).
    ``cluster``: default, the cluster fields of ``config``. ``paramserver.train`` calls
    this when ``config.cluster`` is set (``_via_train``: its warnings then name the
    caller of ``paramserver.train``). A collapsed model is warned of
    (:class:`paramserver.CollapseWarning`).
    """
    from .data import as_dataset as _as_dataset

    cluster = cluster or config.cluster_options()
    if not cluster.cluster:
        raise ValueError("train_cluster needs a cluster: 'local', 'auto', HOST:PORT or ray://HOST:PORT")
    ray = _import_ray()
    dataset = _as_dataset(data, config.seed, None if config.task == "auto" else config.task)
    if len(dataset) < cluster.nodes * config.workers:
        raise ValueError(
            f"{cluster.nodes} nodes x {config.workers} workers need a training sample each; "
            f"the data has {len(dataset)}"
        )
    if config.target is not None:
        raise ValueError("target_metric/target are not evaluated across machines yet; use target_accuracy")
    spec, layout, init = _model_spec(model, loss, config.seed, dataset)
    k = cluster.shard_count
    if k > layout.flat_size:
        raise ValueError(
            f"{k} shards for {layout.flat_size} parameters: pass --shards {layout.flat_size} or fewer"
        )
    bounds = [shard(layout.flat_size, i, k) for i in range(k)]
    started = time.time()
    stack = contextlib.ExitStack()
    _connect(ray, cluster, config, stack)
    actors: list[Any] = []
    group = None
    try:
        # enable_task_events=False: a shard answers every node's every sync; recording each
        # call for Ray's dashboard cost 5-8% of a call's CPU (measured on 2,000 calls).
        shard_cls = ray.remote(_Shard).options(
            num_cpus=0, max_restarts=cluster.node_restarts, max_task_retries=-1, enable_task_events=False
        )  # fmt: skip
        shards = [shard_cls.remote(cluster.sync_rule, cluster.elastic_alpha) for _ in range(k)]
        actors += shards
        ray.get([s.seed.remote(init[lo:hi]) for s, (lo, hi) in zip(shards, bounds, strict=True)])
        agents = _start_agents(ray, spec, layout, init, dataset, config, cluster, bounds)
        group = agents.group
        actors += agents.actors
        result = _drive(ray, agents, shards, spec, layout, dataset, config, cluster, callback, started)
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if group is not None:
            ray.util.remove_placement_group(group)
        stack.close()  # Ray's shutdown, if this call started it
        # An agent that was killed leaves its segments; its pid is dead once Ray is gone.
        sweep_stale()
    _into_model(model, spec, layout, dataset, result)
    if config.out_dir:
        _write_run(result, config, cluster, dataset, spec, layout)
    warn_of(result, stacklevel=3 if _via_train else 2)
    return result


@dataclass
class _Agents:
    actors: list[Any]
    plans: list[_NodePlan]
    """What each agent's run() trains."""
    group: Any
    data: list[Any]
    """The nodes' data in the object store: held here for the whole run, so that a
    restarted agent can fetch it again."""


def _start_agents(
    ray: Any,
    spec: Any,
    layout: Layout,
    init: np.ndarray,
    dataset: Dataset,
    config: TrainConfig,
    cc: ClusterConfig,
    bounds: list[tuple[int, int]],
) -> _Agents:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .machine import usable_cores

    w = config.workers
    node_config = dataclasses.replace(
        config, out_dir="", progress=False, max_seconds=0.0, target_accuracy=None,
        target_train_accuracy=None, resume=None, checkpoint_every=0, checkpoint_seconds=0.0,
    )  # fmt: skip
    group = None
    options: list[dict[str, Any]] = [{} for _ in range(cc.nodes)]
    cores: list[tuple[int, ...] | None] = [None] * cc.nodes
    if cc.cluster == "local":
        mine = usable_cores()  # node i: cores i*w .. i*w+w-1 (wrapping round when short)
        cores = [tuple(mine[(i * w + j) % len(mine)] for j in range(w)) for i in range(cc.nodes)]
    else:  # one agent per machine
        group = ray.util.placement_group([{"CPU": w}] * cc.nodes, strategy="STRICT_SPREAD")
        try:
            ray.get(group.ready(), timeout=cc.connect_timeout)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise ValueError(
                f"the cluster has no {cc.nodes} machines with {w} free CPUs each; start more with "
                "`ray start --address HEAD:6379`, or lower --nodes / --workers"
            ) from None
        options = [
            {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
            for i in range(cc.nodes)
        ]
    agent_cls = ray.remote(_NodeAgent)
    actors = []
    plans = []
    refs = []
    for i, part in enumerate(_split(dataset, cc.nodes)):
        steps = 0
        if config.steps:
            steps = config.steps // cc.nodes + (i < config.steps % cc.nodes)
        budget = steps or config.epochs * sum(
            -(-(hi - lo) // config.batch_size)
            for lo, hi in (shard(len(part.x_train), r, w) for r in range(w))
        )
        cfg = dataclasses.replace(node_config, steps=steps, seed=config.seed + i * w)
        refs.append(ray.put(part))  # once: the agent reads it from the object store
        plans.append(_NodePlan(i, spec, layout, refs[-1], cfg, cc, bounds, init, budget, cores[i]))
        # max_concurrency: stop(), live() and pid() are answered while run() trains.
        # max_task_retries: run() is retried in the restarted agent, which pulls the
        # global values and trains on.
        actors.append(
            agent_cls.options(
                num_cpus=w,
                max_restarts=cc.node_restarts,
                max_task_retries=-1,
                max_concurrency=4,
                **options[i],
            ).remote()
        )
    return _Agents(actors, plans, group, refs)


def _drive(
    ray: Any,
    launched: _Agents,
    shards: list[Any],
    spec: Any,
    layout: Layout,
    dataset: Dataset,
    config: TrainConfig,
    cc: ClusterConfig,
    callback: Callable[[dict[str, Any]], bool | None] | None,
    started: float,
) -> ClusterResult:
    """Wait for the nodes; stop them on a criterion, Ctrl-C or SIGTERM; gather the result."""
    agents = launched.actors
    runs = [a.run.remote(plan, shards) for a, plan in zip(agents, launched.plans, strict=True)]
    reason: str | None = None
    evaluations: list[dict[str, Any]] = []
    t0: float | None = None
    """When this process first saw a node training: budgets and evaluations count from
    then, as on one machine (Ray's and the agents' start-up can take many seconds)."""
    last_eval = 0.0
    last_acc: float | None = None

    def global_values() -> np.ndarray:
        return np.concatenate(ray.get([s.get.remote() for s in shards])).astype(layout.dtype, copy=False)

    # The global values are scored as one machine scores its live parameters: by an
    # evaluator on a buffer that each evaluation fills (chunked, batch-norm ready).
    scored = launched.plans[0].init.copy()
    evaluator = Evaluator(spec, layout, scored, dataset, config.seed)

    def accuracy() -> float:
        scored[...] = global_values()
        return evaluator.accuracy(while_training=True)

    with _stop_signals() as heard:
        pending = list(runs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=DRIVER_POLL_SECONDS)
            if reason is not None or not pending:
                continue
            now = time.time()
            if t0 is None:
                if any(live["updates"] for live in ray.get([a.live.remote() for a in agents])):
                    t0 = last_eval = now
                reason = heard.get("reason")
                if reason is not None:
                    _stop_all(agents)
                continue
            if config.max_seconds and now - t0 >= config.max_seconds:
                reason = "time"
            if config.target_accuracy is not None and now - last_eval >= config.eval_every:
                last_eval = now
                last_acc = accuracy()
                evaluations.append({"t": round(now - t0, 4), "test_accuracy": last_acc})
                if last_acc >= config.target_accuracy:
                    reason = "target_accuracy"
            figures = {"elapsed": now - t0, "test_accuracy": last_acc, "agents": agents, "shards": shards}
            if callback is not None and callback(figures):
                reason = "callback"
            reason = heard.get("reason", reason)
            if reason is not None:
                _stop_all(agents)
        results: list[TrainResult] = ray.get(runs, timeout=STOP_TIMEOUT)
        reports = ray.get([a.report.remote() for a in agents], timeout=STOP_TIMEOUT)
    final = global_values()
    # As one machine scores its run: the accuracy, the metric and whether the model has
    # collapsed, from one pass over the test split.
    metric = resolve(config.target_metric, dataset.task, config.target_direction)
    scored[...] = final
    test_accuracy, test_metric, collapsed = evaluator.final(metric, launched.plans[0].init)
    rows = [row for r in results for row in r.workers]
    t_first, t_last = run_span(rows)
    nodes = []
    for i, (r, rep) in enumerate(zip(results, reports, strict=True)):
        nodes.append({"node": i, "updates": r.updates, "samples": r.samples,
                      "samples_per_second": r.samples_per_second, "train_seconds": r.train_seconds,
                      "worker_restarts": r.restarts, **rep})  # fmt: skip
    active = [row["loss"] for row in rows if row["steps"] > 0]
    return ClusterResult(
        params={k: v.copy() for k, v in layout.unflatten(final).items()},
        stop_reason=reason or ("steps" if config.steps else "epochs"),
        test_accuracy=test_accuracy,
        metric=metric.name,
        test_metric=test_metric,
        final_loss=float(np.mean(active)) if active else None,
        updates=sum(r.updates for r in results),
        samples=sum(r.samples for r in results),
        train_seconds=max(0.0, t_last - t_first),
        startup_seconds=t_first - started,
        workers=rows,
        evaluations=evaluations,
        restarts=sum(r.restarts for r in results),
        version=sum(r.version for r in results),
        nodes=nodes,
        cluster=dataclasses.asdict(cc),
        warnings=[COLLAPSED + (DOWNPOUR_HINT if cc.sync_rule == "downpour" else "")] if collapsed else [],
    )


def _stop_all(agents: list[Any]) -> None:
    for a in agents:
        with contextlib.suppress(Exception):  # an agent being restarted hears it on retry
            a.stop.remote()


@contextlib.contextmanager
def _stop_signals() -> Iterator[dict[str, str]]:
    """While the driver waits: Ctrl-C and SIGTERM stop the run (every node stops and
    reports). The handlers only take note: an exception raised inside Ray's wait would
    surface as a SystemError. Installed from the main thread only, where signals land."""
    heard: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield heard
        return

    def note(signum: int, frame: Any) -> None:
        heard.setdefault("reason", "terminated" if signum == signal.SIGTERM else "interrupted")

    old = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    if take_early_signal():  # a SIGTERM during start-up whose KeyboardInterrupt was lost
        note(signal.SIGTERM, None)
    try:
        yield heard
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _into_model(model: Any, spec: Any, layout: Layout, dataset: Dataset, result: TrainResult) -> None:
    """Copy the global values into the caller's model, as ``paramserver.train`` does."""
    from paramserver.workers.backends import backend_class

    result.model = backend_class(spec.backend).hand_back(model, spec, layout, result.params, dataset)


def _write_run(
    result: ClusterResult, config: TrainConfig, cc: ClusterConfig, dataset: Dataset, spec: Any, layout: Layout
) -> None:
    """``results.json`` and ``params.safetensors`` in a new run directory, as one machine writes them."""
    from .checkpoint import PARAMS_FILENAME, save_params
    from .machine import machine_info
    from .server import new_run_dir, write_json

    path = result.run_dir = new_run_dir(config.out_dir, f"cluster-n{cc.nodes}-w{config.workers}")
    doc = {
        "result": result.to_dict(),
        "config": config.to_dict(),
        "cluster": dataclasses.asdict(cc),
        "data": dataset.describe(),
        "model": {"backend": spec.backend, "parameters": layout.num_params, "tensors": len(layout),
                  "fingerprint": layout.fingerprint},
        "machine": machine_info(),
    }  # fmt: skip
    write_json(os.path.join(path, "results.json"), doc)
    save_params(os.path.join(path, PARAMS_FILENAME), result.params, {"fingerprint": layout.fingerprint})
