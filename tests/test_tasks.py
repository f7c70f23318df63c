"""Any task a training backend is handed: regression, no targets, several inputs, custom
metrics, memory-mapped files, torch and tf data sets, and the errors of wrong combinations."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import config

import paramserver as ps
from paramserver.data import load_npy, make_dataset
from paramserver.metrics import accuracy, mae, mse, r2, resolve, top5
from paramserver.models.numpy_models import LinearRegression, NumpyModel
from paramserver.store import list_segments


def regression(n: int = 2000, features: int = 8, outputs: int = 1, seed: int = 0):
    """A linear problem with a little noise: R^2 of the true map is about 0.99."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    w = rng.normal(size=(features, outputs))
    y = (x @ w + 0.1 * rng.normal(size=(n, outputs))).astype(np.float32)
    return x, (y[:, 0] if outputs == 1 else y)


def two_inputs(n: int = 2400, vocab: int = 40, seed: int = 0):
    """Label = (id class of the first id) xor (sign of the first dense feature): needs both."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, 3)).astype(np.int64)
    dense = rng.normal(size=(n, 4)).astype(np.float32)
    y = ((ids[:, 0] < vocab // 2) ^ (dense[:, 0] > 0)).astype(np.int64)
    return {"ids": ids, "dense": dense}, y


# -- models (module level: spawned workers import them) -----------------------------------------


def torch_regressor():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def keras_regressor():
    import keras

    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
    )


def keras_two_inputs():
    import keras

    ids = keras.Input((3,), name="ids", dtype="int64")
    dense = keras.Input((4,), name="dense_features")
    e = keras.layers.Flatten()(keras.layers.Embedding(40, 8)(ids))
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([e, dense]))
    return keras.Model({"ids": ids, "dense_features": dense}, keras.layers.Dense(2)(h))


class TwoInputTorch:
    """Built lazily so that importing this module needs no torch."""

    def __new__(cls):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.EmbeddingBag(40, 8, mode="mean")
                self.first = torch.nn.Embedding(40, 8)
                self.mlp = torch.nn.Sequential(
                    torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
                )

            def forward(self, ids, dense):
                return self.mlp(torch.cat([self.embed(ids), self.first(ids[:, 0]), dense], dim=1))

        torch.manual_seed(0)
        return Net()


class NumpyTwoInputs(NumpyModel):
    """Logistic regression on a one-hot of the first id and the dense features (a dict input)."""

    vocab = 40

    def shapes(self):
        return {"E": (self.vocab, 2), "W": (4, 2), "b": (2,)}

    def init(self, rng):
        return {k: np.zeros(s, np.float32) for k, s in self.shapes().items()}

    def forward(self, params, x):
        first, dense = x["ids"][:, 0], x["dense"]
        # The xor needs a product of the two: one feature per (id class, sign) pair.
        cross = dense * np.where(first[:, None] < self.vocab // 2, 1.0, -1.0).astype(np.float32)
        return params["E"][first] + cross @ params["W"] + params["b"], (first, cross)

    def backward(self, params, cache, dlogits, grads):
        first, cross = cache
        grads["E"][...] = 0
        np.add.at(grads["E"], first, dlogits)
        np.matmul(cross.T, dlogits, out=grads["W"])
        np.sum(dlogits, axis=0, out=grads["b"])


def mean_abs_error(outputs, targets):  # a custom metric: module level, so it pickles
    return float(np.mean(np.abs(outputs.reshape(len(targets), -1) - targets.reshape(len(targets), -1))))


# -- regression: R^2 >= 0.95 with 2 workers on every backend ----------------------------------------


def _regress_config(**kw):
    return config(workers=2, epochs=6, lr=0.01, target_metric="r2", **kw)


def test_torch_regression_reaches_r2_095_with_two_workers():
    result = ps.train(torch_regressor(), regression(), _regress_config())
    assert result.metric == "r2" and result.test_metric >= 0.95, result.summary()
    assert result.test_accuracy is None
    assert "test r2 " in result.summary()


def test_numpy_regression_reaches_r2_095_with_two_workers():
    result = ps.train(LinearRegression(8, 1), regression(), _regress_config())
    assert result.test_metric >= 0.95, result.summary()


def test_tf_regression_reaches_r2_095_with_two_workers():
    pytest.importorskip("tensorflow")
    result = ps.train(ps.KerasModel(keras_regressor), regression(), _regress_config())
    assert result.test_metric >= 0.95, result.summary()


def test_numpy_linear_regression_matches_the_closed_form():
    x, y = regression(n=1000, features=5, outputs=2, seed=3)
    data = make_dataset(x, y, x_test=x[:200], y_test=y[:200])
    cfg = config(workers=1, epochs=60, lr=0.05, momentum=0.9, batch_size=50)
    result = ps.train(LinearRegression(5, 2), data, cfg)
    design = np.hstack([data.x_train, np.ones((len(data.x_train), 1), np.float32)])
    exact, *_ = np.linalg.lstsq(design, data.y_train, rcond=None)
    np.testing.assert_allclose(result.params["W"], exact[:5], atol=0.02)
    np.testing.assert_allclose(result.params["b"], exact[5], atol=0.02)


def test_multi_output_targets_keep_their_shape():
    x, y = regression(n=600, outputs=3)
    data = make_dataset(x, y)
    assert data.task == "regress" and data.target_shape == (3,) and data.outputs == 3
    result = ps.train(
        LinearRegression(8, 3), data, config(workers=2, epochs=10, lr=0.02, target_metric="mse")
    )
    assert result.test_metric < 0.1, result.summary()


def test_an_autoencoder_trains_without_targets():
    import torch

    x, _ = regression(n=800)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 8))
    data = make_dataset(x, None)
    assert data.task == "unsupervised" and data.y_train is None
    before = float(np.mean(x**2))  # the loss of an output of zeros
    result = ps.train(model, data, config(workers=2, epochs=8, lr=0.02, target_metric="mse"))
    assert result.test_metric < 0.6 * before, result.summary()


# -- several inputs --------------------------------------------------------------------------


def test_a_torch_model_of_two_inputs_gets_them_by_name_and_learns():
    x, y = two_inputs()
    result = ps.train(TwoInputTorch(), (x, y), config(workers=2, epochs=12, lr=0.05))
    assert result.test_accuracy > 0.8, result.summary()


def test_a_numpy_model_of_two_inputs_gets_the_dict_and_learns():
    x, y = two_inputs()
    result = ps.train(NumpyTwoInputs(), (x, y), config(workers=2, epochs=8, lr=0.2, momentum=0.5))
    assert result.test_accuracy > 0.9, result.summary()


def test_a_keras_model_of_two_inputs_gets_a_dict_and_learns():
    pytest.importorskip("tensorflow")
    x, y = two_inputs()
    x = {"ids": x["ids"], "dense_features": x["dense"]}
    result = ps.train(ps.KerasModel(keras_two_inputs), (x, y), config(workers=2, epochs=12, lr=0.05))
    assert result.test_accuracy > 0.8, result.summary()


def test_named_inputs_keep_their_dtypes_and_rows_together():
    x, y = two_inputs(n=100)
    data = make_dataset(x, y, seed=1)
    assert data.x_train["ids"].dtype == np.int64 and data.x_train["dense"].dtype == np.float32
    assert data.input_shape == {"ids": (3,), "dense": (4,)}
    # The split moved each sample's rows together: the label still follows from them.
    for split_x, split_y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        expected = (split_x["ids"][:, 0] < 20) ^ (split_x["dense"][:, 0] > 0)
        np.testing.assert_array_equal(split_y, expected.astype(np.int64))


# -- metrics ----------------------------------------------------------------------------------


def test_named_metrics_agree_with_scikit_learn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 7)), rng.integers(0, 7, 200)
    assert accuracy(logits, labels) == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert top5(logits, labels) == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(7)))
    out, t = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    assert mse(out, t) == pytest.approx(mean_squared_error(t, out))
    assert mae(out, t) == pytest.approx(mean_absolute_error(t, out))
    assert r2(out, t) == pytest.approx(r2_score(t, out))
    assert r2(out[:, :1], t[:, 0]) == pytest.approx(r2_score(t[:, 0], out[:, 0]))  # (n, 1) against (n,)


def test_a_custom_metric_stops_the_run_within_one_evaluation_interval():
    cfg = config(
        workers=2, epochs=200, lr=0.01, target_metric=mean_abs_error, target=0.2,
        target_direction="below", eval_every_updates=20,
    )  # fmt: skip
    result = ps.train(torch_regressor(), regression(), cfg)
    assert result.stop_reason == "target_metric", result.summary()
    scores = [e["test_mean_abs_error"] for e in result.evaluations]
    # The last evaluation is the first to reach the target, and the run stopped right after it.
    assert scores[-1] <= 0.2 and all(s > 0.2 for s in scores[:-1]), scores
    assert result.updates - result.evaluations[-1]["updates"] <= 20 + 2 * cfg.workers
    assert result.metric == "mean_abs_error"


def test_a_named_metric_target_knows_its_direction():
    cfg = config(workers=2, epochs=200, lr=0.01, target_metric="r2", target=0.9, eval_every_updates=20)
    result = ps.train(torch_regressor(), regression(), cfg)
    assert result.stop_reason == "target_metric"
    scores = [e["test_r2"] for e in result.evaluations]
    assert scores[-1] >= 0.9 and all(s < 0.9 for s in scores[:-1]), scores


def test_metric_choices_are_checked_against_the_task():
    assert resolve("auto", "classify").name == "accuracy"
    assert resolve("auto", "regress").name == "loss"
    with pytest.raises(ValueError, match="metric 'accuracy' does not apply to task 'regress'; choose one of"):
        resolve("accuracy", "regress")
    with pytest.raises(ValueError, match="a callable target_metric has no known direction"):
        ps.TrainConfig(target_metric=mean_abs_error, target=0.1)
    with pytest.raises(ValueError, match="target_accuracy applies to classification"):
        ps.train(torch_regressor(), regression(n=100), config(target_accuracy=0.9))


# -- data sources -----------------------------------------------------------------------------


def test_memory_mapped_npy_trains_with_nothing_of_it_in_shared_memory(tmp_path):
    x, y = regression(n=40_000, features=64)  # 10 MB of inputs
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    data = load_npy(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    assert set(data.files) == {"x", "y"} and isinstance(data.x_train, np.memmap)
    sizes: list[int] = []

    def watch(info):
        sizes.append(sum(size for _, pid, size in list_segments() if pid == os.getpid()))
        return min(info["steps"]) >= 50

    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1)
    result = ps.train(model, data, config(workers=2, epochs=50, lr=0.01, target_metric="r2"), callback=watch)
    assert result.stop_reason == "callback" and result.test_metric > 0.5, result.summary()
    # Every segment of the run together (parameters, optimizer state, counters) is far
    # smaller than the inputs: they were never copied into /dev/shm.
    assert sizes and max(sizes) < x.nbytes / 20, (max(sizes), x.nbytes)


def test_a_memory_mapped_split_is_by_rows_and_copies_nothing(tmp_path):
    x, y = regression(n=100)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    data = load_npy(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), test_fraction=0.2)
    np.testing.assert_array_equal(data.x_train, x[:80])
    np.testing.assert_array_equal(data.x_test, x[80:])
    assert data.files == {"x": (str(tmp_path / "x.npy"), 0, 80), "y": (str(tmp_path / "y.npy"), 0, 80)}
    np.save(tmp_path / "x64.npy", x.astype(np.float64))
    with pytest.raises(TypeError, match="save it as float32"):
        load_npy(str(tmp_path / "x64.npy"), str(tmp_path / "y.npy"))


def test_a_torch_dataset_trains():
    import torch

    x, y = regression(n=1500)
    source = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    result = ps.train(torch_regressor(), source, _regress_config())
    assert result.test_metric >= 0.95, result.summary()


def test_a_tf_data_dataset_trains():
    tf = pytest.importorskip("tensorflow")
    x, y = regression(n=1500)
    source = tf.data.Dataset.from_tensor_slices((x, y)).batch(100)
    data = ps.data.as_dataset(source, seed=0)
    assert len(data) + len(data.y_test) == 1500 and data.task == "regress"
    result = ps.train(LinearRegression(8, 1), source, _regress_config())
    assert result.test_metric >= 0.95, result.summary()
    with pytest.raises(ValueError, match="infinite"):
        ps.data.as_dataset(tf.data.Dataset.from_tensor_slices((x, y)).repeat(), seed=0)


# -- wrong combinations: an error naming the fix, before any worker starts ----------------------


def test_float_targets_with_cross_entropy_name_the_fix():
    import torch

    with pytest.raises(ValueError, match="the loss cross_entropy takes class labels, but the data has float"):
        ps.train(torch_regressor(), regression(n=100), config(), loss=torch.nn.functional.cross_entropy)


def test_labels_out_of_range_name_the_fix():
    x, _ = regression(n=100)
    with pytest.raises(
        ValueError, match=r"must be in \[0, 3\), found 0..7; relabel the classes as 0..classes-1"
    ):
        make_dataset(x, np.arange(100) % 8, classes=3)


def test_a_dict_input_to_a_model_of_one_tensor_names_the_fix():
    x, y = two_inputs(n=200)
    with pytest.raises(
        ValueError, match=r"does not take the data's named inputs \(ids, dense\).*forward\(self, ids, dense\)"
    ):
        ps.train(torch_regressor(), (x, y), config())


def test_a_model_of_the_wrong_output_size_is_found_before_workers_start():
    x, y = regression(n=100, outputs=3)
    with pytest.raises(
        ValueError,
        match=r"outputs shaped \(1,\) per sample, but the task 'regress' needs outputs shaped \(3,\)",
    ):
        ps.train(torch_regressor(), (x, y), config())


def test_unsupervised_data_with_targets_and_a_stated_task_that_does_not_fit():
    x, y = regression(n=100)
    with pytest.raises(ValueError, match="task 'unsupervised' takes no targets"):
        make_dataset(x, y, task="unsupervised")
    with pytest.raises(ValueError, match="the data is for task 'regress', the config asks for 'classify'"):
        ps.train(torch_regressor(), make_dataset(x, y), config(task="classify"))


# -- the command line -------------------------------------------------------------------------


def test_cli_trains_a_regression_from_an_npz(tmp_path):
    x, y = regression(n=1500)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    proc = subprocess.run(
        [sys.executable, "-m", "paramserver", "train", "--data", str(tmp_path / "reg.npz"), "--workers", "2",
         "--epochs", "6", "--lr", "0.01", "--target-metric", "r2", "--out-dir", str(tmp_path / "runs"),
         "--no-progress"],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "regression" in proc.stderr and "test r2 " in proc.stdout, (proc.stdout, proc.stderr)
    r2_value = float(proc.stdout.split("test r2 ")[1].split(",")[0])
    assert r2_value >= 0.95, proc.stdout


def test_load_maps_a_npy_of_inputs_with_its_targets_and_names_bad_files(tmp_path):
    x, y = regression(n=50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    data = ps.load(str(tmp_path / "x.npy"), targets=str(tmp_path / "y.npy"))
    assert data.task == "regress" and set(data.files) == {"x", "y"}
    assert ps.load(str(tmp_path / "x.npy")).task == "unsupervised"
    (tmp_path / "bad.npy").write_text("not numbers")
    with pytest.raises(ValueError, match="is not a NumPy .npy file"):
        ps.load(str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="targets .* goes with a .npy file of inputs"):
        ps.load("digits", targets=str(tmp_path / "y.npy"))
