"""Data a framework holds, read once into NumPy arrays: a map-style
``torch.utils.data.Dataset`` and a finite ``tf.data.Dataset``.

Each is read sample by sample (or batch by batch) into memory; training then
works on the arrays like on any other (the training split goes into shared
memory once). Neither framework is imported unless the data is its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

PROGRESS_FROM = 20_000
"""Samples from which reading a data set shows a progress bar."""


def read_source(data: Any) -> tuple[Any, Any] | None:
    """``(x, y)`` of a torch or tf data set (``y`` None when its elements have no
    target); None when ``data`` is neither."""
    module = type(data).__module__.split(".")[0]
    if module == "tensorflow" or any(c.__module__.startswith("tensorflow") for c in type(data).__mro__):
        return _read_tf(data)
    if "torch" in sys.modules and isinstance(data, sys.modules["torch"].utils.data.Dataset):
        return _read_torch(data)
    return None


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def _split(element: Any, what: str) -> tuple[Any, Any]:
    """(inputs, target) of one element: ``(x, y)``, ``x`` alone, or a dict of named inputs."""
    if isinstance(element, tuple | list):
        if len(element) == 2:
            return element[0], element[1]
        if len(element) == 1:
            return element[0], None
        raise ValueError(
            f"{what}: an element must be (inputs, target), (inputs,) or inputs; got {len(element)} parts"
        )
    return element, None


def _stack(parts: list[Any], concat: bool) -> Any:
    join = np.concatenate if concat else np.stack
    if isinstance(parts[0], dict):
        return {k: join([_numpy(p[k]) for p in parts]) for k in parts[0]}
    return join([_numpy(p) for p in parts])


def _collect(elements: Iterable[Any], total: int | None, what: str, batched: bool) -> tuple[Any, Any]:
    bar = None
    if total is not None and total >= PROGRESS_FROM:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"reading {what}", file=sys.stderr, unit=" samples")
    xs, ys = [], []
    try:
        for element in elements:
            x, y = _split(element, what)
            xs.append(x)
            ys.append(y)
            if bar is not None:
                bar.update(len(_numpy(y if y is not None else x)) if batched else 1)
    finally:
        if bar is not None:
            bar.close()
    if not xs:
        raise ValueError(f"{what} is empty")
    if any(y is None for y in ys) and not all(y is None for y in ys):
        raise ValueError(f"{what}: some elements have a target and some do not")
    y = None if ys[0] is None else _stack(ys, batched)
    return _stack(xs, batched), y


def _read_torch(data: Any) -> tuple[Any, Any]:
    try:
        n = len(data)
    except TypeError:
        raise TypeError(
            "a torch Dataset must be map-style (__len__ and __getitem__); read an IterableDataset "
            "into arrays first"
        ) from None
    return _collect((data[i] for i in range(n)), n, "the torch Dataset", batched=False)


def _read_tf(data: Any) -> tuple[Any, Any]:
    import tensorflow as tf

    if not isinstance(data, tf.data.Dataset):
        raise TypeError(f"TensorFlow data must be a tf.data.Dataset, got {type(data).__name__}")
    cardinality = int(data.cardinality())
    if cardinality == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError("the tf.data.Dataset is infinite (repeat()); pass a finite one, e.g. .take(n)")
    # Batched when the leading dimension of its elements is unknown (what .batch() makes).
    specs = tf.nest.flatten(data.element_spec)
    batched = all(s.shape.rank and s.shape[0] is None for s in specs)
    total = None if cardinality < 0 or batched else cardinality
    return _collect(data.as_numpy_iterator(), total, "the tf.data.Dataset", batched=batched)
