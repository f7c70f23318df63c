"""NumPy models with hand-written gradients: softmax and linear regression, an MLP,
sparse logistic regression and matrix factorization (row-sparse gradients).

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
RowGrads = dict[str, tuple[np.ndarray, np.ndarray]]
"""Row gradients by table name: (row indices (k,), values (k, row length))."""


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


def mean_squared_error(outputs: np.ndarray, targets: Any) -> tuple[float, np.ndarray]:
    """Mean over every value of ``(outputs - targets)**2`` (as ``torch.nn.functional.mse_loss``),
    and d loss / d outputs; a scalar target per sample meets an (n, 1) output."""
    if isinstance(targets, dict):
        raise ValueError(
            "mean squared error against named inputs: an unsupervised NumPy model takes one array"
        )
    t = np.asarray(targets, dtype=np.float32)
    if t.size != outputs.size:
        raise ValueError(f"the model's outputs {outputs.shape[1:]} do not match the targets {t.shape[1:]}")
    diff = outputs - t.reshape(outputs.shape)
    return float(np.mean(diff * diff)), diff * np.float32(2.0 / diff.size)


def loss_for_task(task: str) -> Any:
    """The built-in loss of a NumPy model for ``task``: ``loss(outputs, targets) -> (loss,
    d loss / d outputs)``."""
    return softmax_cross_entropy if task == "classify" else mean_squared_error


class NumpyModel(ABC):
    """Parameters by name and shape; forward and backward on views of them."""

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in layout order."""

    @abstractmethod
    def init(self, rng: np.random.Generator) -> Arrays:
        """Fresh float32 parameters."""

    @abstractmethod
    def forward(self, params: Arrays, x: Any) -> tuple[np.ndarray, Any]:
        """Outputs (logits) for ``x`` (an array, or a dict of named arrays for a model of
        several inputs) and whatever backward needs."""

    @abstractmethod
    def backward(self, params: Arrays, cache: Any, dlogits: np.ndarray, grads: Arrays) -> RowGrads | None:
        """Write d loss / d param into ``grads`` (overwriting it), except for the tensors of
        :meth:`sparse_tensors`: return their gradients as ``{name: (indices, values)}``,
        ``values[i]`` the gradient of row ``indices[i]`` (repeats are summed)."""

    def sparse_tensors(self) -> tuple[str, ...]:
        """Tables (2-D) whose gradient ``backward`` returns as rows; not in ``grads``."""
        return ()

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
class LinearRegression(NumpyModel):
    """``outputs = x @ W + b``, trained on the mean squared error (float targets of
    ``outputs`` values per sample): the affine map of :class:`SoftmaxRegression`."""

    in_features: int
    outputs: int = 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.in_features, self.outputs), "b": (self.outputs,)}

    init = SoftmaxRegression.init
    forward = SoftmaxRegression.forward
    backward = SoftmaxRegression.backward


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


@dataclass
class MatrixFactorization(NumpyModel):
    """Matrix factorization on (user, item) pairs: the Hogwild! paper's Netflix-style task.

    ``ratings=False``: a classifier, ``score = U[user] . V[item] + b`` with logits
    ``(0, score)``, so the softmax cross-entropy is the logistic loss (e.g. label 1 for a
    rating of 4 or more). ``ratings=True``: a regression on the rating itself (float
    targets, mean squared error; the test loss is the MSE, its root the RMSE), the
    biased model ``bu[user] + bi[item] + p[user] . q[item]``, one output; the biases
    are the last column of each table (``U = [p, bu]``, ``V = [q, bi]``), so a step
    pushes two tables' rows, not four. It has no global bias: a dense scalar that every
    step moves by ``2 lr`` times the batch's mean error is at the edge of stability
    once an update is one step stale (two workers at lr 0.5 diverged with it, even
    under po1), while the row biases, each moved by the few samples of its row, learn
    the mean as safely as the factors do.

    Input: int ``(batch, 2)`` of (user id, item id). ``U`` and ``V`` get row gradients:
    a step touches the rows of its batch's users and items only."""

    users: int
    items: int
    dim: int = 16
    ratings: bool = False

    def shapes(self) -> dict[str, tuple[int, ...]]:
        width = self.dim + self.ratings
        tables = {"U": (self.users, width), "V": (self.items, width)}
        return tables if self.ratings else tables | {"b": (1,)}

    def sparse_tensors(self) -> tuple[str, ...]:
        return ("U", "V")

    def init(self, rng: np.random.Generator) -> Arrays:
        # Ratings: small factors and zero biases, so that the biases fit the mean first
        # (the usual start of SGD matrix factorization); the classifier starts at
        # unit-variance scores.
        scale = 0.1 if self.ratings else 1.0 / math.sqrt(self.dim)
        out = {}
        for name, rows in (("U", self.users), ("V", self.items)):
            table = np.zeros((rows, self.dim + self.ratings), np.float32)
            table[:, : self.dim] = scale * rng.standard_normal((rows, self.dim))
            out[name] = table
        return out if self.ratings else out | {"b": np.zeros(1, np.float32)}

    def forward(self, params: Arrays, x: np.ndarray) -> tuple[np.ndarray, Any]:
        if x.ndim != 2 or x.shape[1] != 2 or x.dtype.kind not in "iu":
            raise ValueError(
                f"MatrixFactorization takes int (user, item) pairs (batch, 2), got {x.dtype} {x.shape}"
            )
        u, i = x[:, 0], x[:, 1]
        pu, qi = params["U"][u], params["V"][i]  # gathers: copies of the batch's rows only
        d = self.dim
        score = np.einsum("nd,nd->n", pu[:, :d], qi[:, :d])
        if self.ratings:
            score += pu[:, d] + qi[:, d]
            return score[:, None], (u, i, pu, qi)
        logits = np.zeros((len(x), 2), np.float32)
        logits[:, 1] = score + params["b"][0]
        return logits, (u, i, pu, qi)

    def backward(self, params: Arrays, cache: Any, dlogits: np.ndarray, grads: Arrays) -> RowGrads:
        u, i, pu, qi = cache
        # d loss / d score: the one output, or logit 1 (logit 0 is the constant 0)
        d = dlogits[:, -1:]
        gu, gi = d * qi, d * pu  # d score / d p = q and back; the bias columns' derivative is 1
        if self.ratings:
            gu[:, -1:] = gi[:, -1:] = d
        else:
            grads["b"][0] = d.sum()
        return {"U": (u, gu), "V": (i, gi)}


@dataclass
class SparseLogisticRegression(NumpyModel):
    """Logistic (softmax) regression on sparse rows (:class:`paramserver.data.CSR`): the
    Hogwild! paper's RCV1-style task. ``logits = x @ W + b`` computed over the stored
    values only; ``W`` gets row gradients, so a step reads and updates the rows of the
    features its batch has, never the whole ``(features, classes)`` table."""

    features: int
    classes: int = 2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.features, self.classes), "b": (self.classes,)}

    def sparse_tensors(self) -> tuple[str, ...]:
        return ("W",)

    def init(self, rng: np.random.Generator) -> Arrays:
        return {name: np.zeros(shape, np.float32) for name, shape in self.shapes().items()}

    def forward(self, params: Arrays, x: Any) -> tuple[np.ndarray, Any]:
        rows = x.rows()
        weighted = params["W"][x.indices] * x.data[:, None]  # (stored values, classes): a gather
        n = len(x)
        logits = np.empty((n, self.classes), np.float32)
        for k in range(self.classes):
            logits[:, k] = np.bincount(rows, weights=weighted[:, k], minlength=n)
        logits += params["b"]
        return logits, (rows, x.indices, x.data)

    def backward(self, params: Arrays, cache: Any, dlogits: np.ndarray, grads: Arrays) -> RowGrads:
        rows, indices, data = cache
        np.sum(dlogits, axis=0, out=grads["b"])
        return {"W": (indices, dlogits[rows] * data[:, None])}


def build(
    name: str,
    input_shape: tuple[int, ...],
    classes: int,
    hidden: int = 64,
    tokens: int = 0,
    task: str = "classify",
) -> NumpyModel:
    """``classes``: the outputs (classes, or the size of a target); ``tokens``: for ``mf``,
    the largest user or item id + 1 (both tables get that many rows); ``task``: for
    ``mf``, a classifier of 2 classes or a regression on one rating per pair."""
    features = math.prod(input_shape)
    if name == "mf":
        outputs = 2 if task == "classify" else 1
        if input_shape != (2,) or classes != outputs or tokens < 1 or task == "unsupervised":
            raise ValueError(
                "mf needs int (user, item) pairs, shape (samples, 2), and 2 classes or one float "
                f"rating per pair; got inputs {input_shape} and {classes} "
                f"{'classes' if task == 'classify' else 'targets'} ({task})"
            )
        return MatrixFactorization(tokens, tokens, dim=hidden, ratings=task == "regress")
    if name == "softmax":
        return SoftmaxRegression(features, classes)
    if name == "linear":
        return LinearRegression(features, classes)
    if name == "logreg":
        if len(input_shape) != 1:
            raise ValueError(
                f"logreg takes sparse rows (CSR) of one axis of features, got inputs {input_shape}"
            )
        return SparseLogisticRegression(features, classes)
    if name == "mlp":
        return NumpyMLP(features, classes, hidden)
    raise ValueError(f"unknown numpy model {name!r}; choose one of mlp, softmax, linear, logreg, mf")
