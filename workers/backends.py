"""Backends: how a framework turns a user's model into a spec, a loss and a flat gradient.

One interface, chosen by name (:data:`BACKENDS`, :func:`backend_class`,
:func:`backend_for`): each backend knows how to make its spec from a user's
model (:meth:`Backend.make_spec`, in the calling process), configure a worker
process (:meth:`Backend.configure`: threads, seed), forward/backward/predict,
and hand the trained model back (:meth:`Backend.hand_back`). Nothing outside
this registry asks which framework a model belongs to.

A backend instance is built on two flat vectors it does not own: ``params``
(a view of the shared segment) and ``grad`` (the worker's own gradient
buffer). After ``forward(x, y)`` returns the batch loss, ``backward()`` leaves
the gradient in ``grad`` and returns the row-sparse gradients of the tensors
named in :attr:`Backend.sparse` (embedding tables): those never get a dense
gradient, their part of ``grad`` is never written (so its pages are never
made resident). Frameworks are imported only when asked for.
"""

from __future__ import annotations

import importlib
import os
import pickle
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from paramserver import portable
from paramserver.layout import Layout
from paramserver.optim import coalesce
from paramserver.portable import ByValue
from paramserver.store import SparseRows


@dataclass
class ModelSpec:
    """What a worker needs to rebuild the model: sent once, when the worker starts.

    ``payload`` is the pickled ``torch.nn.Module`` for torch (its parameter
    values are not used: they are replaced by views of the segment), the
    pickled ``KerasModel`` (a factory) for tf, or the ``NumpyModel`` itself.
    Pickled with cloudpickle (:mod:`paramserver.portable`), so that definitions
    from a notebook or ``python -`` travel by value.
    ``loss`` is a picklable ``loss(logits, labels)`` for torch (default
    cross-entropy), ``loss(labels, logits)`` as in Keras for tf (default sparse
    categorical cross-entropy from logits).
    """

    backend: str
    payload: Any
    loss: Callable[..., Any] | None = None
    sparse: tuple[str, ...] = ()
    """Tensors whose gradients arrive as rows (the update rule must support rows)."""

    def via_file(self, directory: str) -> ModelSpec:
        """This spec with a bytes payload moved to a private file (read by ``load``).

        Large pickles must not travel in a spawned worker's start-up pipe: a
        worker that dies before reading all of it leaves its parent blocked in
        ``Process.start()`` for ever (the parent holds the pipe's read end too).
        """
        if isinstance(self.payload, _PayloadFile):
            return self
        # A NumPy model too: by value, it can outgrow the pipe, and a worker that hangs
        # while unpickling it would leave the server blocked in Process.start().
        data = self.payload if isinstance(self.payload, bytes) else portable.dumps(self.payload, "the model")
        fd, path = tempfile.mkstemp(prefix="model-", suffix=".pkl", dir=directory)  # mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ModelSpec(self.backend, _PayloadFile(path), self.loss, self.sparse)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A loss or a NumPy model defined in a notebook or ``python -`` has no module a
        # worker could import it from: those travel by value (cloudpickle). Bytes and
        # payload files are already what the worker needs.
        payload = self.payload
        if not isinstance(payload, bytes | _PayloadFile):
            payload = ByValue(payload, "the model")
        loss = None if self.loss is None else ByValue(self.loss, "the loss")
        return ModelSpec, (self.backend, payload, loss, self.sparse)

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
    """One framework: from the user's model to the worker's loss and gradient and back."""

    name: ClassVar[str]
    """Its key in :data:`BACKENDS`. An instance is built as ``cls(spec, layout, params, grad,
    config=None, rank=0)``: a worker passes its config and rank (the tf backend takes its
    device and when to compute the gradient from them)."""
    sparse: tuple[str, ...] = ()
    """Tensors whose gradient :meth:`backward` returns as rows instead of writing ``grad``."""

    start_method: ClassVar[str] = "spawn"
    """How its workers start: ``spawn`` or ``forkserver`` (see
    :func:`paramserver.supervise.worker_context`)."""
    preload: ClassVar[tuple[str, ...]] = ()
    forkserver_ok: ClassVar[bool] = False
    """Whether its workers may fork from a forkserver (TensorFlow's may not: it hangs after fork)."""
    """Modules a forkserver imports once for all its workers."""

    # -- in the calling process -------------------------------------------------------

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """Whether ``model`` is this framework's (checked without importing it)."""
        return False

    @classmethod
    def make_spec(
        cls, model: Any, loss: Callable[..., Any] | None, seed: int, data: Any
    ) -> tuple[ModelSpec, Layout, np.ndarray]:
        """The spec workers rebuild the model from, its layout and its initial flat vector."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse options this backend cannot honour (ValueError naming the fix)."""
        if getattr(config, "device_list", None):
            raise ValueError(f"devices apply to the tf backend only; the {cls.name} model runs on the CPU")

    @classmethod
    def hand_back(
        cls, model: Any, spec: ModelSpec, layout: Layout, params: dict[str, np.ndarray], data: Any
    ) -> Any:
        """The user's model holding the trained ``params`` (by name)."""
        return model

    @classmethod
    def seed_initial(cls, seed: int) -> None:
        """Import the framework (ImportError naming the extra to install) and seed the
        initial parameters of models built next in this process."""

    # -- in a worker --------------------------------------------------------------------

    @classmethod
    def configure(cls, threads: int, seed: int) -> None:
        """Size the framework's thread pool (before the first forward pass) and seed it
        (dropout and other randomness inside the model)."""

    def for_evaluation(self, data: Any) -> None:
        """Prepare this instance to score the live parameters (the server's copy)."""

    @abstractmethod
    def forward(self, x: np.ndarray, y: np.ndarray) -> float:
        """Loss of the batch; keeps what ``backward`` needs."""

    @abstractmethod
    def backward(self) -> list[SparseRows] | None:
        """Write the gradient of the last ``forward`` into the flat gradient buffer (its
        dense part), and return the coalesced rows of the tensors in :attr:`sparse`."""

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


def torch_sparse_names(model: Any) -> tuple[str, ...]:
    """Names of the parameters of ``model`` whose gradient torch makes sparse (the weights
    of ``nn.Embedding``/``nn.EmbeddingBag`` built with ``sparse=True``)."""
    import torch

    kinds = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, kinds) and m.sparse}
    return tuple(n for n, p in model.named_parameters() if id(p) in tables and p.requires_grad)


def torch_rows(grad: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of an uncoalesced sparse COO gradient of a table, as NumPy arrays.

    ``_indices()``/``_values()`` are private (checked with torch 2.x); the public
    ``indices()`` refuses an uncoalesced tensor and ``coalesce()`` would sort in torch,
    then again here: :func:`paramserver.optim.coalesce` does it once, compiled."""
    return grad._indices()[0].numpy(), grad._values().numpy()


def bind_torch(
    model: Any, layout: Layout, params: np.ndarray, grad: np.ndarray | None, sparse: tuple[str, ...] = ()
) -> None:
    """Make ``model``'s trainable parameters views of ``params`` and their gradients views
    of ``grad`` (zero copy: the model *is* the shared memory). The tensors in ``sparse``
    keep ``grad = None``: autograd then gives them a sparse gradient instead of adding
    it, densely, into a view as large as the table."""
    import torch

    views = layout.unflatten(params)
    gviews = layout.unflatten(grad) if grad is not None else {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            # Never call model.share_memory() after this: it would copy these
            # views into a new segment and silently end the sharing.
            p.data = torch.from_numpy(views[name])
            if grad is not None and name not in sparse:
                p.grad = torch.from_numpy(gviews[name])


class TorchBackend(Backend):
    """Zero copy: every ``param.data`` is a view of the segment, every ``param.grad``
    a view of the flat gradient buffer, so ``backward()`` writes the flat gradient.

    ``calibration`` (training inputs; set by the server for its own copy of the model):
    ``predict`` first re-estimates the batch-norm statistics from them, see
    :func:`recalibrate_batch_norm`."""

    name = "torch"
    # Spawned by default; with start_method "forkserver" forked from a forkserver that has
    # imported torch, so its 1.5-2.5 s import is paid once per session instead of once per
    # worker (benchmarks/startup.py). Not the default yet: the start-up fault tests
    # (tests/faults/test_workers.py) have not been made to pass under it.
    start_method = "spawn"
    forkserver_ok = True
    preload = ("torch",)
    calibration: np.ndarray | None = None

    def __init__(self, spec, layout, params, grad, *, config=None, rank=0):  # type: ignore[no-untyped-def]
        import torch

        model = spec.load()
        mine = Layout.from_torch(model)
        if mine.fingerprint != layout.fingerprint:
            raise ValueError("the model's parameters do not match the server's layout")
        self.torch = torch
        self.model = model
        self.grad = grad
        self.loss_fn = spec.loss or torch.nn.functional.cross_entropy
        self.sparse = torch_sparse_names(model)
        bind_torch(model, layout, params, grad, self.sparse)
        named = dict(model.named_parameters())
        # (parameter, flat offset, row length) of each table with row gradients.
        self._tables = [
            (named[n], layout[n].offset // layout.dtype.itemsize, int(np.prod(layout[n].shape[1:])))
            for n in self.sparse
        ]
        self._dense = layout.ranges_without(self.sparse)
        self._loss: Any = None

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return any(c.__module__.startswith("torch.") for c in type(model).__mro__) and _is_torch_module(model)

    @classmethod
    def make_spec(cls, model, loss, seed, data):  # type: ignore[no-untyped-def]
        layout = Layout.from_torch(model)
        layout.dtype  # noqa: B018 (raises for mixed dtypes, naming the fix)
        init = layout.flatten(
            {n: p.detach().cpu().numpy() for n, p in model.named_parameters() if p.requires_grad}
        )
        payload = portable.dumps(model, "the model")
        if loss is not None:
            portable.check(loss, "the loss")
        return ModelSpec("torch", payload, loss, torch_sparse_names(model)), layout, init

    @classmethod
    def hand_back(cls, model, spec, layout, params, data):  # type: ignore[no-untyped-def]
        import torch

        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in params:
                    p.copy_(torch.from_numpy(params[name]))
        recalibrate_batch_norm(model, data.x_train[:CALIBRATION_SAMPLES])
        return model

    @classmethod
    def seed_initial(cls, seed: int) -> None:
        try:
            import torch
        except ImportError:
            raise ImportError("PyTorch is not installed: pip install 'paramserver[torch]'") from None
        torch.manual_seed(seed)

    @classmethod
    def configure(cls, threads: int, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or work already ran in this process
            pass

    def for_evaluation(self, data: Any) -> None:
        self.calibration = data.x_train[:CALIBRATION_SAMPLES]  # batch-norm statistics, live

    def forward(self, x: np.ndarray, y: np.ndarray) -> float:
        torch = self.torch
        self._loss = self.loss_fn(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        return float(self._loss.detach())

    def backward(self) -> list[SparseRows]:
        assert self.grad is not None, "backend built without a gradient buffer"
        # backward() accumulates into .grad in place (grad mode is off inside the
        # engine), so the views stay views; they must start from zero. Only the dense
        # ranges: the tables' part of the buffer is never touched.
        for a, b in self._dense:
            self.grad[a:b].fill(0)
        self._loss.backward()
        self._loss = None
        out = []
        for p, offset, dim in self._tables:
            g, p.grad = p.grad, None  # the next backward must start from None again
            if g is None:
                continue
            rows, values = coalesce(*torch_rows(g))
            out.append(SparseRows(offset, dim, rows, values))
        return out

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

    name = "numpy"

    def __init__(self, spec, layout, params, grad, *, config=None, rank=0):  # type: ignore[no-untyped-def]
        from paramserver.models.numpy_models import softmax_cross_entropy

        self.model = spec.load()
        self.xent = softmax_cross_entropy
        self.params = layout.unflatten(params)
        self.sparse = tuple(self.model.sparse_tensors())
        # The tables' gradients come back as rows: their views are not handed out.
        grads = layout.unflatten(grad) if grad is not None else {}
        self.grads = {n: g for n, g in grads.items() if n not in self.sparse}
        itemsize = layout.dtype.itemsize
        self._tables = {
            n: (layout[n].offset // itemsize, int(np.prod(layout[n].shape[1:]))) for n in self.sparse
        }
        self._pending: Any = None

    @classmethod
    def accepts(cls, model: Any) -> bool:
        from paramserver.models.numpy_models import NumpyModel

        return isinstance(model, NumpyModel)

    @classmethod
    def make_spec(cls, model, loss, seed, data):  # type: ignore[no-untyped-def]
        if loss is not None:
            raise ValueError("NumPy models have a built-in softmax cross-entropy; do not pass loss")
        portable.check(model, "the model")
        init = model.init(np.random.default_rng(seed))
        layout = Layout.from_arrays(init)
        return ModelSpec("numpy", model, sparse=tuple(model.sparse_tensors())), layout, layout.flatten(init)

    def forward(self, x: np.ndarray, y: np.ndarray) -> float:
        logits, cache = self.model.forward(self.params, x)
        loss, dlogits = self.xent(logits, y)
        self._pending = (cache, dlogits)
        return loss

    def backward(self) -> list[SparseRows]:
        cache, dlogits = self._pending
        self._pending = None
        rows = self.model.backward(self.params, cache, dlogits, self.grads) or {}
        out = []
        for name, (indices, values) in rows.items():
            offset, dim = self._tables[name]
            r, v = coalesce(indices, np.asarray(values).reshape(len(indices), dim))
            out.append(SparseRows(offset, dim, r, v))
        return out

    def predict(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        return self.model.forward(self.params, x)[0]  # BLAS threads: limited by the caller


def _is_torch_module(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


BACKENDS = {
    "torch": "paramserver.workers.backends:TorchBackend",
    "tf": "paramserver.workers.tf_backend:TFBackend",
    "numpy": "paramserver.workers.backends:NumpyBackend",
}
"""The registry: backend name -> where its class lives (imported when first asked for,
so that nobody pays for a framework they do not use)."""


def backend_class(name: str) -> type[Backend]:
    """The backend called ``name`` (one of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def backend_for(model: Any) -> type[Backend]:
    """The backend whose framework ``model`` belongs to; TypeError naming the choices."""
    for name in BACKENDS:
        cls = backend_class(name)
        if cls.accepts(model):
            return cls
    raise TypeError(
        f"model must be a torch.nn.Module, a paramserver.KerasModel or a "
        f"paramserver.models.numpy_models.NumpyModel, got {type(model).__name__}"
    )


def make_backend(
    spec: ModelSpec,
    layout: Layout,
    params: np.ndarray,
    grad: np.ndarray | None = None,
    *,
    config: Any = None,
    rank: int = 0,
) -> Backend:
    """An instance of ``spec``'s backend on ``params`` (and ``grad``, in a worker)."""
    return backend_class(spec.backend)(spec, layout, params, grad, config=config, rank=rank)
