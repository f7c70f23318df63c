"""Reinforcement learning on gymnasium: A3C-style actor-critic and parallel DQN.

    paramserver rl --algo a3c --env CartPole-v1 --workers 2
    paramserver rl --evaluate runs/<run>/policy.safetensors

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
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import portable
from .config import RLConfig
from .layout import Layout
from .progress import BARS, Progress
from .server import Job, Server, note, staleness_of, summary_tail, write_json
from .store import Counters, Segment

EPISODE_FIELDS = ("return", "length", "time")
"""One row of a worker's episode ring: return, length in steps, time.time() at its end."""
RING = 4096
"""Episodes each worker's ring holds: the server reads them at 10 Hz, so it only misses
episodes if one worker finishes more than 40,000 a second."""

EnvFactory = Callable[[], Any]


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
    from paramserver.workers.rl_worker import make_env as make

    return make(env)


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

    checkpoint: str | None = None
    """The final checkpoint's path (when the run had an output directory)."""
    version: int = 0
    """Global update count at the end, including a resumed checkpoint's updates."""

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def staleness(self) -> dict[str, float]:
        """Mean and max staleness of the updates of this run, over all workers."""
        return staleness_of(self.workers)

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
        return out + summary_tail(self.restarts, self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        skip = {"params", "curve"}
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        doc["steps_per_second"] = self.steps_per_second
        doc["staleness"] = self.staleness
        return doc


# -- the job -------------------------------------------------------------------------------


class RLJob(Job):
    """Reinforcement learning under the one server: the agent's parameters in the store,
    each worker's episodes in its ring of an episode segment; stops at the target mean
    return, the step budget or the time budget."""

    kind = "rl"

    def __init__(
        self,
        config: RLConfig,
        *,
        env: str | EnvFactory | None = None,
        callback: Callable[[dict[str, Any]], bool | None] | None = None,
    ):
        import torch

        from paramserver.models.rl_models import build

        self.config = config
        self.env = env if env is not None else config.env
        if not isinstance(self.env, str):
            if not callable(self.env):
                raise TypeError(f"env must be a gymnasium id or a factory, got {type(self.env).__name__}")
            portable.check(self.env, "the environment factory")
        self.info = inspect_env(self.env, config.algo)
        self.target = config.target_return if config.target_return is not None else self.info.reward_threshold
        if self.target is None and not (config.max_steps or config.max_seconds):
            raise ValueError(
                f"environment {self.info.name!r} has no reward_threshold: give --target-return, "
                "--max-steps or --max-seconds, or the run would never stop"
            )
        self.callback = callback
        with torch.random.fork_rng():  # the initial parameters, without touching the caller's RNG
            torch.manual_seed(config.seed)
            self.model = build(**self.model_args())
        self.layout = Layout.from_torch(self.model)
        self.init = self.layout.flatten({n: p.detach().numpy() for n, p in self.model.named_parameters()})

    def model_args(self) -> dict[str, Any]:
        cfg = self.config
        return {"algo": cfg.algo, "obs_dim": self.info.obs_dim, "n_actions": self.info.n_actions,
                "hidden": cfg.hidden}  # fmt: skip

    def run_dir_name(self) -> str:
        cfg = self.config
        env = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.env)
        return f"rl-{cfg.algo}-{env}-w{cfg.workers}"

    def prepare(self, server: Server) -> None:
        self.episodes = server.own(Segment.create(episode_layout(self.config.workers), {"kind": "episodes"}))

    def task(self, server: Server) -> Any:
        from paramserver.workers.rl_worker import TASKS

        return TASKS[self.config.algo](self.config, self.env, self.model_args(), self.episodes)

    def plan(self, server: Server, rank: int) -> dict[str, Any]:
        cfg = self.config
        samples = 0
        if cfg.max_steps:
            samples = max(1, cfg.max_steps // cfg.workers + (rank < cfg.max_steps % cfg.workers))
        return {"samples": samples, "total_updates": cfg.lr_total}

    def progress(self) -> Progress:
        return _RLProgress(self, enabled=self.config.progress, total_samples=self.config.max_steps)

    def begin(self, server: Server) -> None:
        cfg = self.config
        self.ring, self.count = self.episodes["ring"], self.episodes["count"]
        self.seen = np.zeros(cfg.workers, dtype=np.int64)
        self.missed = 0
        self.recent: collections.deque[float] = collections.deque(maxlen=cfg.window)
        self.curve: list[tuple[float, float]] = []
        self.best: float | None = None
        self.at_target: tuple[float, int] | None = None
        self.episodes_total = 0
        self.reason: str | None = None
        self.log = None
        if server.run_dir:
            self.log = open(os.path.join(server.run_dir, "episodes.jsonl"), "w", buffering=1)  # noqa: SIM115

    def metrics(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes_total,
            "mean_return": float(np.mean(self.recent)) if self.recent else None,
        }

    def poll(self, server: Server, elapsed: float, rows: Counters) -> str | None:
        import json

        cfg, ring, count = self.config, self.ring, self.count
        assert server.t0 is not None
        new = []  # new episodes of every worker, in the order they ended
        for w in range(cfg.workers):
            n = int(count[w])
            first = max(int(self.seen[w]), n - RING)
            self.missed += first - int(self.seen[w])
            for i in range(first, n):
                ret, length, t_end = ring[w, i % RING]
                new.append((t_end, w, i, float(ret), int(length)))
            self.seen[w] = n
        new.sort()
        reason = None
        for t_end, w, i, ret, length in new:
            self.episodes_total += 1
            self.recent.append(ret)
            mean = float(np.mean(self.recent))
            elapsed_ep = t_end - server.t0
            full = len(self.recent) == cfg.window
            if full:
                self.best = mean if self.best is None else max(self.best, mean)
            self.curve.append((elapsed_ep, mean))
            doc = {"worker": w, "episode": i, "return": ret, "length": length,
                   "time": round(elapsed_ep, 4), "wall_time": round(t_end, 4),
                   "mean_return": round(mean, 3)}  # fmt: skip
            if self.log is not None:
                self.log.write(json.dumps(doc) + "\n")
            if server.tensorboard is not None:
                from .tensorboard import episode_scalars

                server.tensorboard.add(self.episodes_total, episode_scalars(doc), wall_time=t_end)
            if self.callback is not None and self.callback({**doc, "episodes": self.episodes_total}):
                reason = "callback"
            if self.target is not None and full and mean >= self.target and self.at_target is None:
                self.at_target = (elapsed_ep, int(rows.column("samples").sum()))
                reason = "target"
            if reason:
                break
        self.reason = reason
        return reason

    def end(self, server: Server) -> None:
        # Episodes that ended after the last poll (the run may stop at the very poll that
        # saw every worker done, before this job read their rings).
        if server.t0 is not None and self.reason is None:
            self.poll(server, 0.0, server.store.counters.copy())
        if self.log is not None:
            self.log.close()

    def result(self, server: Server, reason: str) -> RLResult:
        cfg = self.config
        rows = server.worker_rows()
        t_first, t_last = server.span()
        params = {k: v.copy() for k, v in self.layout.unflatten(server.store.params).items()}
        recent, at_target = self.recent, self.at_target
        self.ring = self.count = None  # views of the episode segment: gone before it closes
        return RLResult(
            algo=cfg.algo, env=self.info.name, stop_reason=reason, target_return=self.target,
            solved=at_target is not None, mean_return=float(np.mean(recent)) if recent else None,
            best_mean_return=self.best, episodes=self.episodes_total,
            env_steps=int(sum(r["samples"] for r in rows)), updates=int(sum(r["steps"] for r in rows)),
            train_seconds=max(0.0, t_last - t_first), startup_seconds=t_first - server.started,
            seconds_to_target=at_target[0] if at_target else None,
            steps_to_target=at_target[1] if at_target else None,
            window=cfg.window, missed_episodes=self.missed, restarts=server.restarts, workers=rows,
            run_dir=server.run_dir, params=params, curve=self.curve, version=server.store.version(),
        )  # fmt: skip

    def write(self, server: Server, result: RLResult) -> None:
        from .checkpoint import POLICY_FILENAME, save_policy, validate_env_id
        from .machine import machine_info

        run_dir = server.run_dir
        assert run_dir is not None
        try:  # a saved policy names a registered id only, never code to import
            env: str | None = validate_env_id(self.info.name)
        except ValueError:
            env = None  # a factory's environment: --evaluate then needs --env
        meta = {"model": self.model_args(), "env": env, "config": self.config.to_dict()}
        result.policy_path = save_policy(os.path.join(run_dir, POLICY_FILENAME), result.params, meta)
        doc = {"result": result.to_dict(), "config": self.config.to_dict(), "machine": machine_info()}
        write_json(os.path.join(run_dir, "results.json"), doc)
        try:
            plot_curve(result, os.path.join(run_dir, "reward_curve.png"), self.config.window)
        except ImportError:
            note("reward_curve.png not drawn: it needs matplotlib (pip install 'paramserver[bench]')")


class RLServer(Server):
    """An RL run: ``Server(RLJob(config, env=..., callback=...), config)``.

    A context manager: segments and processes are released on exit, whatever happened::

        with RLServer(config) as server:
            result = server.run()
    """

    config: RLConfig

    def __init__(
        self,
        config: RLConfig,
        *,
        env: str | EnvFactory | None = None,
        callback: Callable[[dict[str, Any]], bool | None] | None = None,
    ):
        super().__init__(RLJob(config, env=env, callback=callback), config)

    @property
    def episodes(self) -> Segment:
        return self.job.episodes  # type: ignore[attr-defined, no-any-return]


class _RLProgress(Progress):
    """The live line: elapsed, episodes, mean return, environment steps/s, one bar per worker."""

    def __init__(self, job: RLJob, *, enabled: bool, total_samples: int):
        super().__init__(enabled=enabled, total_samples=total_samples)
        self.job = job

    def line(self, elapsed: float, rows: Counters, loss: float | None) -> str:
        rate, per_worker = self.rates()
        top = max(float(per_worker.max()), 1e-9) if len(per_worker) else 1.0
        bars = "".join(BARS[int(round(r / top * (len(BARS) - 1)))] for r in per_worker)
        recent = getattr(self.job, "recent", None)
        mean = "  -  " if not recent else f"{float(np.mean(recent)):7.1f}"
        return (
            f"{elapsed:6.1f}s | {getattr(self.job, 'episodes_total', 0):6d} episodes | mean return {mean} | "
            f"{rate:8,.0f} steps/s | workers [{bars}]"
        )


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


def load_policy(path: str, *, need_env: bool = True) -> tuple[Any, dict[str, Any]]:
    """The network saved by a run (``policy.safetensors``) and the file's metadata
    (``model``, ``env``, ``config``); every field is checked, and a ``ValueError``
    names the file. ``need_env=False``: an environment id the file may not name is
    dropped (the caller brings its own)."""
    import torch

    from paramserver.models.rl_models import build

    from .checkpoint import load_policy_file

    state, meta = load_policy_file(path, need_env=need_env)
    model = build(**meta["model"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.eval()
    return model, meta


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

    model, doc = load_policy(path, need_env=env is None)
    target = env if env is not None else doc["env"]
    if target is None:
        raise ValueError(f"{path}: the policy names no environment; pass --env")
    info = inspect_env(target, doc["model"]["algo"])
    if (info.obs_dim, info.n_actions) != (doc["model"]["obs_dim"], doc["model"]["n_actions"]):
        trained = repr(doc["env"]) if doc["env"] else "an environment it does not name"
        raise ValueError(
            f"the policy was trained on {trained} ({doc['model']['obs_dim']} observations, "
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
