"""Sparse rows (CSR) as inputs: kept as their three arrays in the data segment, handed to
the model as CSR batches (never densified), trained by sparse logistic regression."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import config

import paramserver as ps
from paramserver.data import CSR, make_dataset, share_training_data
from paramserver.models.numpy_models import NumpyModel, SparseLogisticRegression

scipy_sparse = pytest.importorskip("scipy.sparse")


def rcv1_like(n: int = 4000, features: int = 2000, nnz: int = 20, seed: int = 0):
    """Sparse unit rows and labels from a sparse linear teacher (an RCV1-style problem)."""
    rng = np.random.default_rng(seed)
    rows = [np.unique(rng.integers(0, features, nnz)) for _ in range(n)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64)
    data = rng.exponential(1.0, len(indices)).astype(np.float32)
    data /= np.repeat(np.sqrt(np.add.reduceat(data * data, indptr[:-1])), np.diff(indptr)).astype(np.float32)
    teacher = rng.standard_normal(features).astype(np.float32)
    margin = np.add.reduceat(data * teacher[indices], indptr[:-1])
    y = (margin > 0).astype(np.int64)
    return scipy_sparse.csr_matrix((data, indices, indptr), shape=(n, features)), y


class CSRRecorder(NumpyModel):
    """Records what a worker's batches are: their type, and whether they own their data."""

    def __init__(self, path: str, features: int):
        self.path, self.features = path, features

    def shapes(self):
        return {"b": (2,)}

    def init(self, rng):
        return {"b": np.zeros(2, np.float32)}

    def forward(self, params, x):
        import multiprocessing

        if multiprocessing.current_process().name.startswith("paramserver-worker"):
            with open(self.path, "a") as f:
                owns = x.indices.flags.owndata or x.data.flags.owndata
                f.write(f"{type(x).__name__} {x.shape[1]} {len(x)} {x.nnz} {int(owns)}\n")
        return np.zeros((len(x), 2), np.float32) + params["b"], None

    def backward(self, params, cache, dlogits, grads):
        np.sum(dlogits, axis=0, out=grads["b"])


def test_a_csr_slice_is_a_view_of_its_arrays_and_a_gather_keeps_rows_whole():
    m, _ = rcv1_like(n=50, features=100, nnz=5)
    x = CSR.from_scipy(m)
    part = x[10:20]
    assert np.shares_memory(part.indices, x.indices) and np.shares_memory(part.data, x.data)
    np.testing.assert_array_equal(part.toarray(), m[10:20].toarray())
    picked = x[np.array([3, 0, 49])]
    np.testing.assert_array_equal(picked.toarray(), m[[3, 0, 49]].toarray())


def test_csr_inputs_live_in_the_data_segment_as_three_arrays():
    m, y = rcv1_like(n=200, features=1000, nnz=5)
    data = make_dataset(m, y)
    assert isinstance(data.x_train, CSR) and data.input_shape == (1000,)
    np.testing.assert_array_equal(data.x_train.toarray().sum(), data.x_train.data.sum())
    with share_training_data(data) as shared:
        seg = shared.segment
        assert sorted(f.name for f in seg.layout) == ["csr/data", "csr/indices", "csr/indptr", "y"]
        x, y_seen = shared.arrays()
        np.testing.assert_array_equal(x.toarray(), data.x_train.toarray())
        del x, y_seen


def test_csr_batches_reach_the_model_without_densifying(tmp_path):
    m, y = rcv1_like(n=400, features=5000, nnz=8)
    log = tmp_path / "batches"
    ps.train(CSRRecorder(str(log), 5000), (m, y), config(workers=2, epochs=1, batch_size=16))
    lines = [line.split() for line in log.read_text().splitlines()]
    assert lines and all(kind == "CSR" and int(cols) == 5000 for kind, cols, *_ in lines)
    assert all(int(n) <= 16 and int(nnz) <= 16 * 8 for _, _, n, nnz, _ in lines)
    assert all(owns == "0" for *_, owns in lines), "a batch's indices and values must be views of the segment"


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sparse_logistic_regression_learns_rcv1_like_data(backend):
    m, y = rcv1_like()
    if backend == "numpy":
        model = SparseLogisticRegression(2000, 2)
    else:
        import torch

        from paramserver.models.torch_models import SparseLinear

        torch.manual_seed(0)
        model = SparseLinear(2000, 2)
    from sklearn.linear_model import LogisticRegression

    data = make_dataset(m, y)
    train = scipy_sparse.csr_matrix(
        (data.x_train.data, data.x_train.indices, data.x_train.indptr), data.x_train.shape
    )
    test = scipy_sparse.csr_matrix(
        (data.x_test.data, data.x_test.indices, data.x_test.indptr), data.x_test.shape
    )
    # What an exact solver reaches on this split (about 0.78: few samples per feature).
    best = LogisticRegression(C=100, max_iter=2000).fit(train, data.y_train).score(test, data.y_test)
    cfg = config(workers=2, epochs=10, lr=2.0, momentum=0.0, batch_size=8)
    result = ps.train(model, data, cfg)
    assert result.test_accuracy >= 0.92 * best, (result.summary(), best)


def test_a_sparse_step_touches_only_the_features_of_its_batch():
    m, y = rcv1_like(n=300, features=50_000, nnz=5)
    used = np.unique(m.indices)
    result = ps.train(SparseLogisticRegression(50_000, 2), (m, y), config(workers=2, epochs=1, momentum=0.0))
    w = result.params["W"]
    untouched = np.setdiff1d(np.arange(50_000), used)
    assert np.all(w[untouched] == 0) and np.any(w[used] != 0)


def test_svmlight_and_csr_npz_files_load_as_sparse_rows(tmp_path):
    from sklearn.datasets import dump_svmlight_file

    m, y = rcv1_like(n=60, features=300, nnz=4)
    dump_svmlight_file(m, np.where(y > 0, 1, -1), str(tmp_path / "d.svm"))
    data = ps.load(str(tmp_path / "d.svm"), test_fraction=0.5)
    assert isinstance(data.x_train, CSR) and data.task == "classify" and data.classes == 2
    np.savez(tmp_path / "d.npz", indptr=m.indptr, indices=m.indices, data=m.data, shape=m.shape, y=y)
    data = ps.load(str(tmp_path / "d.npz"))
    assert isinstance(data.x_train, CSR) and data.x_train.columns == 300
    bad = CSR(np.array([0, 2, 1]), np.array([0, 1]), np.ones(2, np.float32), 5)
    with pytest.raises(ValueError, match="CSR indptr must start at 0 and never decrease"):
        make_dataset(bad, np.array([0, 1]))
