"""Reinforcement learning on gymnasium: A3C-style actor-critic and parallel DQN.

    paramserver rl --algo a3c --env CartPole-v1 --workers 2
    paramserver rl --evaluate runs/<run>/policy.pt

    import paramserver.rl as rl
    result = rl.train_rl(rl.RLConfig(algo="a3c", workers=2), callback=print)

The agent's parameters (and, by default, the optimizer state: the A3C paper's
shared RMSProp) live in one :class:`~paramserver.store.ParamStore`, updated
under the same policies and update rules as supervised training. Each worker
owns its environments, its rollouts and (DQN) its replay pool; nothing but
parameters is shared. Every finished episode goes into the worker's ring in a
second segment (return, length, time); the server reads the rings without a
lock a few times a second, logs every episode, and stops the run when the mean
return of the last 100 episodes (all workers together) reaches the target.

The processes live as in supervised training (:mod:`paramserver.supervise`):
workers die with the server, SIGTERM stops a run like Ctrl-C, and a worker that
dies or hangs is restarted with the same rank up to ``max_restarts`` times. A
restarted worker keeps its counters (steps, updates, episodes) and the shared
parameters and optimizer state, but starts new environments (its episodes in
progress are lost) and, for DQN, an empty replay pool and a target network
copied from the shared parameters: it collects ``learning_starts`` transitions
again before its next update. Epsilon continues from its step count.

Nothing here imports torch or gymnasium before a run starts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import multiprocessing as mp
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import Layout
from .machine import machine_info, usable_cores
from .optim import RULES, UpdateRule, make_rule
from .policy import POLICIES, make_policy
from .progress import BARS, Progress
from .store import COUNTER, STATUS, ParamStore, Segment, sweep_stale
from .supervise import Supervisor, Terminated, run_span

ALGOS = ("a3c", "dqn")
PIN_CHOICES = ("auto", "on", "off")
POLL_SECONDS = 0.1
EPISODE_FIELDS = ("return", "length", "time")
"""One row of a worker's episode ring: return, length in steps, time.time() at its end."""
RING = 4096
"""Episodes each worker's ring holds: the server reads them at 10 Hz, so it only misses
episodes if one worker finishes more than 40,000 a second."""

EnvFactory = Callable[[], Any]


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


# Defaults that differ by algorithm (a field left at None takes the algorithm's).
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "a3c": {"optimizer": "rmsprop", "lr": 7e-4, "hidden": 64, "max_grad_norm": 0.5, "n_steps": 8},
    "dqn": {"optimizer": "adam", "lr": 1e-3, "hidden": 128, "max_grad_norm": 10.0, "n_steps": 5},
}


@dataclass
class RLConfig:
    """How to train an agent: algorithm, environment, workers, update rule, budget, output."""

    algo: str = _f(
        "a3c", "algorithm: a3c (actor-critic, n-step returns) or dqn (replay pools)", choices=ALGOS
    )
    env: str = _f("CartPole-v1", "gymnasium environment id (discrete actions, vector observations)")
    workers: int = _f(2, "worker processes, each with its own environments")
    envs_per_worker: int = _f(4, "environments each worker steps in lockstep (one batched forward pass)")
    policy: str = _f("po3", "locking policy for updates of the shared parameters", choices=POLICIES)
    k: int = _f(1, "po2: backward passes allowed at once")
    stripes: int = _f(8, "striped: number of independently locked stripes")
    optimizer: str | None = _f(None, "update rule; default rmsprop for a3c, adam for dqn", choices=RULES)
    lr: float | None = _f(None, "learning rate; default 7e-4 for a3c, 1e-3 for dqn")
    alpha: float = _f(0.99, "rmsprop: square-average decay")
    eps: float = _f(1e-5, "adam/rmsprop: denominator epsilon")
    beta1: float = _f(0.9, "adam: first-moment decay")
    beta2: float = _f(0.999, "adam: second-moment decay")
    shared_state: bool = _f(True, "keep optimizer state in shared memory (A3C's shared RMSProp)")
    gamma: float = _f(0.99, "discount factor")
    hidden: int | None = _f(None, "hidden units per layer; default 64 for a3c, 128 for dqn")
    max_grad_norm: float | None = _f(
        None, "clip each gradient to this L2 norm; default 0.5 a3c, 10 dqn; 0 = off"
    )
    n_steps: int | None = _f(
        None,
        "n-step returns: a3c's rollout length per environment (default 8), dqn's multi-step target (5)",
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
    max_seconds: float = _f(0.0, "wall-time budget for training in seconds; 0 = none")
    pin: str = _f("auto", "pin each worker to a core (auto: when workers <= cores)", choices=PIN_CHOICES)
    nice: int = _f(0, "niceness for workers (0 = unchanged)")
    threads: int = _f(1, "torch threads per worker (small networks run fastest on one)")
    seed: int = _f(0, "random seed; worker r uses seed + r (its environments, torch, numpy)")
    max_restarts: int = _f(3, "restarts of dead or hung workers before the run is stopped")
    hang_timeout: float = _f(60.0, "seconds without a step before a worker counts as hung; 0 = never")
    eval_episodes: int = _f(100, "episodes --evaluate runs (greedy actions)")
    out_dir: str = _f("runs", "directory for results; each run writes a new subdirectory ('' = none)")
    progress: bool = _f(True, "show a live progress line on stderr")

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.algo in ALGOS, f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGOS)}")
        need(isinstance(self.env, str) and bool(self.env), "env must be a gymnasium id such as 'CartPole-v1'")
        need(self.workers >= 1, f"workers must be at least 1, got {self.workers}")
        need(self.envs_per_worker >= 1, f"envs_per_worker must be at least 1, got {self.envs_per_worker}")
        need(self.policy in POLICIES, f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        need(self.k >= 1 and self.stripes >= 1, "k and stripes must be at least 1")
        need(
            self.optimizer is None or self.optimizer in RULES,
            f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(RULES)}",
        )
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.alpha < 1, f"alpha must be in [0, 1), got {self.alpha}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.eps > 0, f"eps must be positive, got {self.eps}")
        need(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        need(self.hidden is None or self.hidden >= 1, f"hidden must be at least 1, got {self.hidden}")
        need(
            self.max_grad_norm is None or self.max_grad_norm >= 0,
            f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}",
        )
        need(self.n_steps is None or self.n_steps >= 1, f"n_steps must be at least 1, got {self.n_steps}")
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
        need(self.max_seconds >= 0, f"max_seconds must be >= 0 (0 = none), got {self.max_seconds}")
        need(self.pin in PIN_CHOICES, f"pin must be one of {', '.join(PIN_CHOICES)}, got {self.pin!r}")
        need(-20 <= self.nice <= 19, f"nice must be in [-20, 19], got {self.nice}")
        need(self.threads >= 1, f"threads must be at least 1, got {self.threads}")
        need(self.eval_episodes >= 1, f"eval_episodes must be at least 1, got {self.eval_episodes}")
        need(self.max_restarts >= 0, f"max_restarts must be >= 0, got {self.max_restarts}")
        need(self.hang_timeout >= 0, f"hang_timeout must be >= 0 (0 = never), got {self.hang_timeout}")
        # The algorithm's defaults, filled in once so that every process sees the same values.
        for name, value in ALGO_DEFAULTS[self.algo].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update_rule(self) -> UpdateRule:
        assert self.optimizer is not None
        return make_rule(self.optimizer, betas=(self.beta1, self.beta2), eps=self.eps, alpha=self.alpha)

    @property
    def learning_rate(self) -> float:
        assert self.lr is not None
        return self.lr


# -- environments ------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvInfo:
    """What the server learns from one instance of the environment."""

    name: str
    obs_dim: int
    n_actions: int
    reward_threshold: float | None


def make_env(env: str | EnvFactory) -> Any:
    """An environment from a gymnasium id or a factory; unknown ids are a ValueError."""
    if callable(env):
        return env()
    import gymnasium as gym

    try:
        return gym.make(env)
    except gym.error.Error as e:
        raise ValueError(
            f"unknown environment {env!r} ({e}); give a registered gymnasium id such as "
            "'CartPole-v1' (gymnasium.pprint_registry() lists them) or pass a factory"
        ) from None


def inspect_env(env: str | EnvFactory, algo: str) -> EnvInfo:
    """Check that ``algo`` can learn on ``env`` and return its sizes; ValueError naming the fix."""
    import gymnasium as gym

    e = make_env(env)
    try:
        name = env if isinstance(env, str) else getattr(e.spec, "id", None) or getattr(env, "__name__", "env")
        for method in ("reset", "step"):
            if not callable(getattr(e, method, None)):
                raise ValueError(f"environment {name!r} has no {method}(): it needs the gymnasium API")
        act, obs = e.action_space, e.observation_space
        if not isinstance(act, gym.spaces.Discrete):
            raise ValueError(
                f"environment {name!r} has action space {act}: {algo} here needs a Discrete one "
                "(e.g. CartPole-v1, Acrobot-v1, LunarLander-v3); wrap a continuous environment "
                "with a discretising ActionWrapper first"
            )
        if not isinstance(obs, gym.spaces.Box):
            raise ValueError(
                f"environment {name!r} has observation space {obs}: the networks here need a Box "
                "(a vector of numbers); wrap it with gymnasium.wrappers.FlattenObservation"
            )
        spec = getattr(e, "spec", None)
        threshold = getattr(spec, "reward_threshold", None)
        return EnvInfo(str(name), int(np.prod(obs.shape)), int(act.n), threshold)
    finally:
        e.close()


def episode_layout(workers: int) -> Layout:
    """The episode segment: one ring of :data:`RING` episodes per worker and its count.

    Each worker writes only its own ring, the row first and the count after, so
    the server reads every row below the count without a lock (x86 keeps stores
    in order)."""
    return Layout.pack({
        "ring": ((workers, RING, len(EPISODE_FIELDS)), np.float64),
        "count": ((workers,), np.int64),
    })  # fmt: skip


# -- results -------------------------------------------------------------------------------


@dataclass
class RLResult:
    """What a run produced. ``mean_return`` is over the last ``window`` episodes."""

    algo: str
    env: str
    stop_reason: str
    target_return: float | None
    solved: bool
    mean_return: float | None
    best_mean_return: float | None
    episodes: int
    env_steps: int
    updates: int
    train_seconds: float
    startup_seconds: float
    seconds_to_target: float | None
    steps_to_target: int | None
    window: int = 100
    missed_episodes: int = 0
    restarts: int = 0
    """Workers restarted after a crash or a hang."""
    workers: list[dict[str, float]] = field(default_factory=list)
    run_dir: str | None = None
    policy_path: str | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    curve: list[tuple[float, float]] = field(default_factory=list, repr=False)
    """(seconds since the first step, mean return of the last ``window`` episodes), per episode."""

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.train_seconds if self.train_seconds > 0 else 0.0

    def summary(self) -> str:
        mean = "n/a" if self.mean_return is None else f"{self.mean_return:.1f}"
        target = (
            ""
            if self.target_return is None
            else f" (target {self.target_return:g}: {'solved' if self.solved else 'not reached'})"
        )
        out = (
            f"{self.algo} on {self.env}: stopped by {self.stop_reason}; mean return {mean} over the "
            f"last {self.window} episodes{target}; {self.episodes} episodes, {self.env_steps} steps, "
            f"{self.updates} updates in {self.train_seconds:.1f} s ({self.steps_per_second:,.0f} steps/s; "
            f"start-up {self.startup_seconds:.1f} s)"
        )
        if self.restarts:
            out += f"; {self.restarts} worker restart(s)"
        if self.run_dir:
            out += f"\nresults written to {self.run_dir}"
        return out

    def to_dict(self) -> dict[str, Any]:
        skip = {"params", "curve"}
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        doc["steps_per_second"] = self.steps_per_second
        return doc


# -- the server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where and how one worker runs, decided by the server."""

    cores: tuple[int, ...] | None
    threads: int
    max_steps: int
    """Environment steps this worker takes at most (0 = no limit)."""
    parent_pid: int
    life: int = 0
    """0 for the first start, n for the n-th restart (a restart does not wait for the others)."""


class RLServer(Supervisor):
    """Owns the parameter and episode segments and the worker processes of one RL run.

    A context manager: segments and processes are released on exit, whatever happened::

        with RLServer(config) as server:
            result = server.run()
    """

    config: RLConfig
    _episodes: Segment | None = None

    def __init__(
        self,
        config: RLConfig,
        *,
        env: str | EnvFactory | None = None,
        callback: Callable[[dict[str, Any]], bool | None] | None = None,
    ):
        super().__init__(config)
        self.env = env if env is not None else config.env
        if not isinstance(self.env, str):
            if not callable(self.env):
                raise TypeError(f"env must be a gymnasium id or a factory, got {type(self.env).__name__}")
            try:
                pickle.dumps(self.env)
            except Exception as e:
                raise TypeError(
                    f"the environment factory could not be pickled for the worker processes ({e}); "
                    "define it at module level (and guard the script with if __name__ == '__main__')"
                ) from None
        self.info = inspect_env(self.env, config.algo)
        self.target = config.target_return if config.target_return is not None else self.info.reward_threshold
        if self.target is None and not (config.max_steps or config.max_seconds):
            raise ValueError(
                f"environment {self.info.name!r} has no reward_threshold: give --target-return, "
                "--max-steps or --max-seconds, or the run would never stop"
            )
        self.callback = callback
        self.run_dir: str | None = None
        self._started = 0.0
        self.model: Any = None
        self.layout: Layout | None = None

    @property
    def episodes(self) -> Segment:
        assert self._episodes is not None, "server not started"
        return self._episodes

    def model_args(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "algo": cfg.algo,
            "obs_dim": self.info.obs_dim,
            "n_actions": self.info.n_actions,
            "hidden": cfg.hidden,
        }

    def start(self) -> None:
        import torch

        from paramserver.models.rl_models import build
        from paramserver.workers.rl_worker import rl_worker_main

        cfg = self.config
        self._started = time.time()
        sweep_stale()
        with torch.random.fork_rng():  # the initial parameters, without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.model = build(**self.model_args())
        self.layout = layout = Layout.from_torch(self.model)
        rule = cfg.update_rule()
        self._store = self._own(ParamStore.create_for(
            layout, workers=cfg.workers, state_slots=rule.state_slots if cfg.shared_state else 0,
            meta={"config": cfg.to_dict(), "server_pid": os.getpid(), "backend": "torch", "job": "rl"},
        ))  # fmt: skip
        self.store.params[...] = layout.flatten(
            {n: p.detach().numpy() for n, p in self.model.named_parameters()}
        )
        self._episodes = self._own(Segment.create(episode_layout(cfg.workers), {"kind": "episodes"}))

        # spawn, not fork: an OpenMP pool in this process (torch is imported) can hang
        # forked children. A context, not set_start_method().
        ctx = mp.get_context("spawn")
        # Kept for the whole run: a lock's name goes when its creator is collected.
        self.policy = make_policy(cfg.policy, layout.flat_size, ctx, k=cfg.k, stripes=cfg.stripes)
        self.start_barrier = ctx.Barrier(cfg.workers)
        cores = usable_cores()
        pin = cfg.pin == "on" or (cfg.pin == "auto" and cfg.workers * cfg.threads <= len(cores))
        model_args = self.model_args()

        def launch(rank: int, life: int) -> mp.process.BaseProcess:
            steps = 0
            if cfg.max_steps:
                steps = max(1, cfg.max_steps // cfg.workers + (rank < cfg.max_steps % cfg.workers))
            mine = tuple(cores[(rank * cfg.threads + i) % len(cores)] for i in range(cfg.threads))
            placement = Placement(mine if pin else None, cfg.threads, steps, os.getpid(), life)
            args = (rank, self.store, self.episodes, self.policy, self.start_barrier, cfg, self.env,
                    model_args, placement)  # fmt: skip
            return self._spawn(ctx, rl_worker_main, args, name=f"paramserver-rl-worker-{rank}",
                               threads=cfg.threads)  # fmt: skip

        self._start_workers(launch)

    def close(self) -> None:
        """Stop and join every worker, then unlink the segments. Safe to call twice."""
        super().close()
        self._episodes = None

    def run(self) -> RLResult:
        """Watch the workers until a stop criterion holds; save the policy; return the result.

        From the main thread it also handles SIGTERM: the run stops like Ctrl-C,
        and the results and the policy are written."""
        with self._signals():
            return self._run()

    def _run(self) -> RLResult:
        cfg = self.config
        store = self.store
        ring, count = self.episodes["ring"], self.episodes["count"]
        seen = np.zeros(cfg.workers, dtype=np.int64)
        missed = 0
        recent: collections.deque[float] = collections.deque(maxlen=cfg.window)
        curve: list[tuple[float, float]] = []
        best: float | None = None
        at_target: tuple[float, int] | None = None
        episodes_total = 0
        if cfg.out_dir:
            self.run_dir = _new_run_dir(cfg.out_dir, cfg)
        log = open(os.path.join(self.run_dir, "episodes.jsonl"), "w", buffering=1) if self.run_dir else None  # noqa: SIM115
        progress = _RLProgress(enabled=cfg.progress, total_samples=cfg.max_steps)
        counters = store.counters
        t0: float | None = None
        reason = "steps"
        try:
            while True:
                time.sleep(POLL_SECONDS)
                self._supervise()
                if t0 is None:
                    started = counters[:, COUNTER["started"]]
                    if not started.any():
                        continue  # still starting
                    t0 = float(started[started > 0].min())
                rows = counters.copy()
                # New episodes of every worker, in the order they ended.
                new = []
                for w in range(cfg.workers):
                    n = int(count[w])
                    first = max(int(seen[w]), n - RING)
                    missed += first - int(seen[w])
                    for i in range(first, n):
                        ret, length, t_end = ring[w, i % RING]
                        new.append((t_end, w, i, float(ret), int(length)))
                    seen[w] = n
                new.sort()
                stop = False
                for t_end, w, i, ret, length in new:
                    episodes_total += 1
                    recent.append(ret)
                    mean = float(np.mean(recent))
                    elapsed_ep = t_end - t0
                    full = len(recent) == cfg.window
                    if full:
                        best = mean if best is None else max(best, mean)
                    curve.append((elapsed_ep, mean))
                    doc = {"worker": w, "episode": i, "return": ret, "length": length,
                           "time": round(elapsed_ep, 4), "wall_time": round(t_end, 4),
                           "mean_return": round(mean, 3)}  # fmt: skip
                    if log is not None:
                        log.write(json.dumps(doc) + "\n")
                    if self.callback is not None and self.callback({**doc, "episodes": episodes_total}):
                        reason, stop = "callback", True
                    if self.target is not None and full and mean >= self.target and at_target is None:
                        steps_now = int(rows[:, COUNTER["samples"]].sum())
                        at_target = (elapsed_ep, steps_now)
                        reason, stop = "target", True
                    if stop:
                        break
                now = time.time()
                progress.episodes, progress.mean = (
                    episodes_total,
                    (float(np.mean(recent)) if recent else None),
                )
                progress.update(now - t0, rows, None)
                if stop:
                    break
                if np.all(rows[:, COUNTER["status"]] == STATUS["done"]):
                    reason = "steps"
                    break
                if cfg.max_seconds and now - t0 >= cfg.max_seconds:
                    reason = "time"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
        except Terminated:
            reason = "terminated"
        finally:
            store.request_stop()
            progress.close()
            if log is not None:
                log.close()
        self._join_workers()
        rows_d = self.worker_rows()
        t_first, t_last = run_span(rows_d)
        assert self.layout is not None
        params = {k: v.copy() for k, v in self.layout.unflatten(store.params).items()}
        result = RLResult(
            algo=cfg.algo, env=self.info.name, stop_reason=reason, target_return=self.target,
            solved=at_target is not None, mean_return=float(np.mean(recent)) if recent else None,
            best_mean_return=best, episodes=episodes_total,
            env_steps=int(sum(r["samples"] for r in rows_d)), updates=int(sum(r["steps"] for r in rows_d)),
            train_seconds=max(0.0, t_last - t_first), startup_seconds=t_first - self._started,
            seconds_to_target=at_target[0] if at_target else None,
            steps_to_target=at_target[1] if at_target else None,
            window=cfg.window, missed_episodes=missed, restarts=self.restarts, workers=rows_d,
            run_dir=self.run_dir,
            params=params, curve=curve,
        )  # fmt: skip
        if self.run_dir:
            self._write_results(result)
        return result

    def _write_results(self, result: RLResult) -> None:
        import torch

        assert self.run_dir is not None
        result.policy_path = os.path.join(self.run_dir, "policy.pt")
        state = {k: torch.from_numpy(v) for k, v in result.params.items()}
        torch.save({"format": "paramserver-rl-policy-1", "model": self.model_args(), "state_dict": state,
                    "env": self.info.name, "config": self.config.to_dict()}, result.policy_path)  # fmt: skip
        doc = {"result": result.to_dict(), "config": self.config.to_dict(), "machine": machine_info()}
        with open(os.path.join(self.run_dir, "results.json"), "w") as f:
            json.dump(doc, f, indent=2, default=_json_default)
            f.write("\n")
        plot_curve(result, os.path.join(self.run_dir, "reward_curve.png"), self.config.window)


class _RLProgress(Progress):
    """The live line: elapsed, episodes, mean return, environment steps/s, one bar per worker."""

    episodes = 0
    mean: float | None = None

    def line(self, elapsed: float, rows: np.ndarray, loss: float | None) -> str:
        rate, per_worker = self.rates()
        top = max(float(per_worker.max()), 1e-9) if len(per_worker) else 1.0
        bars = "".join(BARS[int(round(r / top * (len(BARS) - 1)))] for r in per_worker)
        mean = "  -  " if self.mean is None else f"{self.mean:7.1f}"
        return (
            f"{elapsed:6.1f}s | {self.episodes:6d} episodes | mean return {mean} | "
            f"{rate:8,.0f} steps/s | workers [{bars}]"
        )


def _new_run_dir(out_dir: str, cfg: RLConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.env)
    base = os.path.join(out_dir, f"{stamp}-rl-{cfg.algo}-{env}-w{cfg.workers}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    os.makedirs(path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def plot_curve(result: RLResult, path: str, window: int = 100) -> None:
    """Mean return of the last episodes against wall time, with the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if result.curve:
        t, mean = zip(*result.curve, strict=True)
        ax.plot(t, mean, label=f"mean return of the last {window} episodes")
    if result.target_return is not None:
        ax.axhline(result.target_return, color="k", ls="--", lw=1, label=f"target {result.target_return:g}")
    ax.set_xlabel("seconds since the first step")
    ax.set_ylabel("return")
    ax.set_title(f"{result.algo} on {result.env}, {len(result.workers)} worker(s)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the public API ------------------------------------------------------------------------


def train_rl(
    config: RLConfig | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    *,
    env: str | EnvFactory | None = None,
) -> RLResult:
    """Train an agent with ``config.workers`` processes; return the result.

    ``env``: a gymnasium id or a picklable factory returning an environment with
    the gymnasium ``reset()``/``step()`` API (overrides ``config.env``).
    ``callback(episode)`` is called by the server once per finished episode,
    in the order they ended, with ``worker``, ``episode`` (the worker's count),
    ``return``, ``length``, ``time`` (seconds since the first step), ``wall_time``
    (``time.time()`` at its end),
    ``mean_return`` (of the last ``window``) and ``episodes`` (all so far);
    returning ``True`` stops the run.
    """
    with RLServer(config or RLConfig(), env=env, callback=callback) as server:
        return server.run()


@dataclass
class EvalResult:
    """Greedy episodes of a saved (or given) policy."""

    env: str
    returns: list[float]
    lengths: list[int]

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    def summary(self) -> str:
        return (
            f"{len(self.returns)} episodes of {self.env}: mean return {self.mean_return:.1f} "
            f"(std {np.std(self.returns):.1f}, min {min(self.returns):g}, max {max(self.returns):g})"
        )


def load_policy(path: str) -> tuple[Any, dict[str, Any]]:
    """The network saved by a run (``policy.pt``) and the saved document."""
    import torch

    from paramserver.models.rl_models import build

    if not os.path.isfile(path):
        raise ValueError(f"no policy file at {path!r}; a run writes one to <out-dir>/<run>/policy.pt")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a saved paramserver policy ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "paramserver-rl-policy-1":
        raise ValueError(f"{path!r} is not a saved paramserver policy (no paramserver-rl-policy-1 header)")
    model = build(**doc["model"])
    model.load_state_dict(doc["state_dict"])
    model.eval()
    return model, doc


def evaluate(
    path: str,
    episodes: int = 100,
    *,
    env: str | EnvFactory | None = None,
    seed: int = 0,
) -> EvalResult:
    """Run the policy saved at ``path`` greedily for ``episodes`` episodes (episode i
    resets with ``seed + i``) on ``env`` (default: the one it was trained on)."""
    import torch

    model, doc = load_policy(path)
    target = env if env is not None else doc["env"]
    info = inspect_env(target, doc["model"]["algo"])
    if (info.obs_dim, info.n_actions) != (doc["model"]["obs_dim"], doc["model"]["n_actions"]):
        raise ValueError(
            f"the policy was trained on {doc['env']!r} ({doc['model']['obs_dim']} observations, "
            f"{doc['model']['n_actions']} actions), {info.name!r} has {info.obs_dim} and {info.n_actions}"
        )
    e = make_env(target)
    returns, lengths = [], []
    try:
        with torch.no_grad():
            for i in range(episodes):
                obs, _ = e.reset(seed=seed + i)
                total, steps, done = 0.0, 0, False
                while not done:
                    x = torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(1, -1))
                    action = int(model.act_logits(x).argmax(1).item())
                    obs, reward, terminated, truncated, _ = e.step(action)
                    total += float(reward)
                    steps += 1
                    done = terminated or truncated
                returns.append(total)
                lengths.append(steps)
    finally:
        e.close()
    return EvalResult(info.name, returns, lengths)
