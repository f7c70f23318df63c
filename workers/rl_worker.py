"""Reinforcement learning tasks for the one worker loop: A3C and DQN on gymnasium.

The server side is :mod:`paramserver.rl`; the loop that runs these tasks is
:func:`paramserver.workers.worker.run`, the same as for supervised training,
so staleness, attenuation, learning-rate schedules, the non-finite check and
checkpoints come from there. Each task owns its environments, its rollouts and
(DQN) its replay pool; the network's ``param.data`` are views of the shared
parameters and its ``param.grad`` views of the worker's flat gradient buffer
(:func:`paramserver.workers.backends.bind_torch`), so ``loss.backward()``
writes the flat gradient.

A task's :meth:`~A3CTask.forward` is one iteration of its algorithm up to the
loss; ``backward`` computes the gradient of that loss and clips it. The
benchmark drives the very same tasks in one process with ``torch.optim``.

A worker restarted by the server (after a kill or a hang) has the same rank and
counter row: its step, update and episode counts go on, and so does epsilon;
its environments, and for DQN its replay pool and target network, start anew.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserver.config import RLConfig
from paramserver.portable import ByValue
from paramserver.store import Gradient, Segment

from .backends import bind_torch
from .worker import Context, Task

EnvFactory = Callable[[], Any]


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


def clip_flat(grad: np.ndarray, max_norm: float) -> bool:
    """Scale the flat gradient to at most ``max_norm`` (0 = no clipping); False if not finite."""
    norm = float(np.sqrt(np.dot(grad, grad)))
    if not np.isfinite(norm):
        return False
    if max_norm and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return True


class RLTask(Task):
    """What A3C and DQN share: the network on the shared parameters, the environments,
    the episode ring, and a backward that clips the gradient."""

    loss_smoothing = 0.05

    def __init__(
        self,
        config: RLConfig,
        env: str | EnvFactory,
        model_args: dict[str, Any],
        episodes: Segment | None = None,
    ):
        self.config = config
        self.env = env
        self.model_args = model_args
        self.episodes = episodes
        self.record: Callable[[float, int], None] | None = None
        """Called for every finished episode (return, length); default: the worker's ring."""
        self._loss: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # An environment factory defined in a notebook or ``python -`` cannot be imported
        # by the worker: it travels by value (cloudpickle); a gymnasium id is a string.
        state = self.__dict__.copy()
        if not isinstance(self.env, str):
            state["env"] = ByValue(self.env, "the environment factory")
        return state

    def start(self, ctx: Context) -> None:
        from paramserver.models.rl_models import build

        self.model = build(**self.model_args)
        bind_torch(self.model, ctx.layout, ctx.params, ctx.grad)
        self.grad = ctx.grad
        if self.record is None:
            assert self.episodes is not None, "an RL task needs its episode ring or a record callback"
            ring, count = self.episodes["ring"][ctx.rank], self.episodes["count"][ctx.rank : ctx.rank + 1]

            def record(ret: float, length: int) -> None:
                i = int(count[0])
                ring[i % len(ring)] = (ret, length, time.time())
                count[0] = i + 1  # after the row: the server reads rows below the count

            self.record = record
        cfg = self.config
        self.envs = EnvGroup(self.env, cfg.envs_per_worker, cfg.seed, ctx.rank, ctx.workers, self.record)
        self.envs.steps = ctx.samples  # a restarted worker counts on (epsilon, its share)
        self.rng = np.random.default_rng(cfg.seed + ctx.rank)

    def backward(self) -> Gradient:
        self.grad.fill(0)  # backward() accumulates into the views
        self._loss.backward()
        self._loss = None
        return Gradient(self.grad, finite=clip_flat(self.grad, self.config.max_grad_norm or 0.0))

    def _took(self, before: int) -> None:
        self.samples_taken = self.envs.steps - before

    def close(self) -> None:
        envs = getattr(self, "envs", None)
        if envs is not None:
            envs.close()
        # Every view of the shared memory goes first (the record closure holds the ring).
        self.envs = self.model = self.grad = self.record = self._loss = None  # type: ignore[assignment]
        if self.episodes is not None:
            with contextlib.suppress(BufferError):  # a traceback may still hold a view
                self.episodes.close()


# -- environments ----------------------------------------------------------------------------


class EnvGroup:
    """``n`` environments stepped in lockstep; each is reset as soon as its episode ends.

    Environment ``e`` of worker ``rank`` is first reset with seed ``seed + rank + e *
    workers`` (so ``seed + rank`` with one environment per worker); later resets
    continue its own random stream. ``record(return, length)`` is called for every
    finished episode.
    """

    def __init__(
        self,
        env: Any,
        n: int,
        seed: int,
        rank: int,
        workers: int,
        record: Callable[[float, int], None],
    ):
        self.envs = [make_env(env) for _ in range(n)]
        self.record = record
        first = []
        for e, env_ in enumerate(self.envs):
            s = seed + rank + e * workers
            env_.action_space.seed(s)
            first.append(np.asarray(env_.reset(seed=s)[0], dtype=np.float32).ravel())
        self.obs = np.stack(first)
        self.returns = np.zeros(n)
        self.lengths = np.zeros(n, dtype=np.int64)
        self.steps = 0
        """Environment steps taken, all environments together (a restarted worker sets it to
        its count so far)."""

    def __len__(self) -> int:
        return len(self.envs)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step every environment; returns ``(obs, reward, terminated, truncated, final)``.

        ``obs`` is the observation to act on next (after a reset where an episode
        ended); ``final`` the observation the step led to (before that reset), for
        replay pools and for bootstrapping truncated episodes. Both are new arrays."""
        n = len(self.envs)
        obs = np.empty_like(self.obs)
        final = np.empty_like(self.obs)
        rewards = np.empty(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        for e, env in enumerate(self.envs):
            o, r, term, trunc, _ = env.step(int(actions[e]))
            final[e] = np.asarray(o, dtype=np.float32).ravel()
            rewards[e] = r
            self.returns[e] += r
            self.lengths[e] += 1
            if term or trunc:
                terminated[e], truncated[e] = term, trunc and not term
                self.record(float(self.returns[e]), int(self.lengths[e]))
                self.returns[e] = 0.0
                self.lengths[e] = 0
                obs[e] = np.asarray(env.reset()[0], dtype=np.float32).ravel()
            else:
                obs[e] = final[e]
        self.obs = obs
        self.steps += n
        return obs, rewards, terminated, truncated, final

    def close(self) -> None:
        for env in self.envs:
            env.close()


# -- A3C ---------------------------------------------------------------------------------------


class A3CTask(RLTask):
    """Advantage actor-critic on ``n_steps`` rollouts of every environment.

    Per update: ``n_steps x len(envs)`` transitions; n-step returns bootstrapped
    from the value of the last observation (and of the final observation of an
    episode cut by a time limit, which is not a real end); loss = policy gradient
    with the advantage, plus ``value_coef`` x squared error of the value, minus
    ``entropy_coef`` x entropy; the gradient is clipped to ``max_grad_norm``.
    Actions are chosen with the live shared parameters, and the gradient is taken
    on them too, after the rollout (another worker may have moved them meanwhile:
    that staleness is A3C's, and Hogwild's, contract).
    """

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        cfg = self.config
        assert cfg.n_steps is not None, "RLConfig fills in the algorithm's default"
        n, e = cfg.n_steps, len(self.envs)
        self.obs_buf = np.empty((n, e, self.envs.obs.shape[1]), dtype=np.float32)
        self.act_buf = np.empty((n, e), dtype=np.int64)
        self.rew_buf = np.empty((n, e), dtype=np.float32)
        self.done_buf = np.empty((n, e), dtype=np.float32)
        self.returns = np.empty((n, e), dtype=np.float32)

    def forward(self) -> Any:
        import torch
        import torch.nn.functional as F

        cfg, envs, model = self.config, self.envs, self.model
        n, e, gamma = self.obs_buf.shape[0], len(envs), cfg.gamma
        before = envs.steps
        with torch.no_grad():
            for t in range(n):
                self.obs_buf[t] = envs.obs
                logits = model.act_logits(torch.from_numpy(envs.obs)).numpy()
                self.act_buf[t] = _sample(logits, self.rng)
                _, reward, terminated, truncated, final = envs.step(self.act_buf[t])
                if truncated.any():  # a time limit, not an end: bootstrap from where it stopped
                    _, v_final = model(torch.from_numpy(final[truncated]))
                    reward[truncated] += gamma * v_final.numpy()
                self.rew_buf[t] = reward
                self.done_buf[t] = terminated | truncated
            _, v_last = model(torch.from_numpy(envs.obs))
            ret = v_last.numpy()
            for t in reversed(range(n)):
                ret = self.rew_buf[t] + gamma * ret * (1.0 - self.done_buf[t])
                self.returns[t] = ret
        self._took(before)
        logits, values = model(torch.from_numpy(self.obs_buf.reshape(n * e, -1)))
        logp = F.log_softmax(logits, dim=1)
        target = torch.from_numpy(self.returns.reshape(-1))
        advantage = target - values.detach()
        chosen = logp.gather(1, torch.from_numpy(self.act_buf.reshape(-1, 1))).squeeze(1)
        entropy = -(logp.exp() * logp).sum(1).mean()
        self._loss = (
            -(chosen * advantage).mean()
            + cfg.value_coef * (target - values).pow(2).mean()
            - cfg.entropy_coef * entropy
        )
        return float(self._loss.detach())


def _sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row of ``logits``, drawn from their softmax."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), p.shape[1] - 1)


# -- DQN -----------------------------------------------------------------------------------------


class ReplayPool:
    """This worker's own pool of transitions (a ring of ``capacity``); never shared.

    A transition is ``(s, a, R, s', discount)``: the target is
    ``R + discount * V(s')``, with ``discount`` 0 where the episode really ended."""

    def __init__(self, capacity: int, obs_dim: int):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.capacity = capacity
        self.size = 0
        self.pos = 0

    def add(self, obs: np.ndarray, action: int, ret: float, next_obs: np.ndarray, discount: float) -> None:
        j = self.pos
        self.obs[j], self.actions[j], self.rewards[j] = obs, action, ret
        self.next_obs[j], self.discounts[j] = next_obs, discount
        self.pos = (j + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, size=batch)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.discounts[idx]


class NStep:
    """Turns each environment's steps into n-step transitions for a :class:`ReplayPool`.

    From ``s_t`` the transition sums ``k`` rewards, ``R = r_t + gamma r_{t+1} + ...
    + gamma^(k-1) r_(t+k-1)``, and bootstraps from ``s_(t+k)`` with discount
    ``gamma^k``: ``k = n``, or what is left of the episode at its end. At a real
    end the discount is 0; at a time limit the final observation bootstraps. With
    ``n = 1`` this is the one-step transition of plain DQN.
    """

    def __init__(self, n: int, envs: int, gamma: float):
        self.n, self.gamma = n, gamma
        self.windows: list[collections.deque[tuple[np.ndarray, int, float]]] = [
            collections.deque() for _ in range(envs)
        ]

    def add(
        self,
        pool: ReplayPool,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        final: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> None:
        """One lockstep step of every environment (as :meth:`EnvGroup.step` returns it)."""
        for i, window in enumerate(self.windows):
            window.append((obs[i], int(actions[i]), float(rewards[i])))
            if terminated[i] or truncated[i]:
                while window:  # every state of the episode's tail gets its shorter return
                    self._emit(pool, window, final[i], 0.0 if terminated[i] else 1.0)
            elif len(window) == self.n:
                self._emit(pool, window, final[i], 1.0)

    def _emit(self, pool: ReplayPool, window: collections.deque, next_obs: np.ndarray, alive: float) -> None:
        ret = sum(self.gamma**j * r for j, (_, _, r) in enumerate(window))
        s, a, _ = window.popleft()
        pool.add(s, a, ret, next_obs, alive * self.gamma ** (len(window) + 1))


def epsilon(cfg: RLConfig, steps: int) -> float:
    """Exploration rate after ``steps`` environment steps of this worker: linear decay."""
    if cfg.eps_decay_steps == 0:
        return cfg.eps_end
    frac = min(1.0, steps / cfg.eps_decay_steps)
    return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)


class DQNTask(RLTask):
    """DQN with this worker's own replay pool and a private target network.

    Every ``train_every`` lockstep steps (after ``learning_starts`` transitions)
    the worker samples ``batch_size`` transitions from its pool and pushes the
    gradient of the Huber loss against the ``n_steps``-step target
    ``R + gamma^n * Q_target(s', a*)`` (:class:`NStep`; ``a*`` by the online
    network with ``double_dqn``, else by the target's own max). The target
    network is a private copy of the shared parameters, refreshed every
    ``update_steps`` of this worker's updates. An episode cut by a time limit is
    not an end: its last transitions bootstrap like any other.
    """

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        cfg = self.config
        self.target_net = copy.deepcopy(self.model)  # private storage: a snapshot, not a view
        for p in self.target_net.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.pool = ReplayPool(cfg.pool_size, self.envs.obs.shape[1])
        assert cfg.n_steps is not None, "RLConfig fills in the algorithm's default"
        self.n_step = NStep(cfg.n_steps, len(self.envs), cfg.gamma)
        self.updates = self.ticks = 0

    def refresh(self) -> None:
        """Copy the shared parameters into the target network."""
        import torch

        with torch.no_grad():
            for tp, p in zip(self.target_net.parameters(), self.model.parameters(), strict=True):
                tp.copy_(p)

    def forward(self) -> Any:
        import torch
        import torch.nn.functional as F

        cfg, envs, model, rng = self.config, self.envs, self.model, self.rng
        e = len(envs)
        obs = envs.obs
        before = envs.steps
        with torch.no_grad():
            greedy = model.act_logits(torch.from_numpy(obs)).argmax(1).numpy()
        explore = rng.random(e) < epsilon(cfg, envs.steps)
        actions = np.where(explore, rng.integers(0, envs.envs[0].action_space.n, size=e), greedy)
        _, reward, terminated, truncated, final = envs.step(actions)
        self.n_step.add(self.pool, obs, actions, reward, final, terminated, truncated)
        self._took(before)
        self.ticks += 1
        pool = self.pool
        if pool.size < max(cfg.learning_starts, cfg.batch_size) or self.ticks % cfg.train_every:
            return None  # no update this step
        s, a, r, s2, discount = (torch.from_numpy(x) for x in pool.sample(cfg.batch_size, rng))
        q_all = model(torch.cat([s, s2]) if cfg.double_dqn else s)
        q = q_all[: len(s)].gather(1, a.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            q_next = self.target_net(s2)
            if cfg.double_dqn:
                best = q_all[len(s) :].detach().argmax(1, keepdim=True)
                v_next = q_next.gather(1, best).squeeze(1)
            else:
                v_next = q_next.max(1).values
            y = r + discount * v_next
        self._loss = F.smooth_l1_loss(q, y)
        return float(self._loss.detach())

    def stepped(self, applied: bool) -> None:
        if applied:
            self.updates += 1
            if self.updates % self.config.update_steps == 0:
                self.refresh()


TASKS = {"a3c": A3CTask, "dqn": DQNTask}
"""The task of each algorithm."""
