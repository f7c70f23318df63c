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
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from paramserver import portable
from paramserver.data import CSR, num_samples, take
from paramserver.layout import Layout
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
    ``loss`` is a picklable ``loss(outputs, targets)`` for torch, ``loss(targets,
    outputs)`` as in Keras for tf; for an unsupervised task the targets are the
    inputs. Its default follows the task: cross-entropy from logits for
    classification, mean squared error otherwise.
    """

    backend: str
    payload: Any
    loss: Callable[..., Any] | None = None
    sparse: tuple[str, ...] = ()
    """Tensors whose gradients arrive as rows (the update rule must support rows)."""
    task: str = "classify"
    """What the targets are (:data:`paramserver.data.TASKS`): it picks the default loss."""

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
        return ModelSpec(self.backend, _PayloadFile(path), self.loss, self.sparse, self.task)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A loss or a NumPy model defined in a notebook or ``python -`` has no module a
        # worker could import it from: those travel by value (cloudpickle). Bytes and
        # payload files are already what the worker needs.
        payload = self.payload
        if not isinstance(payload, bytes | _PayloadFile):
            payload = ByValue(payload, "the model")
        loss = None if self.loss is None else ByValue(self.loss, "the loss")
        return ModelSpec, (self.backend, payload, loss, self.sparse, self.task)

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
    """Modules a forkserver imports once for all its workers."""
    forkserver_ok: ClassVar[bool] = False
    """Whether its workers may fork from a forkserver (TensorFlow's may not: it hangs after fork)."""

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
    def forward(self, x: Any, y: np.ndarray | None) -> float:
        """Loss of the batch (``x`` one array or named arrays; ``y`` None for an unsupervised
        task: the loss compares the outputs with the inputs); keeps what ``backward`` needs."""

    @abstractmethod
    def backward(self) -> list[SparseRows] | None:
        """Write the gradient of the last ``forward`` into the flat gradient buffer (its
        dense part), and return the row gradients of the tensors in :attr:`sparse`
        (:func:`ids_and_values`: as the model gives them; the worker coalesces them where
        the update needs sorted rows)."""

    @abstractmethod
    def predict(self, x: Any, threads: int | None = None) -> np.ndarray:
        """Outputs (logits) for ``x`` with the current parameters (no gradient), using at
        most ``threads`` threads of the framework's own pool if given."""

    @abstractmethod
    def loss_of(self, outputs: np.ndarray, targets: Any) -> float:
        """The training loss of ``outputs`` (of :meth:`predict`) against ``targets``."""

    @classmethod
    def check_data(cls, spec: ModelSpec, layout: Layout, init: np.ndarray, data: Any) -> None:
        """Prove, before any worker starts, that the model takes the data: one forward and
        backward pass on two training samples, in this process, on a copy of the initial
        parameters. A failure is a ValueError saying what to change."""
        check_loss_for_task(spec)
        grad = np.zeros_like(init)
        # A copy of the model: the user's own object (a NumPy model is the payload) must not
        # keep any state of this pass.
        backend = cls(pickle.loads(pickle.dumps(spec)), layout, init.copy(), grad)
        x = take(data.x_train, slice(0, 2))
        y = None if data.y_train is None else np.asarray(data.y_train[:2])
        try:
            outputs = np.asarray(backend.predict(x))
        except Exception as e:  # the user's model: anything can come out
            raise ValueError(_data_hint(spec, data, e)) from e
        _check_outputs(spec, data, outputs)
        try:
            backend.forward(x, y)
            backend.backward()
        except Exception as e:  # the user's model or loss
            raise ValueError(_data_hint(spec, data, e)) from e


CLASSIFICATION_LOSSES = ("cross_entropy", "CrossEntropyLoss", "nll_loss", "NLLLoss",
    "SparseCategoricalCrossentropy", "sparse_categorical_crossentropy", "CategoricalCrossentropy",
    "categorical_crossentropy")  # fmt: skip
"""Losses that take class labels (torch's and Keras' names): wrong for float targets."""


def _loss_name(loss: Any) -> str:
    if isinstance(loss, str):
        return loss
    return getattr(loss, "__name__", None) or type(loss).__name__


def check_loss_for_task(spec: ModelSpec) -> None:
    """Refuse a loss that cannot fit the task: a classification loss on float targets or
    on none, or no loss for named inputs without targets."""
    if spec.task == "classify" or spec.loss is None:
        return
    name = _loss_name(spec.loss)
    if name in CLASSIFICATION_LOSSES:
        targets = (
            "float targets (task 'regress')" if spec.task == "regress" else "no targets (task 'unsupervised')"
        )
        raise ValueError(
            f"the loss {name} takes class labels, but the data has {targets}: give integer class labels "
            "for classification, or a regression loss (the default for this task is mean squared error; "
            "leave loss unset)"
        )


def _check_outputs(spec: ModelSpec, data: Any, outputs: np.ndarray) -> None:
    """The model's outputs for a batch must fit the task: a logit per class, a value per
    target value, or (unsupervised, default loss) a value per input value."""
    per_sample = tuple(outputs.shape[1:])
    if data.task == "classify":
        fits, wanted = per_sample == (data.classes,), f"{data.classes} logits"
    elif data.task == "regress":
        fits = int(np.prod(per_sample)) == int(np.prod(data.target_shape))
        wanted = f"outputs shaped {data.target_shape or (1,)}"
    elif spec.loss is None and not isinstance(data.x_train, dict):
        fits = int(np.prod(per_sample)) == int(np.prod(data.input_shape))
        wanted = f"outputs shaped like its inputs {data.input_shape} (the default loss compares them)"
    else:
        return  # the user's loss decides
    if not fits:
        raise ValueError(
            f"the model gives outputs shaped {per_sample} per sample, but the task {data.task!r} needs "
            f"{wanted}: change the model's last layer"
        )


def _data_hint(spec: ModelSpec, data: Any, e: Exception) -> str:
    """What to change when a model fails on its first batch of the data."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    if isinstance(data.x_train, dict) and isinstance(e, TypeError):
        names = ", ".join(data.x_train)
        return (
            f"the model does not take the data's named inputs ({names}) ({text}); a model of several "
            f"inputs takes them by name (torch: forward(self, {names}); Keras: a dict of keras.Input "
            "with these names), or pass one array"
        )
    wanted = {
        "classify": f"{data.classes} logits",
        "regress": f"outputs shaped {data.target_shape or '(1,)'}",
    }
    outputs = wanted.get(data.task, "outputs the loss compares with the inputs")
    return (
        f"the model cannot train on this data ({text}); the inputs are {data.input_shape} per sample "
        f"and the task {data.task!r} needs {outputs}: check the model's input and output sizes and the loss"
    )


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
            for i in range(0, num_samples(x), batch):
                torch_call(model, take(x, slice(i, i + batch)))
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return True


def torch_call(model: Any, x: Any) -> Any:
    """``model`` on ``x``: one tensor, named tensors as keyword arguments, or sparse rows
    as ``(indices, offsets, per_sample_weights)`` (``nn.EmbeddingBag``'s arguments)."""
    import torch

    if isinstance(x, CSR):
        offsets = torch.from_numpy(np.ascontiguousarray(x.indptr[:-1]))
        return model(torch.from_numpy(x.indices), offsets, torch.from_numpy(x.data))
    if isinstance(x, dict):
        return model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.items()})
    return model(torch.from_numpy(np.ascontiguousarray(x)))


def torch_target(y: Any, out: Any) -> Any:
    """``y`` as what the loss compares ``out`` with: the targets, or the inputs (one array
    or named ones) for an unsupervised task; a scalar per sample is shaped like an (n, 1)
    output."""
    import torch

    if isinstance(y, dict):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in y.items()}
    t = torch.from_numpy(np.ascontiguousarray(y))
    if t.dtype.is_floating_point and t.shape != out.shape and t.numel() == out.numel():
        t = t.reshape(out.shape)
    return t


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
    where the worker may need no sort (:func:`paramserver.optim.coalesce`, compiled, if it
    does)."""
    return grad._indices().numpy()[0], grad._values().numpy()


def ids_and_values(offset: int, dim: int, ids: Any, values: Any) -> SparseRows:
    """An uncoalesced row gradient of the table at ``offset`` (rows of ``dim``): int64 ids
    (one per row of ``values``, any order, repeats allowed) and their gradients."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":  # a cast would truncate 2.7 to row 2 without a word
        raise TypeError(f"row ids must be integers, got {ids.dtype}")
    ids = np.ascontiguousarray(ids, np.int64)
    values = np.ascontiguousarray(values)
    if ids.ndim != 1 or values.size != ids.size * dim:
        raise ValueError(
            f"a row gradient needs 1-D ids and one row of {dim} values per id, got ids of shape "
            f"{ids.shape} and values of shape {values.shape}"
        )
    return SparseRows(offset, dim, ids, values.reshape(ids.size, dim), coalesced=False)


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
    # Forked from a forkserver that has imported torch, so its 1.5-2.5 s import is paid
    # once per process instead of once per worker and run: a process's first run starts
    # as fast as spawned workers do, every later one (a notebook's next cell, benchmark
    # repeats) in about 0.4 s instead of 2 (benchmarks/startup.py). The workers die with
    # the forkserver, which exits with the server's process (see die_with_parent).
    start_method = "forkserver"
    forkserver_ok = True
    preload = ("torch",)
    calibration: np.ndarray | None = None

    def __init__(self, spec, layout, params, grad, *, config=None, rank=0):  # type: ignore[no-untyped-def]
        import torch

        # Batches of a mapped file are read-only views; models only read their inputs.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        model = spec.load()
        mine = Layout.from_torch(model)
        if mine.fingerprint != layout.fingerprint:
            raise ValueError("the model's parameters do not match the server's layout")
        self.torch = torch
        self.model = model
        self.grad = grad
        default = (
            torch.nn.functional.cross_entropy if spec.task == "classify" else torch.nn.functional.mse_loss
        )
        self.loss_fn = spec.loss or default
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
        task = data.task if data is not None else "classify"
        return ModelSpec("torch", payload, loss, torch_sparse_names(model), task), layout, init

    @classmethod
    def hand_back(cls, model, spec, layout, params, data):  # type: ignore[no-untyped-def]
        import torch

        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in params:
                    p.copy_(torch.from_numpy(params[name]))
        recalibrate_batch_norm(model, take(data.x_train, slice(0, CALIBRATION_SAMPLES)))
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
        self.calibration = take(data.x_train, slice(0, CALIBRATION_SAMPLES))  # batch-norm statistics, live

    def forward(self, x: Any, y: np.ndarray | None) -> float:
        out = torch_call(self.model, x)
        self._loss = self.loss_fn(out, torch_target(x if y is None else y, out))
        return float(self._loss.detach())

    def loss_of(self, outputs: np.ndarray, targets: Any) -> float:
        torch = self.torch
        out = torch.from_numpy(outputs)
        with torch.no_grad():
            return float(self.loss_fn(out, torch_target(targets, out)))

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
            # As torch gives them (uncoalesced): the worker coalesces only where the rule
            # or the store needs sorted rows (torch.optim.SGD does not either).
            out.append(ids_and_values(offset, dim, *torch_rows(g)))
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
                return torch_call(self.model, x).numpy()
        finally:
            torch.set_num_threads(saved_threads)
            self.model.train(was_training)


class NumpyBackend(Backend):
    """A ``NumpyModel`` reading views of the segment and writing views of the gradient."""

    name = "numpy"

    def __init__(self, spec, layout, params, grad, *, config=None, rank=0):  # type: ignore[no-untyped-def]
        from paramserver.models.numpy_models import loss_for_task

        self.model = spec.load()
        self.loss_fn = loss_for_task(spec.task)
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
            raise ValueError(
                "NumPy models have built-in losses (softmax cross-entropy for classification, "
                "mean squared error otherwise); do not pass loss"
            )
        portable.check(model, "the model")
        init = model.init(np.random.default_rng(seed))
        layout = Layout.from_arrays(init)
        task = data.task if data is not None else "classify"
        spec = ModelSpec("numpy", model, sparse=tuple(model.sparse_tensors()), task=task)
        return spec, layout, layout.flatten(init)

    def forward(self, x: Any, y: np.ndarray | None) -> float:
        outputs, cache = self.model.forward(self.params, x)
        loss, doutputs = self.loss_fn(outputs, x if y is None else y)
        self._pending = (cache, doutputs)
        return loss

    def loss_of(self, outputs: np.ndarray, targets: Any) -> float:
        return self.loss_fn(outputs, targets)[0]

    def backward(self) -> list[SparseRows]:
        cache, dlogits = self._pending
        self._pending = None
        rows = self.model.backward(self.params, cache, dlogits, self.grads) or {}
        out = []
        for name, (indices, values) in rows.items():
            out.append(ids_and_values(*self._tables[name], indices, values))
        return out

    def predict(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        # No overflow/NaN warnings for the server's scores: a non-finite score is reported
        # as such (workers turn them off once, in worker_main).
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
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
