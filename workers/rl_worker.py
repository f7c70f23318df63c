"""The RL worker process: own environments, shared agent, A3C or DQN until told to stop.

Started by :class:`paramserver.rl.RLServer` with the spawn start method; the
entry point is :func:`rl_worker_main`. The network's ``param.data`` are views
of the shared parameters and its ``param.grad`` views of one local flat
gradient buffer, as in :class:`~paramserver.workers.backends.TorchBackend`:
``loss.backward()`` writes the flat gradient, and the policy and update rule
of supervised training apply it to the shared vector.

The algorithms (:func:`run_a3c`, :func:`run_dqn`) only see a model, a
``push(loss)`` that turns a loss into an update, and an :class:`EnvGroup`, so
the benchmark runs the very same loops in one process with ``torch.optim``.

A worker restarted by the server (after a kill or a hang) has the same rank and
counter row: its step, update and episode counts go on, and so does epsilon;
its environments, and for DQN its replay pool and target network, start anew.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from paramserver.layout import Layout
from paramserver.optim import Updater
from paramserver.policy import Policy
from paramserver.store import CONTROL, COUNTER, STATUS, ParamStore, Segment

from .backends import set_threads_and_seed
from .worker import die_with_parent, place

if TYPE_CHECKING:
    import torch

    from paramserver.rl import Placement, RLConfig

START_TIMEOUT = 120.0
"""Seconds a worker waits for the others to be ready before starting alone."""
LOSS_SMOOTHING = 0.05

Push = Callable[["torch.Tensor"], bool]
"""Turns a loss into an update of the parameters; False if the gradient was not finite."""


def rl_worker_main(
    rank: int,
    store: ParamStore,
    episodes: Segment,
    policy: Policy,
    start: Any,
    config: RLConfig,
    env: Any,
    model_args: dict[str, Any],
    placement: Placement,
) -> None:
    """Entry point of an RL worker (spawned; ``store`` and ``episodes`` arrive attached)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    die_with_parent(placement.parent_pid)
    for w in place(placement.cores, config.nice):
        print(f"paramserver rl worker {rank}: warning: {w}", flush=True)
    set_threads_and_seed("torch", placement.threads, config.seed + rank)
    row = store.counters[rank]
    row[COUNTER["pid"]] = os.getpid()
    try:
        _run(rank, store, episodes, policy, start, config, env, model_args, placement)
        row[COUNTER["status"]] = STATUS["done"]
    except BaseException:
        row[COUNTER["status"]] = STATUS["failed"]
        raise
    finally:
        row[COUNTER["finished"]] = time.time()
        del row
        policy.unbind()
        # After an exception its traceback can still hold views of the segments; the
        # mapping then goes when this process exits a moment later.
        with contextlib.suppress(BufferError):
            store.close()
            episodes.close()


def _run(
    rank: int,
    store: ParamStore,
    episodes: Segment,
    policy: Policy,
    start: Any,
    config: RLConfig,
    env: Any,
    model_args: dict[str, Any],
    placement: Placement,
) -> None:
    from paramserver.models.rl_models import build

    params = store.params
    rule = config.update_rule()
    shared_state = config.shared_state and rule.state_slots > 0
    state = store.state if shared_state else np.zeros((rule.state_slots, params.size), params.dtype)
    grad = np.zeros_like(params)
    model = build(**model_args)
    layout = Layout.from_torch(model)
    store.check_model(layout)
    bind(model, layout, params, grad)
    update = Updater(rule, params, grad, state, config.learning_rate)
    row = store.counters[rank]
    policy.bind(row)  # what this worker holds, for the server to give back if it dies
    steps_column = store.counters[:, COUNTER["steps"]]
    local_updates = int(row[COUNTER["steps"]])  # a restarted worker counts on

    def push(loss: torch.Tensor) -> bool:
        finite = True

        def backward() -> None:
            nonlocal finite
            grad.fill(0)  # backward() accumulates into the views
            loss.backward()
            finite = clip_flat(grad, config.max_grad_norm or 0.0)

        def apply(a: int, b: int) -> None:
            if finite:
                update(a, b)

        nonlocal local_updates
        version = int(steps_column.sum())
        row[COUNTER["pulled_version"]] = version
        # RMSProp has no bias correction; Adam's counts the updates made to its state.
        update.t = version + 1 if shared_state else local_updates + 1
        policy.step(backward, apply, rank)
        if finite:
            local_updates += 1
            row[COUNTER["steps"]] = local_updates
        else:
            row[COUNTER["nonfinite"]] += 1
        return finite

    ring, count = episodes["ring"][rank], episodes["count"][rank : rank + 1]

    def record(ret: float, length: int) -> None:
        i = int(count[0])
        ring[i % len(ring)] = (ret, length, time.time())
        count[0] = i + 1  # after the row: the server reads rows below the count

    control, c_stop = store.control, CONTROL["stop"]
    parent = placement.parent_pid
    limit = placement.max_steps

    def report(env_steps: int, loss: float | None) -> bool:
        """Write this worker's figures; True when it must stop."""
        row[COUNTER["samples"]] = env_steps
        if loss is not None:
            old = row[COUNTER["loss"]]
            row[COUNTER["loss"]] = loss if local_updates <= 1 else old + LOSS_SMOOTHING * (loss - old)
        row[COUNTER["heartbeat"]] = time.time()
        return bool(control[c_stop]) or os.getppid() != parent or bool(limit and env_steps >= limit)

    envs = EnvGroup(env, config.envs_per_worker, config.seed, rank, config.workers, record)
    envs.steps = int(row[COUNTER["samples"]])  # a restarted worker counts on (epsilon, its share)
    rng = np.random.default_rng(config.seed + rank)
    if placement.life == 0:
        try:
            start.wait(START_TIMEOUT)  # the others are still importing: begin together
        except threading.BrokenBarrierError:
            pass  # one failed to start; the server sees it and stops the run
    now = time.time()
    row[COUNTER["heartbeat"]] = now
    if not row[COUNTER["started"]]:
        row[COUNTER["started"]] = now
    row[COUNTER["status"]] = STATUS["running"]
    try:
        if config.algo == "a3c":
            run_a3c(model, push, envs, config, rng, report)
        else:
            run_dqn(model, push, envs, config, rng, report)
    finally:
        envs.close()


def bind(model: torch.nn.Module, layout: Layout, params: np.ndarray, grad: np.ndarray) -> None:
    """Make ``model``'s parameters views of ``params`` and its gradients views of ``grad``."""
    import torch

    views, gviews = layout.unflatten(params), layout.unflatten(grad)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Never call model.share_memory() after this: it would copy the views away.
            p.data = torch.from_numpy(views[name])
            p.grad = torch.from_numpy(gviews[name])


def clip_flat(grad: np.ndarray, max_norm: float) -> bool:
    """Scale the flat gradient to at most ``max_norm`` (0 = no clipping); False if not finite."""
    norm = float(np.sqrt(np.dot(grad, grad)))
    if not np.isfinite(norm):
        return False
    if max_norm and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return True


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
        from paramserver.rl import make_env

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


def run_a3c(
    model: torch.nn.Module,
    push: Push,
    envs: EnvGroup,
    cfg: RLConfig,
    rng: np.random.Generator,
    report: Callable[[int, float | None], bool],
) -> None:
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
    import torch
    import torch.nn.functional as F

    assert cfg.n_steps is not None, "RLConfig fills in the algorithm's default"
    n, e, gamma = cfg.n_steps, len(envs), cfg.gamma
    obs_buf = np.empty((n, e, envs.obs.shape[1]), dtype=np.float32)
    act_buf = np.empty((n, e), dtype=np.int64)
    rew_buf = np.empty((n, e), dtype=np.float32)
    done_buf = np.empty((n, e), dtype=np.float32)
    returns = np.empty((n, e), dtype=np.float32)
    if report(envs.steps, None):
        return
    while True:
        with torch.no_grad():
            for t in range(n):
                obs_buf[t] = envs.obs
                logits = model.act_logits(torch.from_numpy(envs.obs)).numpy()
                act_buf[t] = _sample(logits, rng)
                _, reward, terminated, truncated, final = envs.step(act_buf[t])
                if truncated.any():  # a time limit, not an end: bootstrap from where it stopped
                    _, v_final = model(torch.from_numpy(final[truncated]))
                    reward[truncated] += gamma * v_final.numpy()
                rew_buf[t] = reward
                done_buf[t] = terminated | truncated
            _, v_last = model(torch.from_numpy(envs.obs))
            ret = v_last.numpy()
            for t in reversed(range(n)):
                ret = rew_buf[t] + gamma * ret * (1.0 - done_buf[t])
                returns[t] = ret
        logits, values = model(torch.from_numpy(obs_buf.reshape(n * e, -1)))
        logp = F.log_softmax(logits, dim=1)
        target = torch.from_numpy(returns.reshape(-1))
        advantage = target - values.detach()
        chosen = logp.gather(1, torch.from_numpy(act_buf.reshape(-1, 1))).squeeze(1)
        entropy = -(logp.exp() * logp).sum(1).mean()
        loss = (
            -(chosen * advantage).mean()
            + cfg.value_coef * (target - values).pow(2).mean()
            - cfg.entropy_coef * entropy
        )
        push(loss)
        if report(envs.steps, float(loss.detach())):
            return


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


def run_dqn(
    model: torch.nn.Module,
    push: Push,
    envs: EnvGroup,
    cfg: RLConfig,
    rng: np.random.Generator,
    report: Callable[[int, float | None], bool],
) -> None:
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
    import torch
    import torch.nn.functional as F

    target_net = copy.deepcopy(model)  # private storage: a snapshot, not a view
    for p in target_net.parameters():
        p.requires_grad_(False)
        p.grad = None

    def refresh() -> None:
        with torch.no_grad():
            for tp, p in zip(target_net.parameters(), model.parameters(), strict=True):
                tp.copy_(p)

    pool = ReplayPool(cfg.pool_size, envs.obs.shape[1])
    e = len(envs)
    assert cfg.n_steps is not None, "RLConfig fills in the algorithm's default"
    n_step = NStep(cfg.n_steps, e, cfg.gamma)
    updates, ticks = 0, 0
    loss_value: float | None = None
    if report(envs.steps, None):
        return
    while True:
        obs = envs.obs
        with torch.no_grad():
            greedy = model.act_logits(torch.from_numpy(obs)).argmax(1).numpy()
        explore = rng.random(e) < epsilon(cfg, envs.steps)
        actions = np.where(explore, rng.integers(0, envs.envs[0].action_space.n, size=e), greedy)
        _, reward, terminated, truncated, final = envs.step(actions)
        n_step.add(pool, obs, actions, reward, final, terminated, truncated)
        ticks += 1
        if pool.size >= max(cfg.learning_starts, cfg.batch_size) and ticks % cfg.train_every == 0:
            s, a, r, s2, discount = (torch.from_numpy(x) for x in pool.sample(cfg.batch_size, rng))
            q_all = model(torch.cat([s, s2]) if cfg.double_dqn else s)
            q = q_all[: len(s)].gather(1, a.unsqueeze(1)).squeeze(1)
            with torch.no_grad():
                q_next = target_net(s2)
                if cfg.double_dqn:
                    best = q_all[len(s) :].detach().argmax(1, keepdim=True)
                    v_next = q_next.gather(1, best).squeeze(1)
                else:
                    v_next = q_next.max(1).values
                y = r + discount * v_next
            loss = F.smooth_l1_loss(q, y)
            if push(loss):
                updates += 1
                if updates % cfg.update_steps == 0:
                    refresh()
            loss_value = float(loss.detach())
        if report(envs.steps, loss_value):
            return
