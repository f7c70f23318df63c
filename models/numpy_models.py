"""NumPy models with hand-written gradients: softmax regression and an MLP.

A NumPy model holds no parameters itself: it is handed a dict of arrays (views
of the shared flat vector) on every call, and writes its gradient into
another dict of views (of the worker's flat gradient buffer), so neither the
forward nor the backward pass copies parameters.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits (n, c)`` against labels ``y``, and d loss / d logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)  # z is now the softmax
    n = len(y)
    rows = np.arange(n)
    loss = float(-np.log(np.maximum(z[rows, y], 1e-30)).mean())
    z[rows, y] -= 1.0
    z /= n
    return loss, z


class NumpyModel(ABC):
    """Parameters by name and shape; forward and backward on views of them."""

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in layout order."""

    @abstractmethod
    def init(self, rng: np.random.Generator) -> Arrays:
        """Fresh float32 parameters."""

    @abstractmethod
    def forward(self, params: Arrays, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """Logits for ``x`` and whatever backward needs."""

    @abstractmethod
    def backward(self, params: Arrays, cache: Any, dlogits: np.ndarray, grads: Arrays) -> None:
        """Write d loss / d param into ``grads`` (overwriting it)."""

    def loss_and_grad(self, params: Arrays, x: np.ndarray, y: np.ndarray, grads: Arrays) -> float:
        logits, cache = self.forward(params, x)
        loss, dlogits = softmax_cross_entropy(logits, y)
        self.backward(params, cache, dlogits, grads)
        return loss


def _uniform(rng: np.random.Generator, fan_in: int, shape: tuple[int, ...]) -> np.ndarray:
    # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


@dataclass
class SoftmaxRegression(NumpyModel):
    """``logits = x @ W + b``."""

    in_features: int
    classes: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.in_features, self.classes), "b": (self.classes,)}

    def init(self, rng: np.random.Generator) -> Arrays:
        return {name: np.zeros(shape, np.float32) for name, shape in self.shapes().items()}

    def forward(self, params: Arrays, x: np.ndarray) -> tuple[np.ndarray, Any]:
        x = x.reshape(len(x), -1)
        return x @ params["W"] + params["b"], x

    def backward(self, params: Arrays, cache: Any, dlogits: np.ndarray, grads: Arrays) -> None:
        np.matmul(cache.T, dlogits, out=grads["W"])
        np.sum(dlogits, axis=0, out=grads["b"])


@dataclass
class NumpyMLP(NumpyModel):
    """``layers`` hidden ReLU layers of ``hidden`` units, then logits."""

    in_features: int
    classes: int
    hidden: int = 64
    layers: int = 1

    def _dims(self) -> list[int]:
        return [self.in_features] + [self.hidden] * self.layers + [self.classes]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        dims = self._dims()
        for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
            out[f"W{i}"] = (a, b)
            out[f"b{i}"] = (b,)
        return out

    def init(self, rng: np.random.Generator) -> Arrays:
        out = {}
        dims = self._dims()
        for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
            out[f"W{i}"] = _uniform(rng, a, (a, b))
            out[f"b{i}"] = _uniform(rng, a, (b,))
        return out

    def forward(self, params: Arrays, x: np.ndarray) -> tuple[np.ndarray, Any]:
        h = x.reshape(len(x), -1)
        acts = [h]
        n = len(self._dims()) - 1
        for i in range(n):
            h = h @ params[f"W{i}"] + params[f"b{i}"]
            if i < n - 1:
                np.maximum(h, 0, out=h)
                acts.append(h)
        return h, acts

    def backward(self, params: Arrays, cache: Any, dlogits: np.ndarray, grads: Arrays) -> None:
        acts = cache
        d = dlogits
        for i in reversed(range(len(acts))):
            np.matmul(acts[i].T, d, out=grads[f"W{i}"])
            np.sum(d, axis=0, out=grads[f"b{i}"])
            if i > 0:
                d = d @ params[f"W{i}"].T
                d *= acts[i] > 0  # ReLU: acts[i] is the post-ReLU activation


def build(name: str, input_shape: tuple[int, ...], classes: int, hidden: int = 64) -> NumpyModel:
    features = math.prod(input_shape)
    if name == "softmax":
        return SoftmaxRegression(features, classes)
    if name == "mlp":
        return NumpyMLP(features, classes, hidden)
    raise ValueError(f"unknown numpy model {name!r}; choose one of mlp, softmax")
