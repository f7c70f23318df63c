"""Data sets: loading, checking, splitting, and placing the training split in shared memory.

The training split is written once into its own segment; workers slice their
batches out of it in place. Each batch is a contiguous slice (zero copies) of
the data, shuffled once when loaded; each epoch visits the batches in a new
order.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .layout import Layout
from .store import Segment


@dataclass
class Dataset:
    """A classification data set: ``x`` float32 ``(n, ...)`` (int32/int64 ids keep their
    dtype), ``y`` int64 labels in [0, classes)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    name: str = "data"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test samples, "
            f"input {self.input_shape}, {self.classes} classes"
        )


def _check_xy(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise ValueError(f"{what}: x must have shape (samples, features...), got {x.shape}")
    if y.ndim != 1:
        raise ValueError(f"{what}: y must be one label per sample (1-D), got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{what}: x has {len(x)} samples but y has {len(y)}; they must match")
    if len(x) == 0:
        raise ValueError(f"{what}: no samples")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{what}: x must be numeric, got dtype {x.dtype}")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(y != np.round(y))  # NaN included
        if len(bad):
            raise TypeError(
                f"{what}: y must hold integer class labels, found {float(y[bad[0]])} (sample {bad[0]}); "
                "relabel the classes as 0..classes-1"
            )
    elif y.dtype.kind not in "iu":
        raise TypeError(f"{what}: y must hold integer class labels, got dtype {y.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: x contains NaN or Inf")
    # Token ids (int32/int64) keep their dtype: float32 would round odd ids above 2**24.
    # Other inputs become float32 (narrow ints, bools and uint8 pixels are exact there).
    dtype = x.dtype if x.dtype in _ID_DTYPES else np.float32
    return np.ascontiguousarray(x, dtype=dtype), y.astype(np.int64)


_ID_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
"""Input dtypes kept as they are (ids); every other input is cast to float32."""


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "data",
) -> Dataset:
    """Check arrays and build a :class:`Dataset`, splitting off a test set if none is given.

    The training split is shuffled (with ``seed``) so that contiguous batches mix classes.
    """
    x, y = _check_xy(x, y, "training data")
    # Labels are checked before any split, and named as the caller gave them: a bad label
    # in y must not be reported as one of the "test labels" a split happened to draw.
    if x_test is None and y_test is None:
        _check_labels(y, "y: training labels", int(y.max()) + 1 if classes is None else classes)
    rng = np.random.default_rng(seed)
    if x_test is None and y_test is None:
        order = rng.permutation(len(x))
        n_test = max(1, int(round(len(x) * test_fraction)))
        if n_test >= len(x):
            raise ValueError(f"test_fraction {test_fraction} leaves no training samples")
        test, train = order[:n_test], order[n_test:]
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
    elif x_test is None or y_test is None:
        raise ValueError("give both x_test and y_test, or neither (a split is then made)")
    else:
        x_test, y_test = _check_xy(x_test, y_test, "test data")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"test inputs have shape {x_test.shape[1:]}, training inputs {x.shape[1:]}")
        order = rng.permutation(len(x))
        x, y = x[order], y[order]
    if classes is None:
        classes = int(max(y.max(), y_test.max())) + 1
        samples = len(y) + len(y_test)
        if classes > max(MAX_SPARSE_CLASSES, samples):
            # Labels 0..classes-1 with most classes never seen: a typo or a bad column,
            # and every model's output layer would be sized by it.
            label = int(max(y.max(), y_test.max()))
            raise ValueError(
                f"label {label} implies {classes} classes, but the data has only {samples} samples; "
                "relabel the classes as 0..classes-1"
            )
    for arr, what in ((y, "y: training labels"), (y_test, "y_test: test labels")):
        _check_labels(arr, what, classes)
    return Dataset(np.ascontiguousarray(x), np.ascontiguousarray(y), x_test, y_test, classes, name)


MAX_SPARSE_CLASSES = 1000
"""Inferred classes beyond the number of samples are allowed up to this many."""


def _check_labels(y: np.ndarray, what: str, classes: int | None) -> None:
    low, high = int(y.min()), int(y.max())
    if low < 0 or (classes is not None and high >= classes):
        bound = f"[0, {classes})" if classes is not None else ">= 0"
        raise ValueError(
            f"{what} must be in {bound}, found {low}..{high}; relabel the classes as 0..classes-1"
        )


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.data / 16.0).astype(np.float32)
    return make_dataset(x, d.target, classes=10, test_fraction=test_fraction, seed=seed, name="digits")


def load_npz(path: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A ``.npz`` with arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``)."""
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a directory; pass 'digits' or a .npz file")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist; pass 'digits' or a .npz path")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith(b"PK") and head != b"\x93NUMPY":
        # np.load would call any other bytes "pickled data" and suggest allow_pickle.
        raise ValueError(
            f"{path!r} is not a NumPy .npz file (empty, text or other bytes); "
            "save it with np.savez(path, x=x, y=y)"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not a NumPy .npz file: {e}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path!r} holds a single array (.npy), not a .npz; save with np.savez(path, x=x, y=y)"
        )
    try:
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        raise ValueError(f"{path!r} is not a NumPy .npz file of plain arrays: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not a NumPy .npz file (truncated or damaged?): {e}") from None
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(
            f"{path!r} has arrays {sorted(arrays)}; it needs 'x' (inputs) and 'y' (labels), "
            "e.g. np.savez(path, x=x, y=y)"
        )
    return make_dataset(
        arrays["x"], arrays["y"], x_test=arrays.get("x_test"), y_test=arrays.get("y_test"),
        test_fraction=test_fraction, seed=seed, name=os.path.basename(path),
    )  # fmt: skip


def load(spec: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """``'digits'`` or a path to a ``.npz`` file."""
    if spec == "digits":
        return load_digits(test_fraction=test_fraction, seed=seed)
    if spec.endswith(".npz"):
        return load_npz(spec, test_fraction=test_fraction, seed=seed)
    raise ValueError(f"unknown data set {spec!r}; pass 'digits' or a path ending in .npz")


def as_dataset(data: Any, seed: int) -> Dataset:
    """``data`` as a :class:`Dataset`: a Dataset, ``(x, y)`` or ``(x, y, x_test, y_test)``."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return make_dataset(data[0], data[1], seed=seed)
    if isinstance(data, tuple) and len(data) == 4:
        return make_dataset(data[0], data[1], x_test=data[2], y_test=data[3], seed=seed)
    raise TypeError(
        f"data must be a paramserver.Dataset, (x, y) or (x, y, x_test, y_test); got {type(data).__name__}"
    )


def share_training_data(data: Dataset) -> Segment:
    """Write the training split into a new segment (the caller owns and unlinks it)."""
    seg = Segment.create(Layout.from_arrays({"x": data.x_train, "y": data.y_train}), {"kind": "data"})
    seg["x"][...] = data.x_train
    seg["y"][...] = data.y_train
    return seg


def shard(n: int, rank: int, workers: int) -> tuple[int, int]:
    """The contiguous range of samples owned by worker ``rank`` of ``workers``."""
    return n * rank // workers, n * (rank + 1) // workers


def batch_starts(lo: int, hi: int, batch_size: int) -> np.ndarray:
    """Start of every batch of a shard (the last batch may be short)."""
    return np.arange(lo, hi, batch_size)


def epoch_orders(lo: int, hi: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Batch starts of a shard, in a new random order for each epoch."""
    starts = batch_starts(lo, hi, batch_size)
    rng = np.random.default_rng(seed)
    while True:
        yield rng.permutation(starts)
