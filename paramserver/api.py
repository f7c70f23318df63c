"""Train a model with N worker processes sharing its parameters: the embedding API.

import paramserver
result = paramserver.train(model, (x, y), paramserver.TrainConfig(workers=2))
print(result.summary())       # model now holds the trained parameters
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .config import TrainConfig
from .data import Dataset, make_dataset
from .layout import Layout
from .server import ParameterServer, TrainResult


def _as_dataset(data: Any, seed: int) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return make_dataset(data[0], data[1], seed=seed)
    if isinstance(data, tuple) and len(data) == 4:
        return make_dataset(data[0], data[1], x_test=data[2], y_test=data[3], seed=seed)
    raise TypeError(
        f"data must be a paramserver.Dataset, (x, y) or (x, y, x_test, y_test); got {type(data).__name__}"
    )


def _model_spec(
    model: Any, loss: Callable[..., Any] | None, seed: int, data: Dataset | None = None
) -> tuple[Any, Layout, np.ndarray]:
    """The spec workers rebuild the model from, its layout and its initial flat vector.

    A ``KerasModel`` is built once here (TensorFlow is imported then, never by
    ``import paramserver``); ``data`` gives its input shape and a sample for
    batch-norm statistics.
    """
    from paramserver.models.numpy_models import NumpyModel
    from paramserver.workers import tf_backend
    from paramserver.workers.backends import ModelSpec

    if isinstance(model, tf_backend.KerasModel):
        if data is None:
            raise ValueError("a KerasModel needs the data set (its input shape) to be built")
        return tf_backend.model_spec(model, loss, data.input_shape, data.x_train)
    if tf_backend.looks_like_tf_model(model):
        raise TypeError(
            f"pass TensorFlow models as paramserver.KerasModel(factory), where factory() builds "
            f"the model in each worker; got a built {type(model).__name__}"
        )
    if isinstance(model, NumpyModel):
        if loss is not None:
            raise ValueError("NumPy models have a built-in softmax cross-entropy; do not pass loss")
        init = model.init(np.random.default_rng(seed))
        layout = Layout.from_arrays(init)
        return ModelSpec("numpy", model), layout, layout.flatten(init)
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(model, torch.nn.Module):
        import pickle

        layout = Layout.from_torch(model)
        layout.dtype  # noqa: B018 (raises for mixed dtypes, naming the fix)
        init = layout.flatten(
            {n: p.detach().cpu().numpy() for n, p in model.named_parameters() if p.requires_grad}
        )
        try:
            payload = pickle.dumps(model)
        except Exception as e:
            raise TypeError(
                f"the model could not be pickled for the worker processes ({e}); define its "
                "class at module level (and guard the script with if __name__ == '__main__')"
            ) from None
        return ModelSpec("torch", payload, loss), layout, init
    raise TypeError(
        f"model must be a torch.nn.Module, a paramserver.KerasModel or a "
        f"paramserver.models.numpy_models.NumpyModel, got {type(model).__name__}"
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
    ``data``: a :class:`Dataset`, ``(x, y)`` (a test split is held out) or
    ``(x, y, x_test, y_test)``. ``loss``: a picklable ``loss(logits, labels)``
    for torch models (default cross-entropy), ``loss(labels, logits)`` as in
    Keras for tf (default sparse categorical cross-entropy from logits). ``callback``: called by the
    server a few times a second with progress figures; returning True stops the run.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a paramserver.TrainConfig, got {type(config).__name__}")
    dataset = _as_dataset(data, config.seed)
    spec, layout, init = _model_spec(model, loss, config.seed, dataset)
    if config.device_list:
        if spec.backend != "tf":
            raise ValueError(
                f"devices apply to the tf backend only; the {spec.backend} model runs on the CPU"
            )
        from paramserver.workers.tf_backend import check_devices

        check_devices(config.device_list)
    with ParameterServer(spec, layout, init, dataset, config, callback=callback) as server:
        result = server.run()
    if spec.backend == "torch":
        import torch

        from paramserver.workers.backends import CALIBRATION_SAMPLES, recalibrate_batch_norm

        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in result.params:
                    p.copy_(torch.from_numpy(result.params[name]))
        recalibrate_batch_norm(model, dataset.x_train[:CALIBRATION_SAMPLES])
    result.model = model
    if spec.backend == "tf":
        from paramserver.workers.backends import make_backend

        result.model = make_backend(spec, layout, layout.flatten(result.params)).trained_model()
    return result
