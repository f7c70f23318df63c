"""Reinforcement learning: real worker processes on gymnasium with tiny budgets.

.venv/bin/python -m pytest tests/test_rl.py -x -q          # smoke tests, seconds each
.venv/bin/python -m pytest tests/test_rl.py -m slow        # solves CartPole-v1
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from paramserver.benchmarks.rl import single_process, solve
from paramserver.layout import Layout
from paramserver.models.rl_models import build
from paramserver.rl import RLConfig, evaluate, train_rl
from paramserver.workers.rl_worker import EnvGroup, bind

TIMEOUT = 120


def config(**kw) -> RLConfig:
    base = dict(workers=2, envs_per_worker=2, out_dir="", progress=False)
    return RLConfig(**{**base, **kw})


def short_cartpole() -> gym.Env:
    """A factory (module level, so workers can unpickle it): episodes of at most 30 steps."""
    return gym.make("CartPole-v1", max_episode_steps=30)


def no_children_left() -> bool:
    return not mp.active_children()


# -- smoke runs of both algorithms with 2 workers --------------------------------------------


def test_a3c_smoke_writes_log_curve_and_policy(tmp_path):
    seen = []
    cfg = config(algo="a3c", max_steps=3000, out_dir=str(tmp_path))
    result = train_rl(cfg, callback=seen.append)
    assert result.stop_reason == "steps" and not result.solved
    assert result.env_steps >= 3000 and result.updates > 0 and result.episodes > 0
    assert result.episodes == len(seen) and result.missed_episodes == 0
    # Every episode of every worker, each once, in the order they ended.
    assert {e["worker"] for e in seen} == {0, 1}
    assert sorted((e["worker"], e["episode"]) for e in seen) == sorted(
        (w, i) for w in (0, 1) for i in range(sum(e["worker"] == w for e in seen))
    )
    assert [e["time"] for e in seen] == sorted(e["time"] for e in seen)
    run_dir = tmp_path / next(p.name for p in tmp_path.iterdir())
    lines = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    assert len(lines) == result.episodes
    assert all({"worker", "return", "length", "time"} <= line.keys() for line in lines)
    assert all(line["return"] == line["length"] for line in lines)  # CartPole: +1 per step
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["result"]["env_steps"] == result.env_steps and doc["config"]["algo"] == "a3c"
    assert (run_dir / "reward_curve.png").stat().st_size > 0
    ev = evaluate(str(run_dir / "policy.pt"), episodes=3)
    assert len(ev.returns) == 3 and ev.mean_return >= 1
    assert no_children_left()


def test_dqn_smoke_fills_pools_and_pushes_updates():
    cfg = config(algo="dqn", max_steps=2000, learning_starts=200, batch_size=32, update_steps=5)
    result = train_rl(cfg)
    assert result.stop_reason == "steps"
    assert result.updates > 0 and all(w["steps"] > 0 for w in result.workers)
    assert all(w["nonfinite"] == 0 for w in result.workers)
    assert np.all(np.isfinite(np.concatenate([p.ravel() for p in result.params.values()])))
    assert no_children_left()


@pytest.mark.parametrize("policy", ["po1", "striped"])
def test_a3c_under_a_locking_policy_with_an_env_factory(policy):
    result = train_rl(config(policy=policy, max_steps=1000), env=short_cartpole)
    assert result.updates > 0 and result.episodes > 0
    assert result.env == "CartPole-v1"
    assert no_children_left()


def test_callback_stops_the_run():
    result = train_rl(config(max_seconds=60), callback=lambda ep: ep["episodes"] >= 5)
    assert result.stop_reason == "callback" and result.episodes >= 5
    assert no_children_left()


def test_target_return_stops_the_run():
    # Every CartPole episode returns at least 8, so a window of 3 reaches 5 at once.
    result = train_rl(config(target_return=5.0, window=3, max_seconds=60))
    assert result.stop_reason == "target" and result.solved
    assert result.seconds_to_target is not None and result.steps_to_target is not None


# -- the pieces ------------------------------------------------------------------------------


def test_parameters_are_views_of_the_flat_vector():
    model = build("a3c", 4, 2, 16)
    layout = Layout.from_torch(model)
    params, grad = np.zeros(layout.flat_size, np.float32), np.zeros(layout.flat_size, np.float32)
    bind(model, layout, params, grad)
    views = layout.unflatten(params)
    for name, p in model.named_parameters():
        assert p.data_ptr() == views[name].ctypes.data
    model(torch.ones(3, 4))[1].sum().backward()
    assert grad.any()  # backward() wrote into the flat gradient


def test_worker_r_seeds_its_environment_with_seed_plus_r():
    def first_obs(seed: int, rank: int) -> np.ndarray:
        group = EnvGroup("CartPole-v1", 1, seed, rank, 2, lambda r, n: None)
        group.close()
        return group.obs[0]

    expected = gym.make("CartPole-v1").reset(seed=7 + 1)[0]
    np.testing.assert_array_equal(first_obs(7, 1), expected)
    assert not np.array_equal(first_obs(7, 0), first_obs(7, 1))


def test_one_worker_equals_the_same_loop_with_torch_optim():
    # Reference: the worker's shared RMSProp on the segment computes what torch.optim.RMSprop
    # computes in one process, on the same rollouts (same seeds, one worker).
    cfg = config(workers=1, max_steps=20 * 8 * 2, policy="po1")
    result = train_rl(cfg)
    ref = single_process(cfg, target=float("inf"), max_seconds=60)
    assert result.updates == ref["updates"] == 20
    for name, p in ref["model"].named_parameters():
        np.testing.assert_allclose(
            result.params[name], p.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name
        )


def test_benchmark_contenders_reach_a_low_target():
    for workers in (0, 2):  # the single process and paramserver
        row = solve("a3c", workers, 0, target=40.0, budget=60.0)
        assert row["reached"] and row["seconds"] > 0 and row["env_steps"] > 0, row
        assert row["curve"] and row["curve"][-1][1] >= 40.0


# -- errors ------------------------------------------------------------------------------------


def test_environment_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown environment 'NoSuchEnv-v0'"):
        train_rl(config(env="NoSuchEnv-v0"))
    with pytest.raises(ValueError, match="needs a Discrete one"):
        train_rl(config(algo="dqn", env="Pendulum-v1"))
    with pytest.raises(ValueError, match="needs a Discrete one"):
        train_rl(config(algo="a3c", env="MountainCarContinuous-v0"))
    with pytest.raises(TypeError, match="could not be pickled"):
        train_rl(config(), env=lambda: gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="eps_end <= eps_start"):
        config(eps_start=0.1, eps_end=0.5)


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "paramserver", "rl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def test_cli_trains_then_evaluates(tmp_path):
    proc = cli("--workers", "2", "--max-steps", "2000", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "episodes" in proc.stdout and "steps/s" in proc.stdout
    (run_dir,) = tmp_path.iterdir()
    proc = cli("--evaluate", str(run_dir / "policy.pt"), "--eval-episodes", "2")
    assert proc.returncode == 0, proc.stderr
    assert "2 episodes of CartPole-v1: mean return" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env", "NoSuchEnv-v0"], "unknown environment"),
        (["--algo", "dqn", "--env", "Pendulum-v1"], "Discrete"),
        (["--evaluate", "/nonexistent/policy.pt"], "no policy file"),
        (["--workers", "0"], "workers must be at least 1"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args, message):
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_importing_paramserver_imports_neither_torch_nor_gymnasium():
    code = "import sys, paramserver.rl; print('torch' in sys.modules, 'gymnasium' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


# -- the long run --------------------------------------------------------------------------------

SOLVE_BUDGET = 180.0
"""Seconds of training the README promises for CartPole-v1 with A3C and 2 workers."""


@pytest.mark.slow
@pytest.mark.timeout(SOLVE_BUDGET + 120)
def test_a3c_with_2_workers_solves_cartpole():
    result = train_rl(RLConfig(algo="a3c", workers=2, max_seconds=SOLVE_BUDGET, out_dir="", progress=False))
    assert result.stop_reason == "target", result.summary()
    assert result.mean_return is not None and result.mean_return >= 475.0
    assert no_children_left()
