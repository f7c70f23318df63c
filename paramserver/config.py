"""Configuration: one base for what every job has, one typed dataclass per job.

:class:`RunConfig` holds the fields every run has (workers, policy, update rule
and its hyper-parameters, asynchrony controls, supervision, checkpoints,
placement, seed, output); :class:`TrainConfig` (supervised training) and
:class:`RLConfig` (reinforcement learning) add their own and restate a field
only where their default differs. Each field carries its help text in
``metadata["help"]``; ``cli.py`` turns the fields into options one-to-one
(``batch_size`` -> ``--batch-size``). Validation happens at construction, so a
bad value fails before any process or segment exists.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .asynchrony import ATTENUATIONS, LR_SCHEDULES, Attenuation, LRSchedule
from .data import TASKS
from .metrics import DIRECTIONS, METRIC_CHOICES
from .optim import RULES, UpdateRule, make_rule
from .policy import POLICIES

BACKENDS = ("torch", "tf", "numpy")
PIN_CHOICES = ("auto", "on", "off")
START_METHODS = ("auto", "spawn", "forkserver")
NONFINITE_CHOICES = ("skip", "stop")
_DEVICE = re.compile(r"/?(device:)?(cpu|gpu|tpu)(:\d+)?", re.IGNORECASE)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (and CLI choices)."""
    return field(default=default, metadata={"help": help, **kw})


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _finite(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _need(value is None or math.isfinite(value), f"{name} must be a finite number, got {value}")


@dataclass
class RunConfig:
    """What every run has: workers, policy, update rule, asynchrony, supervision, output."""

    workers: int = _f(2, "worker processes")
    policy: str = _f("po3", "locking policy", choices=POLICIES)
    k: int = _f(1, "po2: backward passes allowed at once (gradient slots)")
    stripes: int = _f(8, "striped: number of independently locked stripes")
    optimizer: str | None = _f("sgd", "update rule", choices=RULES)
    lr: float | None = _f(0.05, "learning rate")
    momentum: float = _f(0.9, "sgd: momentum (0 for plain SGD)")
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    weight_decay: float = _f(0.0, "L2 weight decay (decoupled for adamw)")
    beta1: float = _f(0.9, "adam/adamw: first-moment decay")
    beta2: float = _f(0.999, "adam/adamw: second-moment decay")
    eps: float = _f(1e-8, "adam/adamw/rmsprop: denominator epsilon")
    alpha: float = _f(0.99, "rmsprop: square-average decay")
    shared_state: bool = _f(True, "keep optimizer state in shared memory (A3C-style) rather than per worker")
    max_seconds: float = _f(0.0, "wall-time budget for training in seconds; 0 = none")
    lr_schedule: str = _f("constant", "learning rate over the global update count", choices=LR_SCHEDULES)
    lr_warmup: int = _f(0, "updates of linear learning-rate warm-up (0 = none)")
    lr_step: int = _f(1000, "step/exp schedules: updates per decay by lr_gamma")
    lr_gamma: float = _f(0.5, "step/exp schedules: decay factor")
    lr_min: float = _f(0.0, "cosine schedule: final learning rate")
    lr_total: int = _f(0, "cosine schedule: its length in updates (0 = --steps, or the epochs' updates)")
    attenuation: str | Callable[[int], float] = _f(
        "none",
        "damp stale updates: exp (gradient x base^staleness), inverse (lr / staleness)",
        choices=ATTENUATIONS,
    )
    attenuation_base: float = _f(0.9, "exp attenuation: base")
    stale_first: int = _f(0, "a worker this stale (in updates) applies its update first; 0 = off")
    max_restarts: int = _f(3, "restarts of dead or hung workers before the run is stopped")
    hang_timeout: float = _f(60.0, "seconds without a heartbeat before a worker counts as hung; 0 = never")
    on_nonfinite: str = _f(
        "skip", "a NaN/Inf loss or gradient: skip that step, or stop the run", choices=NONFINITE_CHOICES
    )
    checkpoint_every: int = _f(0, "write a checkpoint every this many updates (0 = only at the end)")
    checkpoint_seconds: float = _f(0.0, "write a checkpoint every this many seconds (0 = only at the end)")
    resume: str | None = _f(None, "continue from this checkpoint (written by a run, or its directory)")
    pin: str = _f(
        "auto",
        "pin each worker to cores of its own (auto: when workers x threads <= cores)",
        choices=PIN_CHOICES,
    )
    start_method: str = _f(
        "auto",
        "how workers start (auto: torch's from a forkserver that imported torch, the others spawned)",
        choices=START_METHODS,
    )
    nice: int = _f(0, "niceness for workers (0 = unchanged; negative needs privileges)")
    threads: int = _f(0, "threads per worker; 0 = usable cores // workers, at least 1")
    seed: int = _f(0, "random seed; worker r uses seed + r")
    out_dir: str = _f("runs", "directory for results; each run writes a new subdirectory ('' = none)")
    progress: bool = _f(True, "show a live progress line on stderr")
    tensorboard: str = _f(
        "", "write the live figures as TensorBoard scalars under this directory ('' = none)"
    )

    def __post_init__(self) -> None:
        need = _need
        _finite(self, "lr", "momentum", "weight_decay", "eps", "alpha", "beta1", "beta2", "max_seconds",
                "lr_gamma", "lr_min", "attenuation_base", "hang_timeout", "checkpoint_seconds")  # fmt: skip
        need(self.workers >= 1, f"workers must be at least 1, got {self.workers}")
        need(
            self.start_method in START_METHODS,
            f"start_method must be one of {', '.join(START_METHODS)}, got {self.start_method!r}",
        )
        need(self.policy in POLICIES, f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        need(
            self.optimizer in RULES,
            f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(RULES)}",
        )
        need(self.k >= 1, f"k (po2 gradient slots) must be at least 1, got {self.k}")
        need(self.stripes >= 1, f"stripes must be at least 1, got {self.stripes}")
        need(self.lr is not None and self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        need(not self.nesterov or self.momentum > 0, "nesterov needs momentum > 0 (e.g. --momentum 0.9)")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.eps > 0, f"eps must be positive, got {self.eps}")
        need(0 <= self.alpha < 1, f"alpha must be in [0, 1), got {self.alpha}")
        need(self.max_seconds >= 0, f"max_seconds must be >= 0 (0 = none), got {self.max_seconds}")
        need(self.stale_first >= 0, f"stale_first must be >= 0 (0 = off), got {self.stale_first}")
        need(self.max_restarts >= 0, f"max_restarts must be >= 0, got {self.max_restarts}")
        need(self.hang_timeout >= 0, f"hang_timeout must be >= 0 (0 = never), got {self.hang_timeout}")
        need(
            self.on_nonfinite in NONFINITE_CHOICES,
            f"on_nonfinite must be one of {', '.join(NONFINITE_CHOICES)}, got {self.on_nonfinite!r}",
        )
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.checkpoint_seconds >= 0, f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")
        need(
            not (self.checkpoint_every or self.checkpoint_seconds) or bool(self.out_dir),
            "checkpoints are written into the run's directory: set out_dir (--out-dir)",
        )
        need(
            self.resume is None or os.path.exists(self.resume),
            f"no checkpoint at {self.resume!r}; pass a checkpoint written by a run (or its directory)",
        )
        self.attenuation_rule()  # validates the attenuation options
        self.lr_schedule_for(max(1, self.lr_total or self.expected_updates() or 1))  # and the schedule's
        need(self.pin in PIN_CHOICES, f"pin must be one of {', '.join(PIN_CHOICES)}, got {self.pin!r}")
        need(-20 <= self.nice <= 19, f"nice must be in [-20, 19], got {self.nice}")
        need(self.threads >= 0, f"threads must be >= 0 (0 = auto), got {self.threads}")

    def expected_updates(self) -> int:
        """The run's length in updates where the config alone says it (0: unknown)."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("attenuation", "target_metric"):
            value = getattr(self, name, None)
            if callable(value):  # a user's function: recorded by name
                d[name] = getattr(value, "__qualname__", repr(value))
        return d

    def attenuation_rule(self) -> Attenuation:
        return Attenuation(self.attenuation, self.attenuation_base)

    def lr_schedule_for(self, total_updates: int) -> LRSchedule:
        """The learning-rate schedule; ``total_updates`` is the run's expected length
        (used by ``cosine`` when ``lr_total`` is not given)."""
        assert self.lr is not None, "a job fills in its default learning rate"
        return LRSchedule(
            self.lr, self.lr_schedule, warmup=self.lr_warmup, step=self.lr_step,
            gamma=self.lr_gamma, lr_min=self.lr_min, total=self.lr_total or total_updates,
        )  # fmt: skip

    def update_rule(self) -> UpdateRule:
        """The update rule these options describe."""
        assert self.optimizer is not None, "a job fills in its default optimizer"
        return make_rule(
            self.optimizer, momentum=self.momentum, nesterov=self.nesterov,
            weight_decay=self.weight_decay, betas=(self.beta1, self.beta2), eps=self.eps, alpha=self.alpha,
        )  # fmt: skip

    def threads_per_worker(self, cores: int) -> int:
        """Threads each worker runs: ``threads``, or the usable cores shared out."""
        return self.threads or max(1, cores // self.workers)

    def pins(self, cores: int) -> bool:
        """Whether workers are pinned to cores of their own: one rule for every job."""
        threads = self.threads_per_worker(cores)
        return self.pin == "on" or (self.pin == "auto" and self.workers * threads <= cores)


SYNC_RULES = ("downpour", "easgd")


def cluster_address(cluster: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``; None if it is neither."""
    rest = cluster.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


@dataclass
class ClusterConfig:
    """Where and how the nodes of a multi-machine run train and sync (the rest of a
    TrainConfig says how each node trains). ``cluster=""``: one machine, none of this."""

    cluster: str = _f(
        "",
        "'' = one machine; 'local' = --nodes simulated here; 'auto', HOST:PORT or ray://HOST:PORT joins Ray",
    )
    nodes: int = _f(2, "node agents, one per machine, each with --workers workers")
    shards: int = _f(0, "global parameter shards (Ray actors); 0 = one per node")
    sync_every: int = _f(10, "a node syncs with the shards every this many of its updates")
    sync_seconds: float = _f(0.0, "also sync when this many seconds passed since the last sync; 0 = off")
    sync_rule: str = _f(
        "downpour", "downpour: global += node delta; easgd: elastic averaging", choices=SYNC_RULES
    )
    elastic_alpha: float = _f(0.1, "easgd: node and centre each move alpha of their gap per sync")
    node_restarts: int = _f(3, "Ray restarts of a node agent or shard actor that died")
    connect_timeout: float = _f(10.0, "seconds to reach a running cluster before giving up")

    def __post_init__(self) -> None:
        self.check_cluster()
        parent = getattr(super(), "__post_init__", None)  # RunConfig's, in a TrainConfig
        if parent is not None:
            parent()

    def check_cluster(self) -> None:
        need = _need
        _finite(self, "sync_seconds", "elastic_alpha", "connect_timeout")
        need(
            self.cluster in ("", "local", "auto") or cluster_address(self.cluster) is not None,
            f"cluster must be '', 'local', 'auto', HOST:PORT or ray://HOST:PORT, got {self.cluster!r}",
        )
        need(self.nodes >= 1, f"nodes must be at least 1 (--nodes 2), got {self.nodes}")
        need(self.shards >= 0, f"shards must be >= 0 (0 = one per node), got {self.shards}")
        need(
            self.sync_every >= 1,
            f"sync_every must be at least 1 (1 = after every update), got {self.sync_every}",
        )
        need(self.sync_seconds >= 0, f"sync_seconds must be >= 0 (0 = off), got {self.sync_seconds}")
        need(
            self.sync_rule in SYNC_RULES,
            f"unknown sync_rule {self.sync_rule!r}; choose one of {', '.join(SYNC_RULES)}",
        )
        need(
            0 < self.elastic_alpha < 1, f"elastic_alpha must be in (0, 1), e.g. 0.1; got {self.elastic_alpha}"
        )
        need(self.node_restarts >= 0, f"node_restarts must be >= 0, got {self.node_restarts}")
        need(self.connect_timeout > 0, f"connect_timeout must be positive, got {self.connect_timeout}")

    @property
    def shard_count(self) -> int:
        return self.shards or self.nodes

    def cluster_options(self) -> ClusterConfig:
        """Just these fields (of a TrainConfig, say)."""
        return ClusterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ClusterConfig)})


@dataclass
class TrainConfig(ClusterConfig, RunConfig):
    """How to train: workers, policy, update rule, budget, placement, output."""

    batch_size: int = _f(32, "samples per step per worker")
    epochs: int = _f(20, "passes over the training set (each worker passes over its shard)")
    steps: int = _f(0, "total updates across workers; 0 = no limit (epochs decide)")
    target_loss: float | None = _f(None, "stop when the workers' mean batch loss is at most this")
    target_accuracy: float | None = _f(
        None, "stop when test accuracy (checked every --eval-every seconds) reaches this"
    )
    target_train_accuracy: float | None = _f(
        None, "stop when accuracy on (up to 2048 samples of) the training split reaches this"
    )
    task: str = _f(
        "auto",
        "what the targets are: class labels, float targets, none (auto: from the data)",
        choices=("auto", "classify", "regress", "unsupervised"),
    )
    target_metric: str | Callable[..., float] = _f(
        "auto",
        "the metric evaluated on the test split, and stopped on with --target "
        "(auto: accuracy for classification, the test loss otherwise; "
        "or a callable metric(outputs, targets))",
        choices=METRIC_CHOICES,
    )
    target: float | None = _f(None, "stop when the metric (checked every --eval-every seconds) reaches this")
    target_direction: str = _f(
        "auto",
        "whether --target is reached from below or above (auto: the named metric's)",
        choices=DIRECTIONS,
    )
    eval_every: float = _f(1.0, "seconds between evaluations for the accuracy and metric targets")
    eval_every_updates: int = _f(0, "evaluate every this many updates instead of every --eval-every s")
    devices: str = _f(
        "", "tf: comma-separated devices, worker r runs on the (r mod count)-th (e.g. /GPU:0,/GPU:1)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # the cluster's fields, then RunConfig's
        need = _need
        _finite(self, "target_loss", "eval_every", "target")
        need(
            self.task in ("auto", *TASKS),
            f"task must be one of auto, {', '.join(TASKS)}, got {self.task!r}",
        )
        need(
            callable(self.target_metric) or self.target_metric in METRIC_CHOICES,
            f"unknown target_metric {self.target_metric!r}; choose one of {', '.join(METRIC_CHOICES)}, "
            "or pass a callable metric(outputs, targets)",
        )
        need(
            self.target_direction in DIRECTIONS,
            f"target_direction must be one of {', '.join(DIRECTIONS)}, got {self.target_direction!r}",
        )
        need(
            not (
                self.target is not None and callable(self.target_metric) and self.target_direction == "auto"
            ),
            "a callable target_metric has no known direction: set target_direction 'above' "
            "(higher is better) or 'below'",
        )
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        need(self.steps >= 0, f"steps must be >= 0 (0 = no limit), got {self.steps}")
        need(
            self.target_accuracy is None or 0 < self.target_accuracy <= 1,
            f"target_accuracy is a fraction in (0, 1], got {self.target_accuracy}",
        )
        need(self.eval_every > 0, f"eval_every must be positive, got {self.eval_every}")
        need(
            self.target_train_accuracy is None or 0 < self.target_train_accuracy <= 1,
            f"target_train_accuracy is a fraction in (0, 1], got {self.target_train_accuracy}",
        )
        need(self.eval_every_updates >= 0, f"eval_every_updates must be >= 0, got {self.eval_every_updates}")
        bad = [d for d in self.device_list if not _DEVICE.fullmatch(d)]
        need(not bad, f"devices must be TensorFlow device names such as /CPU:0 or /GPU:1, got {bad}")

    def expected_updates(self) -> int:
        return self.steps

    @property
    def device_list(self) -> list[str]:
        return [d.strip() for d in self.devices.split(",") if d.strip()]

    def device_of(self, rank: int) -> str | None:
        """The device of worker ``rank`` (None: the framework's default)."""
        devices = self.device_list
        return devices[rank % len(devices)] if devices else None


ALGOS = ("a3c", "dqn")
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "a3c": {"optimizer": "rmsprop", "lr": 7e-4, "hidden": 64, "max_grad_norm": 0.5, "n_steps": 8},
    "dqn": {"optimizer": "adam", "lr": 1e-3, "hidden": 128, "max_grad_norm": 10.0, "n_steps": 5},
}
"""Defaults that differ by algorithm (a field left at None takes the algorithm's)."""


@dataclass
class RLConfig(RunConfig):
    """How to train an agent: algorithm, environment, workers, update rule, budget, output.

    RL restates the fields whose defaults differ from training's: the update rule
    and learning rate come from the algorithm (:data:`ALGO_DEFAULTS`), ``eps`` is
    1e-5, momentum 0, and a worker runs one thread (small networks run fastest on one)."""

    optimizer: str | None = _f(None, "update rule; default rmsprop for a3c, adam for dqn", choices=RULES)
    lr: float | None = _f(None, "learning rate; default 7e-4 for a3c, 1e-3 for dqn")
    momentum: float = _f(0.0, "sgd: momentum")
    eps: float = _f(1e-5, "adam/rmsprop: denominator epsilon")
    threads: int = _f(1, "torch threads per worker (small networks run fastest on one); 0 = cores // workers")
    algo: str = _f(
        "a3c", "algorithm: a3c (actor-critic, n-step returns) or dqn (replay pools)", choices=ALGOS
    )
    env: str = _f("CartPole-v1", "gymnasium environment id (discrete actions, vector observations)")
    envs_per_worker: int = _f(4, "environments each worker steps in lockstep (one batched forward pass)")
    gamma: float = _f(0.99, "discount factor")
    hidden: int | None = _f(None, "hidden units per layer; default 64 for a3c, 128 for dqn")
    max_grad_norm: float | None = _f(
        None, "clip each gradient to this L2 norm; default 0.5 a3c, 10 dqn; 0 = off"
    )
    n_steps: int | None = _f(
        None, "n-step returns: a3c's rollout length per environment (default 8), dqn's multi-step target (5)"
    )
    entropy_coef: float = _f(
        0.001, "a3c: weight of the entropy bonus (larger explores more; CartPole needs little)"
    )
    value_coef: float = _f(0.5, "a3c: weight of the value loss")
    pool_size: int = _f(50_000, "dqn: transitions in each worker's replay pool")
    batch_size: int = _f(64, "dqn: transitions per update, sampled from the worker's own pool")
    learning_starts: int = _f(1_000, "dqn: transitions a worker collects before its first update")
    train_every: int = _f(1, "dqn: environment steps (of all its envs) between a worker's updates")
    update_steps: int = _f(
        100,
        "dqn: a worker refreshes its target network from the shared params every this many of its updates",
    )
    eps_start: float = _f(1.0, "dqn: initial exploration rate (epsilon-greedy)")
    eps_end: float = _f(0.02, "dqn: final exploration rate")
    eps_decay_steps: int = _f(10_000, "dqn: environment steps per worker over which epsilon decays linearly")
    double_dqn: bool = _f(True, "dqn: pick the next action with the online network (double DQN)")
    target_return: float | None = _f(
        None,
        "stop when the mean return of the last `window` episodes reaches this; default: reward_threshold",
    )
    window: int = _f(100, "episodes (all workers together) in the mean return the target is checked on")
    max_steps: int = _f(0, "environment steps across workers; 0 = no limit")
    eval_episodes: int = _f(100, "episodes --evaluate runs (greedy actions)")
    start_method: str = _f(
        "spawn",
        "how workers start (RL workers are spawned by default; forkserver: from one that imported torch)",
        choices=START_METHODS,
    )

    def __post_init__(self) -> None:
        need = _need
        need(self.algo in ALGOS, f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGOS)}")
        # The algorithm's defaults, filled in once so that every process sees the same values.
        for name, value in ALGO_DEFAULTS[self.algo].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()
        _finite(self, "gamma", "max_grad_norm", "entropy_coef", "value_coef", "eps_start", "eps_end",
                "target_return")  # fmt: skip
        need(isinstance(self.env, str) and bool(self.env), "env must be a gymnasium id such as 'CartPole-v1'")
        need(self.envs_per_worker >= 1, f"envs_per_worker must be at least 1, got {self.envs_per_worker}")
        need(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        need(self.hidden is not None and self.hidden >= 1, f"hidden must be at least 1, got {self.hidden}")
        need(
            self.max_grad_norm is not None and self.max_grad_norm >= 0,
            f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}",
        )
        need(
            self.n_steps is not None and self.n_steps >= 1, f"n_steps must be at least 1, got {self.n_steps}"
        )
        need(self.entropy_coef >= 0 and self.value_coef >= 0, "entropy_coef and value_coef must be >= 0")
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(
            self.pool_size >= self.batch_size,
            f"pool_size ({self.pool_size}) must hold at least one batch ({self.batch_size})",
        )
        need(self.learning_starts >= 0, f"learning_starts must be >= 0, got {self.learning_starts}")
        need(self.train_every >= 1, f"train_every must be at least 1, got {self.train_every}")
        need(self.update_steps >= 1, f"update_steps must be at least 1, got {self.update_steps}")
        need(
            0 <= self.eps_end <= self.eps_start <= 1,
            f"exploration needs 0 <= eps_end <= eps_start <= 1, got {self.eps_end} and {self.eps_start}",
        )
        need(self.eps_decay_steps >= 0, f"eps_decay_steps must be >= 0, got {self.eps_decay_steps}")
        need(self.window >= 1, f"window must be at least 1, got {self.window}")
        need(self.max_steps >= 0, f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}")
        need(self.eval_episodes >= 1, f"eval_episodes must be at least 1, got {self.eval_episodes}")

    @property
    def learning_rate(self) -> float:
        assert self.lr is not None
        return self.lr


@dataclass
class TrainJob(TrainConfig):
    """A training job from the command line: what to train on what, then how."""

    backend: str = _f("torch", "framework computing the gradients", choices=BACKENDS)
    model: str = _f(
        "mlp",
        "model from paramserver.models "
        "(torch: mlp, cnn, embedding; tf: mlp, cnn; numpy: mlp, softmax, linear, mf)",
    )
    hidden: int = _f(64, "hidden units per layer for mlp models")
    data: str = _f(
        "digits",
        "'digits' (scikit-learn's bundled 8x8 digits), a .npz path with x (and y), "
        "or a .npy of inputs (memory-mapped, never copied)",
    )
    targets: str = _f("", "with a .npy --data: the .npy of its targets (none: unsupervised)")
    test_fraction: float = _f(0.2, "held-out fraction for the test split (when the data has none)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be at least 1, got {self.hidden}")
