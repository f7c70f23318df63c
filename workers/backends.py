"""Backends: how a worker computes a loss and a flat gradient with a given framework.

A backend is built on two flat vectors it does not own: ``params`` (a view of
the shared segment) and ``grad`` (the worker's own gradient buffer). After
``forward(x, y)`` returns the batch loss, ``backward()`` leaves the whole
gradient in ``grad``; nothing is copied in between. Frameworks are imported
here, inside the worker, only when asked for.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.layout import Layout


@dataclass
class ModelSpec:
    """What a worker needs to rebuild the model: sent once, when the worker starts.

    ``payload`` is the pickled ``torch.nn.Module`` for torch (its parameter
    values are not used: they are replaced by views of the segment), the
    pickled ``KerasModel`` (a factory) for tf, or the ``NumpyModel`` itself.
    ``loss`` is a picklable ``loss(logits, labels)`` for torch (default
    cross-entropy), ``loss(labels, logits)`` as in Keras for tf (default sparse
    categorical cross-entropy from logits).
    """

    backend: str
    payload: Any
    loss: Callable[..., Any] | None = None

    def via_file(self, directory: str) -> ModelSpec:
        """This spec with a bytes payload moved to a private file (read by ``load``).

        Large pickles must not travel in a spawned worker's start-up pipe: a
        worker that dies before reading all of it leaves its parent blocked in
        ``Process.start()`` for ever (the parent holds the pipe's read end too).
        """
        if not isinstance(self.payload, bytes):
            return self
        fd, path = tempfile.mkstemp(prefix="model-", suffix=".pkl", dir=directory)  # mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(self.payload)
        return ModelSpec(self.backend, _PayloadFile(path), self.loss)

    def load(self) -> Any:
        """The model object (unpickled from bytes or from the file of ``via_file``)."""
        payload = self.payload
        if isinstance(payload, _PayloadFile):
            with open(payload.path, "rb") as f:
                payload = f.read()
        return pickle.loads(payload) if isinstance(payload, bytes) else payload


@dataclass(frozen=True)
class _PayloadFile:
    path: str


class Backend(ABC):
    @abstractmethod
    def forward(self, x: np.ndarray, y: np.ndarray) -> float:
        """Loss of the batch; keeps what ``backward`` needs."""

    @abstractmethod
    def backward(self) -> None:
        """Write the gradient of the last ``forward`` into the flat gradient buffer."""

    @abstractmethod
    def predict(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Logits for ``x`` with the current parameters (no gradient), using at most
        ``threads`` threads of the framework's own pool if given."""


CALIBRATION_SAMPLES = 1024
"""Training inputs from which a model's batch-norm statistics are re-estimated."""


def recalibrate_batch_norm(model: Any, x: np.ndarray, batch: int = 256) -> bool:
    """Set the running statistics of every batch-norm layer of a torch ``model`` to those of
    ``x`` under the current parameters (a cumulative average over batches of ``x``); the
    parameters are untouched. Returns whether the model had such layers.

    Buffers are not shared between workers: each worker's follow its own batches, and the
    model the server holds still has the initial ones (mean 0, variance 1), which would
    make its predictions, and the test accuracy, meaningless."""
    import torch

    norm = torch.nn.modules.batchnorm._NormBase
    layers = [m for m in model.modules() if isinstance(m, norm) and m.track_running_stats]
    if not layers:
        return False
    was_training = model.training
    saved = [m.momentum for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return True


class TorchBackend(Backend):
    """Zero copy: every ``param.data`` is a view of the segment, every ``param.grad``
    a view of the flat gradient buffer, so ``backward()`` writes the flat gradient.

    ``calibration`` (training inputs; set by the server for its own copy of the model):
    ``predict`` first re-estimates the batch-norm statistics from them, see
    :func:`recalibrate_batch_norm`."""

    calibration: np.ndarray | None = None

    def __init__(self, spec: ModelSpec, layout: Layout, params: np.ndarray, grad: np.ndarray | None):
        import torch

        model = spec.load()
        mine = Layout.from_torch(model)
        if mine.fingerprint != layout.fingerprint:
            raise ValueError("the model's parameters do not match the server's layout")
        self.torch = torch
        self.model = model
        self.grad = grad
        self.loss_fn = spec.loss or torch.nn.functional.cross_entropy
        views = layout.unflatten(params)
        gviews = layout.unflatten(grad) if grad is not None else {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                # Never call model.share_memory() after this: it would copy these
                # views into a new segment and silently end the sharing.
                p.data = torch.from_numpy(views[name])
                if grad is not None:
                    p.grad = torch.from_numpy(gviews[name])
        self._loss: Any = None

    def forward(self, x: np.ndarray, y: np.ndarray) -> float:
        torch = self.torch
        self._loss = self.loss_fn(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        return float(self._loss.detach())

    def backward(self) -> None:
        assert self.grad is not None, "backend built without a gradient buffer"
        # backward() accumulates into .grad in place (grad mode is off inside the
        # engine), so the views stay views; they must start from zero.
        self.grad.fill(0)
        self._loss.backward()
        self._loss = None

    def predict(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        torch = self.torch
        was_training, saved_threads = self.model.training, torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            if self.calibration is not None and not recalibrate_batch_norm(self.model, self.calibration):
                self.calibration = None  # no batch norm: nothing to re-estimate, ever
            self.model.eval()
            with torch.no_grad():
                return self.model(torch.from_numpy(x)).numpy()
        finally:
            torch.set_num_threads(saved_threads)
            self.model.train(was_training)


class NumpyBackend(Backend):
    """A ``NumpyModel`` reading views of the segment and writing views of the gradient."""

    def __init__(self, spec: ModelSpec, layout: Layout, params: np.ndarray, grad: np.ndarray | None):
        from paramserver.models.numpy_models import softmax_cross_entropy

        self.model = spec.payload
        self.xent = softmax_cross_entropy
        self.params = layout.unflatten(params)
        self.grads = layout.unflatten(grad) if grad is not None else {}
        self._pending: Any = None

    def forward(self, x: np.ndarray, y: np.ndarray) -> float:
        logits, cache = self.model.forward(self.params, x)
        loss, dlogits = self.xent(logits, y)
        self._pending = (cache, dlogits)
        return loss

    def backward(self) -> None:
        cache, dlogits = self._pending
        self._pending = None
        self.model.backward(self.params, cache, dlogits, self.grads)

    def predict(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        return self.model.forward(self.params, x)[0]  # BLAS threads: limited by the caller


def make_backend(
    spec: ModelSpec,
    layout: Layout,
    params: np.ndarray,
    grad: np.ndarray | None = None,
    *,
    config: Any = None,
    rank: int = 0,
) -> Backend:
    """The backend of ``spec``; a worker passes its ``config`` and ``rank`` (the tf backend
    takes its device and when to compute the gradient from them)."""
    if spec.backend == "tf":
        from .tf_backend import GRADIENT_IN_FORWARD, TFBackend

        if config is None:
            return TFBackend(spec, layout, params, grad)
        fused = config.policy in GRADIENT_IN_FORWARD
        return TFBackend(spec, layout, params, grad, device=config.device_of(rank), fused=fused)
    if spec.backend == "torch":
        return TorchBackend(spec, layout, params, grad)
    if spec.backend == "numpy":
        return NumpyBackend(spec, layout, params, grad)
    raise ValueError(f"unknown backend {spec.backend!r}; choose one of torch, tf, numpy")


def set_threads_and_seed(backend: str, threads: int, seed: int) -> None:
    """Size the framework's thread pool (before the first forward pass) and seed it
    (dropout and other randomness inside the model)."""
    if backend == "torch":
        import torch

        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or work already ran in this process
            pass
    elif backend == "tf":
        from .tf_backend import set_threads_and_seed as tf_threads_and_seed

        tf_threads_and_seed(threads, seed)
