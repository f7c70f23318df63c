"""Ready models for the CLI and the benchmarks, chosen by backend and name.

PyTorch models live in ``torch_models`` (imported only when asked for, so that
NumPy users never pay for importing torch); NumPy models in ``numpy_models``.
"""

from __future__ import annotations

from typing import Any

MODELS = {"torch": ("mlp", "cnn"), "numpy": ("mlp", "softmax")}


def build_model(backend: str, name: str, input_shape: tuple[int, ...], classes: int, hidden: int = 64) -> Any:
    """The model ``name`` of ``backend`` for inputs of ``input_shape``."""
    if backend == "torch":
        from .torch_models import build
    elif backend == "numpy":
        from .numpy_models import build  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(MODELS)}")
    return build(name, input_shape, classes, hidden)
