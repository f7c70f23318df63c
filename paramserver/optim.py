"""Update rules on the flat parameter vector, in place, a few vectorized passes each.

A rule updates ``params[lo:hi]`` from ``grad[lo:hi]`` and its state slots over
the same range, so a policy can hand it the whole vector or one stripe. The
arithmetic follows ``torch.optim`` (same formulas, same defaults), so a run
with one worker can be compared with plain PyTorch training.

Nothing here allocates per step: temporaries go to scratch buffers the worker
allocates once (``scratch`` rows, each as long as the parameter vector).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


class UpdateRule(ABC):
    """``apply(p, g, state, t, lr, scratch)``: one step on a range of the flat vector."""

    name: ClassVar[str]
    state_slots: ClassVar[int] = 0
    """Rows of optimizer state (momentum, moments) per parameter."""
    scratch_slots: ClassVar[int] = 1
    """Rows of process-local temporaries the rule needs."""

    @abstractmethod
    def apply(
        self,
        p: np.ndarray,
        g: np.ndarray,
        state: np.ndarray,
        t: int,
        lr: float,
        scratch: np.ndarray,
    ) -> None:
        """Update ``p`` in place. ``state`` is ``(state_slots, n)``, ``scratch``
        ``(scratch_slots, n)``; ``t`` is the 1-based step number (bias correction)."""


@dataclass
class SGD(UpdateRule):
    """``torch.optim.SGD``: momentum, Nesterov, L2 weight decay (dampening 0)."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name: ClassVar[str] = "sgd"
    scratch_slots: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov needs momentum > 0 (e.g. --momentum 0.9)")

    @property
    def state_slots(self) -> int:  # type: ignore[override]
        return 1 if self.momentum else 0

    def apply(self, p, g, state, t, lr, scratch):  # type: ignore[no-untyped-def]
        d = g
        if self.weight_decay:
            d = np.multiply(p, self.weight_decay, out=scratch[0])
            d += g
        if self.momentum:
            buf = state[0]
            buf *= self.momentum
            buf += d  # first step: buf = g, as torch (buf starts at zero)
            if self.nesterov:
                tmp = np.multiply(buf, self.momentum, out=scratch[1])
                tmp += d
                d = tmp
            else:
                d = buf
        step = np.multiply(d, lr, out=scratch[1])
        p -= step


@dataclass
class Adam(UpdateRule):
    """``torch.optim.Adam`` (L2 weight decay) or, with ``decoupled``, ``AdamW``."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    name: ClassVar[str] = "adam"
    state_slots: ClassVar[int] = 2
    scratch_slots: ClassVar[int] = 2

    def __post_init__(self) -> None:
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                raise ValueError(f"{b} must be in [0, 1), got {getattr(self, b)}")

    def apply(self, p, g, state, t, lr, scratch):  # type: ignore[no-untyped-def]
        m, v = state[0], state[1]
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - lr * self.weight_decay
            else:
                g = np.add(g, np.multiply(p, self.weight_decay, out=scratch[0]), out=scratch[0])
        # v before m, on purpose: with state shared lock-free (po3), another worker
        # that sees this worker's m must also see its v (x86 keeps stores in order), or
        # where its own gradient is zero it divides this m by sqrt(0) + eps and jumps.
        sq = np.multiply(g, g, out=scratch[1])
        v *= self.beta2
        sq *= 1.0 - self.beta2
        v += sq
        # m += (1 - b1) * (g - m), which is torch's lerp
        d = np.subtract(g, m, out=scratch[1])
        d *= 1.0 - self.beta1
        m += d
        bc1 = 1.0 - self.beta1**t
        bc2 = 1.0 - self.beta2**t
        denom = np.sqrt(v, out=scratch[1])
        denom /= math.sqrt(bc2)
        denom += self.eps
        np.divide(m, denom, out=denom)
        denom *= lr / bc1
        p -= denom


@dataclass
class RMSProp(UpdateRule):
    """``torch.optim.RMSprop`` (not centered, no momentum); the A3C optimizer."""

    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: ClassVar[str] = "rmsprop"
    state_slots: ClassVar[int] = 1
    scratch_slots: ClassVar[int] = 2

    def apply(self, p, g, state, t, lr, scratch):  # type: ignore[no-untyped-def]
        v = state[0]
        if self.weight_decay:
            g = np.add(g, np.multiply(p, self.weight_decay, out=scratch[0]), out=scratch[0])
        sq = np.multiply(g, g, out=scratch[1])
        sq *= 1.0 - self.alpha
        v *= self.alpha
        v += sq
        denom = np.sqrt(v, out=scratch[1])
        denom += self.eps
        np.divide(g, denom, out=denom)
        denom *= lr
        p -= denom


UPDATE_BLOCK = 16384
"""Elements a rule handles per call in :class:`Updater` (64 KiB of float32 a row)."""


class Updater:
    """Applies a rule to ranges of one flat vector, block by block.

    A rule makes several passes (Adam: 13); over blocks of ``block`` elements
    they stay in cache instead of streaming whole-vector temporaries through
    memory, and the scratch rows are one block long instead of one vector.
    Set ``t`` (1-based step) and ``lr`` before each step.
    """

    def __init__(
        self,
        rule: UpdateRule,
        params: np.ndarray,
        grad: np.ndarray,
        state: np.ndarray,
        lr: float,
        block: int = UPDATE_BLOCK,
    ):
        assert state.shape == (rule.state_slots, params.size), "state must be (slots, params)"
        self.rule, self.params, self.grad, self.state = rule, params, grad, state
        self.block = block
        self.scratch = np.zeros((rule.scratch_slots, min(block, params.size)), params.dtype)
        self.t = 1
        self.lr = lr

    def __call__(self, a: int, b: int) -> None:
        rule, p, g, state, scratch, t, lr = (
            self.rule,
            self.params,
            self.grad,
            self.state,
            self.scratch,
            self.t,
            self.lr,
        )
        for lo in range(a, b, self.block):
            hi = min(lo + self.block, b)
            rule.apply(p[lo:hi], g[lo:hi], state[:, lo:hi], t, lr, scratch[:, : hi - lo])


RULES = ("sgd", "adam", "adamw", "rmsprop")


def make_rule(
    name: str,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    alpha: float = 0.99,
) -> UpdateRule:
    """The update rule called ``name`` (one of :data:`RULES`)."""
    if name == "sgd":
        return SGD(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        return Adam(betas[0], betas[1], eps, weight_decay, decoupled=name == "adamw")
    if name == "rmsprop":
        return RMSProp(alpha=alpha, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(RULES)}")
