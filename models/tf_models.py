"""Ready Keras models, the TensorFlow twins of ``torch_models``: an MLP, a small CNN,
and the CNN of PyTorch's Hogwild example.

Each is a *factory*: a module-level function that builds the model, so that
``functools.partial(mlp, ...)`` pickles by reference and every worker builds
its own copy (TensorFlow variables cannot live in shared memory). Models
return logits. Images are channels-last, TensorFlow's CPU layout: ``(side,
side, channels)``; flat square inputs (8x8 digits as 64 features) and
channels-first ``(channels, side, side)`` arrays are reshaped by the model.

Importing this module imports TensorFlow; ``paramserver.models.build_model``
does so only when asked for a ``tf`` model.
"""

from __future__ import annotations

import functools

import keras
from keras import layers

from paramserver.models import square_side


def mlp(input_shape: tuple[int, ...], classes: int, hidden: int = 64, depth: int = 1) -> keras.Model:
    """Flatten, then ``depth`` hidden ReLU layers of ``hidden`` units, then logits."""
    return keras.Sequential(
        [keras.Input(input_shape), layers.Flatten()]
        + [layers.Dense(hidden, activation="relu") for _ in range(depth)]
        + [layers.Dense(classes)],
        name="mlp",
    )


def _to_images(input_shape: tuple[int, ...]) -> tuple[list[layers.Layer], int, int]:
    """Layers turning inputs of ``input_shape`` into channels-last images; channels; side."""
    side = square_side(input_shape, "(side, side, channels)")
    if side is not None:
        return [layers.Reshape((side, side, 1))], 1, side
    if len(input_shape) == 2 and input_shape[0] == input_shape[1]:
        return [layers.Reshape((*input_shape, 1))], 1, input_shape[0]
    if len(input_shape) == 3 and input_shape[0] == input_shape[1]:
        return [], input_shape[2], input_shape[0]
    if len(input_shape) == 3 and input_shape[1] == input_shape[2]:
        return [layers.Permute((2, 3, 1))], input_shape[0], input_shape[1]
    raise ValueError(f"cnn needs square images (side, side, channels), got inputs of shape {input_shape}")


def cnn(input_shape: tuple[int, ...], classes: int, width: int = 16, hidden: int = 64) -> keras.Model:
    """LeNet-style, as ``torch_models.CNN``: two 3x3 conv + 2x2 max-pool blocks, two dense layers."""
    to_images, _, _ = _to_images(input_shape)
    return keras.Sequential(
        [keras.Input(input_shape), *to_images]
        + [layers.Conv2D(width, 3, padding="same", activation="relu"), layers.MaxPooling2D(2)]
        + [layers.Conv2D(2 * width, 3, padding="same", activation="relu"), layers.MaxPooling2D(2)]
        + [layers.Flatten(), layers.Dense(hidden, activation="relu"), layers.Dense(classes)],
        name="cnn",
    )


def hogwild_net(input_shape: tuple[int, ...] = (28, 28, 1), classes: int = 10) -> keras.Model:
    """The CNN of PyTorch's mnist_hogwild example (28x28 images), as ``torch_models.HogwildNet``."""
    to_images, _, side = _to_images(input_shape)
    if side != 28:
        raise ValueError(f"hogwild_net is made for 28x28 images, got inputs of shape {input_shape}")
    return keras.Sequential(
        [keras.Input(input_shape), *to_images]
        + [layers.Conv2D(10, 5), layers.MaxPooling2D(2), layers.ReLU()]
        + [layers.Conv2D(20, 5), layers.SpatialDropout2D(0.5), layers.MaxPooling2D(2), layers.ReLU()]
        + [layers.Flatten(), layers.Dense(50, activation="relu"), layers.Dropout(0.5), layers.Dense(classes)],
        name="hogwild_net",
    )


FACTORIES = {"mlp": mlp, "cnn": cnn}


def build(name: str, input_shape: tuple[int, ...], classes: int, hidden: int = 64) -> functools.partial:
    """A picklable factory of the model ``name`` for inputs of ``input_shape`` (no batch axis).

    Inputs a model cannot take (a CNN on non-square inputs) fail here, not in every worker.
    """
    if name not in FACTORIES:
        raise ValueError(f"unknown tf model {name!r}; choose one of {', '.join(FACTORIES)}")
    if name == "cnn":
        _to_images(input_shape)
    return functools.partial(FACTORIES[name], tuple(input_shape), classes, hidden=hidden)
