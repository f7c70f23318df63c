"""Small PyTorch networks for reinforcement learning on vector observations.

Both take a batch of flat observations ``(B, obs_dim)`` float32. Their only
parameters are trainable ones (no buffers), so a flat layout of them is the
whole model, as the parameter server needs.
"""

from __future__ import annotations

import torch
from torch import nn

ALGOS = ("a3c", "dqn")


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


class ActorCritic(nn.Module):
    """Separate policy and value MLPs (``hidden`` tanh units, two layers each).

    Separate bodies, as in stable-baselines3's A2C for classic control: with a
    shared body the value loss, whose scale grows with the returns, drowns the
    policy gradient.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.pi = _mlp([obs_dim, hidden, hidden, n_actions])
        self.v = _mlp([obs_dim, hidden, hidden, 1])

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits ``(B, n_actions)`` and state values ``(B,)``."""
        return self.pi(obs), self.v(obs).squeeze(-1)

    def act_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """What a policy needs to act: the logits alone."""
        return self.pi(obs)


class QNetwork(nn.Module):
    """Action values ``(B, n_actions)`` from a two-layer ReLU MLP."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 128):
        super().__init__()
        self.q = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_actions),
        )  # fmt: skip

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(obs)

    def act_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Greedy action = argmax of these (the Q-values)."""
        return self.q(obs)


def build(algo: str, obs_dim: int, n_actions: int, hidden: int) -> nn.Module:
    """The network ``algo`` trains: an actor-critic for a3c, a Q-network for dqn."""
    if algo == "a3c":
        return ActorCritic(obs_dim, n_actions, hidden)
    if algo == "dqn":
        return QNetwork(obs_dim, n_actions, hidden)
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
