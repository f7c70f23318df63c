"""Data sets: loading, checking, splitting, and placing the training split in shared memory.

The training split is written once into its own segment; workers slice their
batches out of it in place. Each batch is a contiguous slice (zero copies) of
the data, shuffled once when loaded; each epoch visits the batches in a new
order.
"""

from __future__ import annotations

import math
import mmap
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import Layout
from .store import Segment

TASKS = ("classify", "regress", "unsupervised")
"""What the targets are: class labels, float targets (any trailing shape), or none."""


@dataclass
class CSR:
    """Sparse inputs, one compressed sparse row per sample: ``indptr`` (samples + 1,) int64,
    ``indices`` int64 column ids, ``data`` float32 values, ``columns`` the width.

    A slice of rows is zero copy for ``indices`` and ``data`` (views of the data segment)
    and rebases ``indptr`` (samples + 1 integers): a batch reaches the model as CSR,
    never densified. A torch model gets it as ``(indices, offsets, per_sample_weights)``
    (what ``nn.EmbeddingBag`` takes), a NumPy model as this object."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    columns: int

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.columns)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1] - self.indptr[0])

    def __getitem__(self, index: Any) -> CSR:
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise ValueError("CSR rows slice with step 1 only")
            hi = max(lo, hi)
            a, b = int(self.indptr[lo]), int(self.indptr[hi])
            return CSR(self.indptr[lo : hi + 1] - a, self.indices[a:b], self.data[a:b], self.columns)
        rows = np.asarray(index)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return CSR(indptr, self.indices[pos], self.data[pos], self.columns)

    def rows(self) -> np.ndarray:
        """The sample (row) of every stored value."""
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))

    def toarray(self) -> np.ndarray:
        """The dense (samples, columns) float32 matrix (for checks; never used in training)."""
        out = np.zeros(self.shape, np.float32)
        np.add.at(out, (self.rows(), self.indices), self.data)
        return out

    @classmethod
    def from_scipy(cls, m: Any) -> CSR:
        m = m.tocsr()
        m.sum_duplicates()
        return cls(
            m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.astype(np.float32), m.shape[1]
        )


def _is_scipy_sparse(x: Any) -> bool:
    return type(x).__module__.startswith("scipy.sparse")


Inputs = np.ndarray | dict[str, np.ndarray] | CSR
"""A model's inputs: one array, named arrays (several inputs), or sparse rows (:class:`CSR`),
all with one row per sample."""


@dataclass
class Dataset:
    """A data set: inputs ``x`` (one array or a dict of named arrays, ``(n, ...)`` each) and
    targets ``y`` for the ``task``: int64 class labels in [0, classes) (``classify``),
    float32 targets of any trailing shape (``regress``), or none (``unsupervised``: the
    loss is computed from the inputs and the outputs).

    Floating inputs are float32; int32/int64 inputs (ids) keep their dtype; others become
    float32. ``files``: the arrays that stay in their memory-mapped ``.npy`` files (key:
    ``x``, ``x/<name>`` or ``y``; value: path and row range), which workers map instead of
    receiving a copy in shared memory (see :func:`load_npy`)."""

    x_train: Inputs
    y_train: np.ndarray | None
    x_test: Inputs
    y_test: np.ndarray | None
    classes: int = 0
    name: str = "data"
    task: str = "classify"
    files: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def input_shape(self) -> Any:
        """Shape of one sample's input; a dict of them for named inputs."""
        if isinstance(self.x_train, dict):
            return {k: tuple(v.shape[1:]) for k, v in self.x_train.items()}
        return tuple(self.x_train.shape[1:])

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one sample's target (``()`` for a class label or a scalar target)."""
        return () if self.y_train is None else tuple(self.y_train.shape[1:])

    @property
    def outputs(self) -> int:
        """How many outputs a model needs: the classes, the target's size, or (unsupervised)
        the input's size (an autoencoder)."""
        if self.task == "classify":
            return self.classes
        if self.task == "regress":
            return math.prod(self.target_shape)
        if isinstance(self.x_train, dict):
            raise ValueError("an unsupervised model of several inputs has no single output size")
        return math.prod(self.input_shape)

    def __len__(self) -> int:
        return num_samples(self.x_train)

    def describe(self) -> str:
        kind = {
            "classify": f"{self.classes} classes",
            "regress": f"regression, targets {self.target_shape or 'scalar'}",
            "unsupervised": "no targets",
        }[self.task]
        mapped = f", mapped from {len(self.files)} .npy file(s)" if self.files else ""
        return (
            f"{self.name}: {len(self)} train / {num_samples(self.x_test)} test samples, "
            f"input {self.input_shape}, {kind}{mapped}"
        )


def num_samples(x: Inputs) -> int:
    """Rows of ``x`` (of its first array, for named inputs)."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def take(x: Inputs, index: Any) -> Inputs:
    """``x[index]`` of one array or of each named array."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def _check_inputs(x: Any, what: str) -> Inputs:
    if isinstance(x, dict):
        if not x:
            raise ValueError(f"{what}: a dict of inputs needs at least one array")
        out = {}
        for k, v in x.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(
                    f"{what}: input names must be identifiers (they become argument names), got {k!r}"
                )
            out[k] = _check_array(v, f"{what}: x[{k!r}]")
        lengths = {k: len(v) for k, v in out.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"{what}: the inputs have different numbers of samples {lengths}; they must match"
            )
        return out
    if _is_scipy_sparse(x):
        x = CSR.from_scipy(x)
    if isinstance(x, CSR):
        return _check_csr(x, f"{what}: x")
    return _check_array(x, f"{what}: x")


def _check_csr(x: CSR, what: str) -> CSR:
    indptr, indices, data = (np.asarray(a) for a in (x.indptr, x.indices, x.data))
    if indptr.ndim != 1 or len(indptr) < 2 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{what}: CSR indptr must start at 0 and never decrease, one entry per sample + 1")
    if len(indices) != indptr[-1] or len(data) != indptr[-1]:
        raise ValueError(f"{what}: CSR indices and data must have indptr[-1] = {indptr[-1]} entries")
    if len(indices) and (indices.min() < 0 or indices.max() >= x.columns):
        raise ValueError(f"{what}: CSR column ids must be in [0, {x.columns})")
    if data.dtype.kind not in "biuf" or not np.all(np.isfinite(data)):
        raise ValueError(f"{what}: CSR data must be finite numbers")
    return CSR(
        indptr.astype(np.int64), np.ascontiguousarray(indices, np.int64),
        np.ascontiguousarray(data, np.float32), int(x.columns),
    )  # fmt: skip


def is_mapped(a: Any) -> bool:
    """Whether ``a`` is a whole ``.npy`` file mapped into memory (``np.load(path,
    mmap_mode="r")``): those are never copied; workers map the file themselves."""
    return isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename is not None


def _check_array(x: Any, what: str) -> np.ndarray:
    mapped = is_mapped(x)
    x = x if mapped else np.asarray(x)
    if x.ndim < 1 or (x.ndim < 2 and not what.endswith("]")):
        raise ValueError(f"{what} must have shape (samples, features...), got {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{what}: no samples")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be numeric, got dtype {x.dtype}")
    # Token ids (int32/int64) keep their dtype: float32 would round odd ids above 2**24.
    # Other inputs become float32 (narrow ints, bools and uint8 pixels are exact there).
    dtype = x.dtype if x.dtype in _KEPT_DTYPES else np.dtype(np.float32)
    if mapped:
        if not x.flags.c_contiguous:
            raise ValueError(f"{what}: a memory-mapped array must be in C order; save it with np.save")
        if x.dtype != dtype:
            raise TypeError(
                f"{what}: a memory-mapped array is used as it is, and {x.dtype} is not a dtype "
                "models take; save it as float32 (or int32/int64 ids)"
            )
        return x  # not read here: it may be larger than memory
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or Inf")
    return np.ascontiguousarray(x, dtype=dtype)


_KEPT_DTYPES = (np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.int64))
"""Input dtypes kept as they are (float32, and ids); every other input is cast to float32."""


def infer_task(y: Any) -> str:
    """The task targets ``y`` imply: none -> unsupervised, floats -> regress, integers -> classify."""
    if y is None:
        return "unsupervised"
    return "regress" if np.asarray(y).dtype.kind == "f" else "classify"


def _check_targets(y: Any, n: int, task: str, what: str) -> np.ndarray | None:
    if task == "unsupervised":
        if y is not None:
            raise ValueError(
                f"{what}: task 'unsupervised' takes no targets; drop y, or use task 'regress' or 'classify'"
            )
        return None
    if y is None:
        raise ValueError(f"{what}: task {task!r} needs targets y; use task 'unsupervised' for none")
    mapped = is_mapped(y)
    y = y if mapped else np.asarray(y)
    if len(y) != n:
        raise ValueError(f"{what}: x has {n} samples but y has {len(y)}; they must match")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{what}: y must be numeric, got dtype {y.dtype}")
    if task == "classify":
        if y.ndim != 1:
            raise ValueError(
                f"{what}: y must be one class label per sample (1-D), got shape {y.shape}; "
                "for float targets of this shape use task 'regress'"
            )
        if y.dtype.kind == "f":
            bad = np.flatnonzero(y != np.round(y))  # NaN included
            if len(bad):
                raise TypeError(
                    f"{what}: y must hold integer class labels, found {float(y[bad[0]])} "
                    f"(sample {bad[0]}); relabel the classes as 0..classes-1, or use task 'regress'"
                )
        if mapped and y.dtype == np.int64:
            return y
        return np.ascontiguousarray(y, dtype=np.int64)
    if mapped:
        if y.dtype != np.float32:
            raise TypeError(f"{what}: memory-mapped regression targets must be float32, got {y.dtype}")
        return y
    y = np.ascontiguousarray(y, dtype=np.float32)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{what}: y contains NaN or Inf")
    return y


def _shape_of(x: Inputs) -> Any:
    return {k: v.shape[1:] for k, v in x.items()} if isinstance(x, dict) else tuple(x.shape[1:])


def make_dataset(
    x: Any,
    y: Any = None,
    *,
    x_test: Any = None,
    y_test: Any = None,
    classes: int | None = None,
    task: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "data",
) -> Dataset:
    """Check arrays and build a :class:`Dataset`, splitting off a test set if none is given.

    ``task`` (``classify``, ``regress``, ``unsupervised``) is inferred from ``y`` when
    None: no targets, float targets, integer labels. The training split is shuffled
    (with ``seed``) so that contiguous batches mix classes, except memory-mapped arrays:
    they are never copied, so their split is by rows (the last ``test_fraction`` is the
    test set) and their order is the file's.
    """
    if task is None:
        task = infer_task(y)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    x = _check_inputs(x, "training data")
    n = num_samples(x)
    y = _check_targets(y, n, task, "training data")
    if task == "classify":
        # Labels are checked before any split, and named as the caller gave them: a bad label
        # in y must not be reported as one of the "test labels" a split happened to draw.
        if x_test is None and y_test is None:
            _check_labels(y, "y: training labels", int(y.max()) + 1 if classes is None else classes)
    elif classes:
        raise ValueError(f"classes applies to classification; the task is {task!r}")
    files = {k: (a.filename, 0, len(a)) for k, a in _named_arrays(x, y).items() if is_mapped(a)}
    mapped = bool(files)
    rng = np.random.default_rng(seed)
    if x_test is None and (y_test is None or task == "unsupervised"):
        n_test = max(1, int(round(n * test_fraction)))
        if n_test >= n:
            raise ValueError(f"test_fraction {test_fraction} leaves no training samples")
        if mapped:  # rows, no copy: the first n - n_test rows train
            train, test = slice(0, n - n_test), slice(n - n_test, n)
            files = {k: (path, lo, lo + n - n_test) for k, (path, lo, _) in files.items()}
        else:
            order = rng.permutation(n)
            test, train = order[:n_test], order[n_test:]
        x_test, x = take(x, test), take(x, train)
        if y is not None:
            y_test, y = y[test], y[train]
    elif x_test is None or (y_test is None and task != "unsupervised"):
        raise ValueError("give both x_test and y_test, or neither (a split is then made)")
    else:
        x_test = _check_inputs(x_test, "test data")
        y_test = _check_targets(y_test, num_samples(x_test), task, "test data")
        if _shape_of(x_test) != _shape_of(x):
            raise ValueError(f"test inputs have shape {_shape_of(x_test)}, training inputs {_shape_of(x)}")
        if y is not None and y_test.shape[1:] != y.shape[1:]:
            raise ValueError(f"test targets have shape {y_test.shape[1:]}, training targets {y.shape[1:]}")
        if not mapped:
            order = rng.permutation(n)
            x, y = take(x, order), None if y is None else y[order]
    if task == "classify":
        assert y is not None and y_test is not None
        if classes is None:
            classes = int(max(y.max(), y_test.max())) + 1
            samples = len(y) + len(y_test)
            if classes > max(MAX_SPARSE_CLASSES, samples):
                # Labels 0..classes-1 with most classes never seen: a typo or a bad column,
                # and every model's output layer would be sized by it.
                label = classes - 1
                raise ValueError(
                    f"label {label} implies {classes} classes, but the data has only {samples} samples; "
                    "relabel the classes as 0..classes-1"
                )
        for arr, what in ((y, "y: training labels"), (y_test, "y_test: test labels")):
            _check_labels(arr, what, classes)
    if isinstance(x, dict):
        x = x if mapped else {k: np.ascontiguousarray(v) for k, v in x.items()}
    elif not mapped and not isinstance(x, CSR):  # a CSR's gather made fresh arrays
        x = np.ascontiguousarray(x)
    if not mapped:
        y = None if y is None else np.ascontiguousarray(y)
    return Dataset(x, y, x_test, y_test, classes or 0, name, task, files)


def _named_arrays(x: Inputs, y: np.ndarray | None) -> dict[str, np.ndarray]:
    """The arrays of a split by their key in the data segment: ``x``, ``x/<name>`` or
    ``csr/indptr``, ``csr/indices``, ``csr/data``; ``y``."""
    if isinstance(x, CSR):
        out = {"csr/indptr": x.indptr, "csr/indices": x.indices, "csr/data": x.data}
    else:
        out = {f"x/{k}": v for k, v in x.items()} if isinstance(x, dict) else {"x": x}
    return out if y is None else {**out, "y": y}


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


def _check_file(path: str, suffix: str) -> None:
    example = "np.savez(path, x=x, y=y)" if suffix == ".npz" else "np.save(path, x)"
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a directory; pass 'digits' or a {suffix} file")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist; pass 'digits' or a {suffix} path")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith(b"PK") and head != b"\x93NUMPY":
        # np.load would call any other bytes "pickled data" and suggest allow_pickle.
        raise ValueError(
            f"{path!r} is not a NumPy {suffix} file (empty, text or other bytes); save it with {example}"
        )


def load_npz(path: str, *, test_fraction: float = 0.2, seed: int = 0, task: str | None = None) -> Dataset:
    """A ``.npz`` with arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``); without
    ``y``, an unsupervised data set. Its arrays are read into memory (a ``.npz`` is a zip,
    it cannot be mapped): for data larger than memory use :func:`load_npy`."""
    _check_file(path, ".npz")
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
    if "indptr" in arrays:  # sparse rows: CSR arrays (as scipy.sparse.save_npz names them) and y
        missing = {"indices", "data", "shape"} - set(arrays)
        if missing:
            raise ValueError(
                f"{path!r} has CSR indptr but lacks {sorted(missing)}; save indptr, indices, data, shape"
            )
        shape = arrays.pop("shape")
        arrays["x"] = CSR(arrays.pop("indptr"), arrays.pop("indices"), arrays.pop("data"), int(shape[1]))
    if "x" not in arrays or ("y" not in arrays and task != "unsupervised"):
        raise ValueError(
            f"{path!r} has arrays {sorted(arrays)}; it needs 'x' (inputs) and 'y' (targets), "
            "e.g. np.savez(path, x=x, y=y), or 'x' alone with task 'unsupervised'"
        )
    return make_dataset(
        arrays["x"], arrays.get("y"), x_test=arrays.get("x_test"), y_test=arrays.get("y_test"),
        task=task, test_fraction=test_fraction, seed=seed, name=os.path.basename(path),
    )  # fmt: skip


def load_svmlight(
    path: str, *, test_fraction: float = 0.2, seed: int = 0, task: str | None = "classify"
) -> Dataset:
    """An svmlight/libsvm text file (``label index:value ...``), read with scikit-learn's
    ``load_svmlight_file`` into sparse rows (:class:`CSR`). For classification, labels
    -1/+1 become 0/1; other labels must already be 0..classes-1."""
    from sklearn.datasets import load_svmlight_file

    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    try:
        x, y = load_svmlight_file(path, dtype=np.float32)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path!r} is not an svmlight file: {e}") from None
    if task in (None, "classify") and set(np.unique(y)) <= {-1.0, 1.0}:
        y = (y > 0).astype(np.int64)
    return make_dataset(x, y, task=task, test_fraction=test_fraction, seed=seed, name=os.path.basename(path))


SVMLIGHT_SUFFIXES = (".svm", ".svmlight", ".libsvm")


def map_npy(path: str) -> np.ndarray:
    """The ``.npy`` file at ``path``, mapped read-only (nothing is read until used)."""
    _check_file(path, ".npy")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path!r} is not a NumPy .npy file of plain numbers: {e}") from None
    if not isinstance(a, np.memmap):
        raise ValueError(f"{path!r} is not a single array (.npy); save it with np.save(path, x)")
    return a


def load_npy(
    x: str | dict[str, str],
    y: str | None = None,
    *,
    x_test: str | dict[str, str] | None = None,
    y_test: str | None = None,
    task: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A data set of ``.npy`` files (inputs ``x``: a path, or paths by input name; targets
    ``y``: a path, or None for unsupervised), **memory-mapped, never copied**: the
    server and every worker map the same files and read their batches in place through
    the page cache, so a data set larger than ``/dev/shm``, or than memory, trains.

    Arrays are used as saved: float32 inputs (int32/int64 ids), int64 labels or float32
    targets, in C order. Nothing is shuffled (that would copy): the last
    ``test_fraction`` of the rows is the test split unless ``x_test`` is given, and each
    epoch visits the batches (contiguous rows) in a new order, so save the rows shuffled
    if the file is sorted (by class, by time).
    """

    def mapped(p: str | dict[str, str] | None) -> Any:
        if p is None:
            return None
        return {k: map_npy(v) for k, v in p.items()} if isinstance(p, dict) else map_npy(p)

    name = os.path.basename(x if isinstance(x, str) else next(iter(x.values())))
    return make_dataset(
        mapped(x), mapped(y), x_test=mapped(x_test), y_test=mapped(y_test), task=task,
        test_fraction=test_fraction, seed=seed, name=name,
    )  # fmt: skip


def load(
    spec: str, *, test_fraction: float = 0.2, seed: int = 0, task: str | None = None, targets: str = ""
) -> Dataset:
    """``'digits'``, a path to a ``.npz`` file (arrays, or CSR ``indptr``/``indices``/
    ``data``/``shape``), a ``.npy`` file of inputs (mapped; its targets in the ``.npy``
    file ``targets``, none for an unsupervised task), or an svmlight file."""
    if targets and not spec.endswith(".npy"):
        raise ValueError("targets (a .npy file of targets) goes with a .npy file of inputs")
    if spec == "digits":
        if task not in (None, "classify"):
            raise ValueError(f"digits is a classification data set; task {task!r} does not apply")
        return load_digits(test_fraction=test_fraction, seed=seed)
    try:
        if spec.endswith(".npz"):
            return load_npz(spec, test_fraction=test_fraction, seed=seed, task=task)
        if spec.endswith(".npy"):
            return load_npy(spec, targets or None, task=task, test_fraction=test_fraction, seed=seed)
        if spec.endswith(SVMLIGHT_SUFFIXES):
            return load_svmlight(spec, task=task, test_fraction=test_fraction, seed=seed)
    except (ValueError, TypeError) as e:  # what the contents are blamed for (a label, a shape): name the file
        if spec in str(e) or (targets and targets in str(e)):
            raise
        raise type(e)(f"{spec!r}: {e}") from None
    raise ValueError(
        f"unknown data set {spec!r}; pass 'digits' or a path ending in .npz, .npy or "
        + ", ".join(SVMLIGHT_SUFFIXES)
    )


def as_dataset(data: Any, seed: int, task: str | None = None) -> Dataset:
    """``data`` as a :class:`Dataset`: a Dataset, ``(x, y)`` or ``(x, y, x_test, y_test)``
    (``x`` an array or a dict of named arrays, ``y`` None for an unsupervised task), a
    map-style ``torch.utils.data.Dataset`` or a finite ``tf.data.Dataset`` (read once,
    into memory; a test split is held out)."""
    if isinstance(data, Dataset):
        if task is not None and task != data.task:
            raise ValueError(f"the data is for task {data.task!r}, the config asks for {task!r}")
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return make_dataset(data[0], data[1], task=task, seed=seed)
    if isinstance(data, tuple) and len(data) == 4:
        return make_dataset(data[0], data[1], x_test=data[2], y_test=data[3], task=task, seed=seed)
    if isinstance(data, np.ndarray | dict):
        return make_dataset(data, None, task=task or "unsupervised", seed=seed)
    from .sources import read_source

    arrays = read_source(data)
    if arrays is not None:
        return make_dataset(*arrays, task=task, seed=seed, name=type(data).__name__)
    raise TypeError(
        "data must be a paramserver.Dataset, (x, y), (x, y, x_test, y_test), a torch.utils.data.Dataset "
        f"or a tf.data.Dataset; got {type(data).__name__}"
    )


class TrainingData:
    """The training split as a worker sees it: the arrays in the data segment (``segment``,
    None when all of them are mapped files) and those left in their ``.npy`` files
    (``files``: key -> path and row range). Pickles to the names, not the bytes."""

    def __init__(self, segment: Segment | None, files: dict[str, tuple[str, int, int]], csr_columns: int = 0):
        self.segment = segment
        self.files = files
        self.csr_columns = csr_columns

    def arrays(self) -> tuple[Inputs, np.ndarray | None]:
        """The inputs (one array or named arrays) and targets (None: unsupervised), in place."""
        found: dict[str, np.ndarray] = {}
        if self.segment is not None:
            found.update({f.name: self.segment[f.name] for f in self.segment.layout})
        for key, (path, lo, hi) in self.files.items():
            found[key] = np.load(path, mmap_mode="r", allow_pickle=False)[lo:hi]
        y = found.pop("y", None)
        if self.csr_columns:
            csr = CSR(found["csr/indptr"], found["csr/indices"], found["csr/data"], self.csr_columns)
            return csr, y
        x = found["x"] if "x" in found else {k.removeprefix("x/"): v for k, v in found.items()}
        return x, y

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()

    def __enter__(self) -> TrainingData:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.segment is not None:
            self.segment.__exit__(*exc)  # unlinks it where this process created it


def share_training_data(data: Dataset) -> TrainingData:
    """Write the training split, except its mapped files, into a new segment (the caller
    owns it, ``.segment``, None when every array is a mapped file: use as a context
    manager, or unlink it)."""
    arrays = {k: a for k, a in _named_arrays(data.x_train, data.y_train).items() if k not in data.files}
    seg = None
    if arrays:
        seg = Segment.create(Layout.from_arrays(arrays), {"kind": "data"})
        for k, a in arrays.items():
            seg[k][...] = a
    columns = data.x_train.columns if isinstance(data.x_train, CSR) else 0
    return TrainingData(seg, dict(data.files), columns)


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
