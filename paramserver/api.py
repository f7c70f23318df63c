"""Train a model with N worker processes sharing its parameters: the embedding API.

import paramserver
result = paramserver.train(model, (x, y), paramserver.TrainConfig(workers=2))
print(result.summary())       # model now holds the trained parameters
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TrainConfig
from .data import Dataset, as_dataset
from .layout import Layout
from .server import ParameterServer, TrainResult, warn_of


@dataclass(frozen=True, eq=False)
class KerasModel:
    """A TensorFlow model for :func:`paramserver.train`: how to build it, not the model.

    ``factory()`` returns a Keras 3 model (Sequential, functional or subclassed)
    or a ``tf.Module`` whose ``__call__(x)`` returns logits. It runs in every
    worker (TensorFlow variables cannot be shared), so it must pickle: a
    module-level function or a ``functools.partial`` of one, and it must build
    the same variables every time. Initial values come from the server's build.
    """

    factory: Callable[[], Any]
    input_shape: Any = None
    """Shape of one input, a dict of them for named inputs (set from the data): a model
    without variables yet is called once on zeros."""
    calibration: Any = None
    """Training inputs for the server's copy to re-estimate batch-norm statistics (set from the data)."""
    input_dtypes: Any = None
    """The inputs' dtype names (a dict of them for named inputs; set from the data)."""
    target_shape: tuple[int, ...] | None = None
    """Shape of one sample's target (set from the data; None: no targets or not known)."""

    def __post_init__(self) -> None:
        if looks_like_tf_model(self.factory):
            raise TypeError(
                "KerasModel takes a factory that builds the model, not the model: "
                "KerasModel(build) where build() returns it"
            )
        if not callable(self.factory):
            raise TypeError(
                "KerasModel needs a factory, a callable that builds the model; "
                f"got {type(self.factory).__name__}"
            )


def is_keras(obj: Any) -> bool:
    """A Keras object (without importing Keras)."""
    return any(c.__module__.split(".")[0] in ("keras", "tf_keras") for c in type(obj).__mro__)


def looks_like_tf_model(obj: Any) -> bool:
    """A Keras model or ``tf.Module`` instance (without importing TensorFlow)."""
    return is_keras(obj) or any(c.__module__.startswith("tensorflow") for c in type(obj).__mro__)


def model_spec(
    model: Any, loss: Callable[..., Any] | None, seed: int, data: Dataset | None = None
) -> tuple[Any, Layout, np.ndarray]:
    """The spec workers rebuild ``model`` from, its layout and its initial flat vector.

    The model's backend is chosen by the registry
    (:func:`paramserver.workers.backends.backend_for`). A ``KerasModel`` is built
    once here (TensorFlow is imported then, never by ``import paramserver``);
    ``data`` gives its input shape and a sample for batch-norm statistics.
    """
    from paramserver.workers.backends import backend_for

    return backend_for(model).make_spec(model, loss, seed, data)


def check_rows(sparse: tuple[str, ...], config: TrainConfig) -> None:
    """Refuse, before any worker starts, an update rule that cannot update rows when the
    model has tables with row gradients (``sparse``: their names)."""
    if sparse and not config.update_rule().supports_rows:
        raise ValueError(
            f"the model's {', '.join(sparse)} get sparse gradients (sparse=True), and optimizer "
            f"{config.optimizer!r} with these settings has no row update; use sgd without momentum "
            "or weight decay, adagrad without weight decay, or adam (lazy, as torch.optim.SparseAdam), "
            "or build the table with sparse=False"
        )


def train(
    model: Any,
    data: Any,
    config: TrainConfig | None = None,
    *,
    loss: Callable[..., Any] | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``config.workers`` processes; return the result.

    ``model``: a ``torch.nn.Module`` (its trained parameters are copied back into
    it and its batch-norm statistics re-estimated from training inputs), a
    :class:`paramserver.KerasModel` (a factory of a Keras model or ``tf.Module``;
    ``result.model`` is then a model built with the trained values) or a NumPy
    model from ``paramserver.models.numpy_models``.
    ``data``: a :class:`Dataset` (e.g. :func:`paramserver.load_npy`, memory-mapped),
    ``(x, y)`` (a test split is held out) or ``(x, y, x_test, y_test)``, where ``x`` is
    an array or a dict of named arrays (a torch model gets them as keyword arguments)
    and ``y`` holds class labels (ints), float targets, or is None (unsupervised); a
    map-style ``torch.utils.data.Dataset`` or a finite ``tf.data.Dataset`` is read into
    memory once. The task is inferred from ``y`` unless ``config.task`` states it.
    ``loss``: a picklable ``loss(outputs, targets)`` for torch models,
    ``loss(targets, outputs)`` as in Keras for tf (targets: the inputs for an
    unsupervised task); default cross-entropy from logits for classification, mean
    squared error otherwise. ``callback``: called by the server a few times a second
    with progress figures; returning True stops the run.
    """
    from paramserver.workers.backends import backend_class

    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a paramserver.TrainConfig, got {type(config).__name__}")
    if config.cluster:  # across machines, on Ray: one shared-memory server per node
        from .cluster import train_cluster

        return train_cluster(model, data, config, loss=loss, callback=callback, _via_train=True)
    dataset = as_dataset(data, config.seed, None if config.task == "auto" else config.task)
    spec, layout, init = model_spec(model, loss, config.seed, dataset)
    backend = backend_class(spec.backend)
    backend.check_config(config)
    check_rows(spec.sparse, config)
    backend.check_data(spec, layout, init, dataset)
    with ParameterServer(spec, layout, init, dataset, config, callback=callback) as server:
        result = server.run()
    result.model = backend.hand_back(model, spec, layout, result.params, dataset)
    warn_of(result, stacklevel=2)
    return result
