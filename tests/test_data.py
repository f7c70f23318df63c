"""Data sets: checks, splits, loaders, sharing, and how workers walk their shard."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.data import (
    Dataset,
    batch_starts,
    epoch_orders,
    load,
    load_digits,
    load_npz,
    make_dataset,
    shard,
    share_training_data,
)
from paramserver.store import Segment


def _xy(n: int = 100, features: int = 3, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose first feature is the sample's index, so that splits can be traced back."""
    x = np.zeros((n, features), np.float32)
    x[:, 0] = np.arange(n)
    y = np.arange(n) % classes
    return x, y


# -- make_dataset: checks -------------------------------------------------------------------


def test_length_mismatch():
    x, y = _xy(10)

    with pytest.raises(ValueError, match="x has 10 samples but y has 9; they must match"):
        make_dataset(x, y[:9])


def test_labels_out_of_range_for_given_classes():
    x, y = _xy(10, classes=5)

    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), found 0\.\.4; relabel"):
        make_dataset(x, y, classes=3)


def test_negative_labels():
    x, y = _xy(10)
    y[3] = -1

    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), found -1\.\.4"):
        make_dataset(x, y)


def test_test_labels_out_of_range():
    x, y = _xy(10)
    xt, yt = _xy(4)
    yt[0] = 7

    with pytest.raises(ValueError, match=r"test labels must be in \[0, 5\)"):
        make_dataset(x, y, x_test=xt, y_test=yt, classes=5)


def test_one_dimensional_x():
    with pytest.raises(ValueError, match=r"x must have shape \(samples, features\.\.\.\), got \(10,\)"):
        make_dataset(np.zeros(10, np.float32), np.zeros(10, np.int64))


def test_two_dimensional_y():
    x, y = _xy(10)

    with pytest.raises(ValueError, match=r"y must be one class label per sample \(1-D\)"):
        make_dataset(x, y.reshape(10, 1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x(bad):
    x, y = _xy(10)
    x[4, 1] = bad

    with pytest.raises(ValueError, match="training data: x contains NaN or Inf"):
        make_dataset(x, y)


def test_non_finite_test_x():
    x, y = _xy(10)
    xt, yt = _xy(4)
    xt[0, 0] = np.nan

    with pytest.raises(ValueError, match="test data: x contains NaN or Inf"):
        make_dataset(x, y, x_test=xt, y_test=yt)


def test_only_x_test_given():
    x, y = _xy(10)

    with pytest.raises(ValueError, match="give both x_test and y_test, or neither"):
        make_dataset(x, y, x_test=x[:3])


def test_only_y_test_given():
    x, y = _xy(10)

    with pytest.raises(ValueError, match="give both x_test and y_test, or neither"):
        make_dataset(x, y, y_test=y[:3])


def test_test_inputs_of_other_shape():
    x, y = _xy(10, features=3)
    xt, yt = _xy(4, features=2)

    with pytest.raises(ValueError, match=r"test inputs have shape \(2,\), training inputs \(3,\)"):
        make_dataset(x, y, x_test=xt, y_test=yt)


def test_no_samples():
    with pytest.raises(ValueError, match="no samples"):
        make_dataset(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))


def test_non_integer_labels():
    x, y = _xy(10)

    with pytest.raises(TypeError, match="y must hold integer class labels"):
        make_dataset(x, y + 0.5, task="classify")


def test_non_numeric_x():
    with pytest.raises(TypeError, match="x must be numeric"):
        make_dataset(np.array([["a"], ["b"]]), np.array([0, 1]))


def test_test_fraction_leaving_no_training_samples():
    x, y = _xy(10)

    with pytest.raises(ValueError, match="leaves no training samples"):
        make_dataset(x, y, test_fraction=1.0)


# -- make_dataset: splits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "n_test"),
    [(100, 0.2, 20), (100, 0.25, 25), (10, 0.01, 1), (7, 0.5, 4), (1797, 0.2, 359)],
)
def test_split_sizes(n, fraction, n_test):
    x, y = _xy(n)

    d = make_dataset(x, y, test_fraction=fraction)

    assert len(d.x_test) == len(d.y_test) == n_test
    assert len(d.x_train) == len(d.y_train) == n - n_test


def test_split_is_a_partition_with_labels_kept_with_inputs():
    x, y = _xy(100)

    d = make_dataset(x, y, seed=3)

    ids = np.concatenate([d.x_train[:, 0], d.x_test[:, 0]]).astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))
    np.testing.assert_array_equal(d.y_train, d.x_train[:, 0].astype(int) % 5)
    np.testing.assert_array_equal(d.y_test, d.x_test[:, 0].astype(int) % 5)
    assert not np.array_equal(d.x_train[:, 0], np.sort(d.x_train[:, 0]))  # shuffled
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.x_train.flags.c_contiguous and d.y_train.flags.c_contiguous
    assert d.classes == 5
    assert d.input_shape == (3,)


def test_split_depends_on_seed_only():
    x, y = _xy(100)

    a, b, c = make_dataset(x, y, seed=1), make_dataset(x, y, seed=1), make_dataset(x, y, seed=2)

    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_given_test_set_is_kept_and_training_set_shuffled():
    x, y = _xy(50)
    xt, yt = _xy(8)
    xt[:, 1] = 1.0

    d = make_dataset(x, y, x_test=xt, y_test=yt)

    np.testing.assert_array_equal(d.x_test, xt)
    np.testing.assert_array_equal(d.y_test, yt)
    assert len(d.x_train) == 50
    np.testing.assert_array_equal(np.sort(d.x_train[:, 0]), np.arange(50))
    np.testing.assert_array_equal(d.y_train, d.x_train[:, 0].astype(int) % 5)


def test_classes_inferred_from_both_splits():
    x, y = _xy(20, classes=3)
    xt, yt = _xy(4, classes=3)
    yt[0] = 6

    d = make_dataset(x, y, x_test=xt, y_test=yt)

    assert d.classes == 7


def test_float_labels_that_are_whole_numbers_are_accepted():
    x, y = _xy(20)

    d = make_dataset(x, y.astype(np.float64), task="classify")

    assert d.y_train.dtype == np.int64
    assert set(np.concatenate([d.y_train, d.y_test])) == set(range(5))


# -- loaders -----------------------------------------------------------------------------------


def test_load_digits_shapes_and_range():
    d = load_digits()

    assert isinstance(d, Dataset)
    assert d.name == "digits"
    assert d.classes == 10
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64)
    assert d.y_train.shape == (1438,) and d.y_test.shape == (359,)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    for x in (d.x_train, d.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (d.y_train, d.y_test):
        assert y.min() == 0 and y.max() == 9
    assert d.input_shape == (64,)
    assert "1438 train / 359 test" in d.describe()


def test_load_digits_split_options():
    d = load_digits(test_fraction=0.5, seed=1)

    assert len(d.x_train) + len(d.x_test) == 1797
    assert len(d.x_test) == 898


def test_load_spec():
    assert load("digits").name == "digits"
    with pytest.raises(
        ValueError, match=r"unknown data set 'mnist'; pass 'digits' or a path ending in \.npz"
    ):
        load("mnist")


def test_load_npz(tmp_path):
    x, y = _xy(40)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)

    d = load_npz(str(path), test_fraction=0.25)

    assert d.name == "mine.npz"
    assert len(d.x_train) == 30 and len(d.x_test) == 10
    np.testing.assert_array_equal(np.sort(np.concatenate([d.x_train[:, 0], d.x_test[:, 0]])), np.arange(40))


def test_load_npz_with_test_split(tmp_path):
    x, y = _xy(40)
    xt, yt = _xy(6)
    path = tmp_path / "split.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)

    d = load(str(path))

    assert len(d.x_train) == 40
    np.testing.assert_array_equal(d.x_test, xt)


def test_load_npz_missing_y_names_arrays_found(tmp_path):
    x, _ = _xy(10)
    path = tmp_path / "noy.npz"
    np.savez(path, x=x, labels=np.zeros(10))

    with pytest.raises(ValueError, match=r"has arrays \['labels', 'x'\]; it needs 'x' \(inputs\) and 'y'"):
        load_npz(str(path))


def test_load_npz_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_npz(str(tmp_path / "nope.npz"))


def test_load_npz_text_file(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("x,y\n1,2\n")

    with pytest.raises(ValueError, match="is not a NumPy .npz file"):
        load_npz(str(path))


def test_load_npz_object_arrays_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([[object()]], dtype=object), y=np.zeros(1, np.int64))

    with pytest.raises(ValueError, match="is not a NumPy .npz file of plain arrays"):
        load_npz(str(path))


def _write_npy_named_npz(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros((4, 2)))


def _write_empty(path):
    path.write_bytes(b"")


def _write_truncated_zip(path):
    x, y = _xy(10)
    np.savez(path, x=x, y=y)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "write",
    [_write_npy_named_npz, _write_empty, _write_truncated_zip],
    ids=["npy-content", "empty", "truncated-zip"],
)
def test_load_npz_other_non_npz_files_raise_value_error(tmp_path, write):
    path = tmp_path / "broken.npz"
    write(path)

    with pytest.raises(ValueError, match=r"broken\.npz"):
        load_npz(str(path))


# -- sharing the training split ---------------------------------------------------------------


def test_share_training_data():
    d = make_dataset(*_xy(30))

    with share_training_data(d) as shared:
        seg = shared.segment
        assert shared.files == {}
        assert isinstance(seg, Segment)
        assert seg.meta == {"kind": "data"}
        np.testing.assert_array_equal(seg["x"], d.x_train)
        np.testing.assert_array_equal(seg["y"], d.y_train)
        assert seg["x"].dtype == np.float32 and seg["y"].dtype == np.int64
        other = Segment.attach(seg.name, kind="data")
        try:
            np.testing.assert_array_equal(other["x"], d.x_train)
        finally:
            other.close()


# -- shards and batches -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 7, 100, 1001])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_shards_cover_range_exactly(n, workers):
    ranges = [shard(n, rank, workers) for rank in range(workers)]

    assert ranges[0][0] == 0
    assert ranges[-1][1] == n
    for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False):
        assert hi == lo  # contiguous: no gap, no overlap
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
    np.testing.assert_array_equal(covered, np.arange(n))
    sizes = [hi - lo for lo, hi in ranges]
    assert min(sizes) >= 0
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_batch_starts_last_batch_may_be_short():
    np.testing.assert_array_equal(batch_starts(10, 33, 8), [10, 18, 26])
    np.testing.assert_array_equal(batch_starts(0, 32, 8), [0, 8, 16, 24])
    assert len(batch_starts(5, 5, 8)) == 0


@pytest.mark.parametrize(("lo", "hi", "batch"), [(0, 1000, 10), (250, 999, 32), (3, 200, 7)])
def test_epoch_orders_are_permutations_that_change(lo, hi, batch):
    starts = batch_starts(lo, hi, batch)
    orders = epoch_orders(lo, hi, batch, seed=0)

    epochs = [next(orders) for _ in range(4)]

    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), starts)
    for i in range(len(epochs)):
        for j in range(i + 1, len(epochs)):
            assert not np.array_equal(epochs[i], epochs[j]), (i, j)
    assert not np.array_equal(epochs[0], starts)


def test_epoch_orders_depend_on_seed():
    a = epoch_orders(0, 500, 10, seed=1)
    b = epoch_orders(0, 500, 10, seed=1)
    c = epoch_orders(0, 500, 10, seed=2)

    first_a, first_b, first_c = next(a), next(b), next(c)

    np.testing.assert_array_equal(first_a, first_b)
    np.testing.assert_array_equal(next(a), next(b))
    assert not np.array_equal(first_a, first_c)
