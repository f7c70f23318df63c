"""Ready models for the CLI and the benchmarks, chosen by backend and name.

PyTorch models live in ``torch_models`` and Keras models in ``tf_models``
(each imported only when asked for, so that nobody pays for importing a
framework they do not use); NumPy models in ``numpy_models``.
"""

from __future__ import annotations

import math
from typing import Any

MODELS = {
    "torch": ("mlp", "cnn", "embedding", "logreg"),
    "tf": ("mlp", "cnn"),
    "numpy": ("mlp", "softmax", "linear", "logreg", "mf"),
}


def square_side(input_shape: tuple[int, ...], layout: str) -> int | None:
    """The side of square images flattened into ``input_shape`` (one axis); None when the
    inputs are not flat. ``layout`` names the image shape to reshape to in the error."""
    if len(input_shape) != 1:
        return None
    side = math.isqrt(input_shape[0])
    if side * side != input_shape[0]:
        raise ValueError(
            f"cnn needs square images; inputs of {input_shape[0]} features are not; "
            f"reshape them to {layout} or use --model mlp"
        )
    return side


def build_model(
    backend: str,
    name: str,
    input_shape: tuple[int, ...],
    classes: int,
    hidden: int = 64,
    tokens: int = 0,
    task: str = "classify",
) -> Any:
    """The model ``name`` of ``backend`` for inputs of ``input_shape`` (for tf: a
    ``KerasModel``, the factory each worker builds the model with); ``tokens``: the id
    range of integer inputs (largest id + 1), for the embedding models; ``task``: the
    data's, for a model whose form depends on it (numpy ``mf``: a classifier or a
    regression on ratings)."""
    if backend == "tf":
        from paramserver.api import KerasModel
        from paramserver.workers.tf_backend import import_tf

        import_tf()  # quietly, and with a clear message if it is missing
        from .tf_models import build as tf_build

        return KerasModel(tf_build(name, input_shape, classes, hidden))
    if backend == "torch":
        from .torch_models import build
    elif backend == "numpy":
        from .numpy_models import build as numpy_build

        return numpy_build(name, input_shape, classes, hidden, tokens, task)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(MODELS)}")
    return build(name, input_shape, classes, hidden, tokens)
