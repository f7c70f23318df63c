"""The TensorFlow backend: reference training, every policy, lost updates, accuracy, errors.

Every spawned TF worker pays TensorFlow's import (seconds), so the runs here are
few and small; this process imports TensorFlow once for all of them. Models and
losses are module-level functions (the workers unpickle them by reference) that
import TensorFlow inside, so that importing this module does not.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from helpers import config, small

import paramserver as ps
from paramserver.data import epoch_orders

if importlib.util.find_spec("tensorflow") is None:  # not imported here: see the fixture
    pytest.skip("the tf backend needs TensorFlow: pip install 'paramserver[tf]'", allow_module_level=True)


@pytest.fixture(scope="module")
def tf():
    from paramserver.workers.tf_backend import import_tf

    return import_tf()


# -- models (module level: workers unpickle them by reference) -------------------------------


def seeded_mlp(inputs: int = 64, hidden: int = 16, classes: int = 10):
    """The same initial values at every build (seeded initializers), for reference runs."""
    import keras

    init = keras.initializers.GlorotUniform
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="relu", kernel_initializer=init(seed=1)),
        keras.layers.Dense(classes, kernel_initializer=init(seed=2)),
    ])  # fmt: skip


def subclassed_mlp(hidden: int = 64, classes: int = 10):
    """A subclassed Keras model: its variables exist only after the first call."""
    import keras

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(hidden, activation="relu")
            self.out = keras.layers.Dense(classes)

        def call(self, x, training=False):
            return self.out(self.hidden(x))

    return Net()


def bn_mlp(hidden: int = 32, classes: int = 10):
    import keras

    return keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(hidden), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Dense(classes),
    ])  # fmt: skip


def constant_grad_module(n: int):
    """A plain tf.Module whose gradient is 1 everywhere (with ``first_logit`` as the loss)."""
    import tensorflow as tf

    class ConstantGrad(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.zeros([n]), name="w")

        def __call__(self, x):
            total = tf.fill([tf.shape(x)[0]], tf.reduce_sum(self.w))
            return tf.stack([total, tf.zeros_like(total)], axis=1)

    return ConstantGrad()


def first_logit(labels, logits):
    """Loss: the mean first logit (for ``constant_grad_module``: d loss / d w = 1)."""
    import tensorflow as tf

    return tf.reduce_mean(logits[:, 0])


# -- import and set-up ---------------------------------------------------------------------


def test_import_paramserver_does_not_import_tensorflow():
    code = "import sys, paramserver; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_layout_comes_from_the_trainable_variables_in_order(tf, digits):
    from paramserver.workers.tf_backend import model_spec

    spec, layout, init = model_spec(ps.KerasModel(bn_mlp), None, digits)
    assert spec.backend == "tf"
    assert [f.shape for f in layout] == [(64, 32), (32,), (32,), (32,), (32, 10), (10,)]
    assert layout.names[2:4] == [n for n in layout.names if "batch_normalization" in n]  # gamma, beta
    assert not any("moving" in n for n in layout.names), "batch-norm statistics are not trained"
    assert layout.dtype == np.float32 and init.shape == (layout.flat_size,)
    # Subclassed: built on zeros of the data's input shape; tf.Module: unique names.
    _, sub, _ = model_spec(ps.KerasModel(subclassed_mlp), None, digits)
    assert [f.shape for f in sub] == [(64, 64), (64,), (64, 10), (10,)]
    module = ps.KerasModel(functools.partial(constant_grad_module, 5))
    _, mod, _ = model_spec(module, None, ps.make_dataset(np.zeros((8, 4)), np.arange(8) % 2))
    assert mod.names == ["w"]


def test_pull_copies_the_shared_parameters_and_never_aliases_them(tf, digits):
    from paramserver.workers.tf_backend import TFBackend, model_spec

    spec, layout, init = model_spec(ps.KerasModel(seeded_mlp), None, digits)
    with ps.ParamStore.create_for(layout, workers=1) as store:
        store.params[...] = init
        grad = np.zeros_like(store.params)
        backend = TFBackend(spec, layout, store.params, grad)
        x, y = digits.x_train[:32], digits.y_train[:32]
        backend.forward(x, y)
        backend.backward()
        variables = backend.model.trainable_variables
        views = layout.unflatten(store.params)
        for v, name in zip(variables, layout.names, strict=True):
            np.testing.assert_array_equal(v.numpy(), views[name], err_msg=name)
        assert np.any(grad != 0) and np.all(np.isfinite(grad))
        # Writes to the segment do not reach the variables until the next pull ...
        before = [v.numpy().copy() for v in variables]
        store.params[...] += 1.0
        for v, b in zip(variables, before, strict=True):
            np.testing.assert_array_equal(v.numpy(), b)
        # ... and writes to the variables never reach the segment.
        snapshot = store.params.copy()
        for v in variables:
            v.assign(v + 5.0)
        np.testing.assert_array_equal(store.params, snapshot)
        backend.pull()
        for v, name in zip(variables, layout.names, strict=True):
            np.testing.assert_array_equal(v.numpy(), views[name], err_msg=name)
        # The padding between tensors stays zero in the gradient.
        used = np.zeros(layout.flat_size, bool)
        for f in layout:
            used[f.offset // 4 : f.offset // 4 + f.size] = True
        backend.forward(x, y)
        backend.backward()
        assert np.all(grad[~used] == 0)
        del backend, views, variables


def test_fused_and_split_steps_give_the_same_loss_and_gradient(tf, digits):
    """po3/striped compute the gradient in forward(), po1/po2 in backward(): same numbers."""
    from paramserver.workers.tf_backend import TFBackend, model_spec

    spec, layout, init = model_spec(ps.KerasModel(bn_mlp), None, digits)
    x, y = digits.x_train[:32], digits.y_train[:32]
    out = {}
    for fused in (True, False):
        grad = np.zeros_like(init)
        policy = "po3" if fused else "po1"  # po3 computes the gradient in forward, po1 in backward
        backend = TFBackend(spec, layout, init, grad, config=ps.TrainConfig(policy=policy, out_dir=""))
        assert backend.fused == fused
        loss = backend.forward(x, y)
        backend.backward()
        stats = [v.numpy() for v in backend.model.non_trainable_variables]
        out[fused] = (loss, grad, stats)
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-5, atol=1e-7)
    # The split step's extra forward pass must not update the batch-norm statistics twice.
    for a, b in zip(out[True][2], out[False][2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_server_copy_re_estimates_batch_norm_statistics_from_training_data(tf, digits):
    from paramserver.workers.tf_backend import TFBackend, model_spec

    spec, layout, init = model_spec(ps.KerasModel(bn_mlp), None, digits)
    backend = TFBackend(spec, layout, init, None)
    model = backend.trained_model()
    mean = next(v for v in model.non_trainable_variables if "moving_mean" in v.path)
    dense = model.layers[0]
    pre = dense(digits.x_train[:1024]).numpy()
    np.testing.assert_allclose(mean.numpy(), pre.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert [ly.momentum for ly in model.layers if hasattr(ly, "momentum")] == [0.99]  # restored


# -- one worker equals plain single-process training on the same batches ----------------


# po3 computes the gradient in forward(), po1 in backward(); the two steps are compared in
# this process above, so the po1 run is left to the slow set.
@pytest.mark.parametrize("policy", ["po3", pytest.param("po1", marks=pytest.mark.slow)])
def test_one_tf_worker_equals_single_process_tf_training(tf, digits, policy):
    data = small(digits)
    cfg = config(policy=policy)
    result = ps.train(ps.KerasModel(seeded_mlp), data, cfg)

    # The same arithmetic in this process: SGD with momentum (buf = m buf + g; p -= lr buf).
    import keras

    model = seeded_mlp()
    variables = model.trainable_variables
    bufs = [np.zeros(v.shape, np.float32) for v in variables]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def grads(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, variables)

    orders = epoch_orders(0, len(data.x_train), cfg.batch_size, cfg.seed)
    steps = 0
    for _ in range(cfg.epochs):
        for s in next(orders):
            xb, yb = data.x_train[s : s + cfg.batch_size], data.y_train[s : s + cfg.batch_size]
            for v, g, buf in zip(variables, grads(xb, yb), bufs, strict=True):
                buf *= cfg.momentum
                buf += g.numpy()
                v.assign(v.numpy() - np.float32(cfg.lr) * buf)
            steps += 1
    assert result.updates == steps
    for v, name in zip(variables, result.params, strict=True):
        np.testing.assert_allclose(result.params[name], v.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    # The model handed back holds the trained values.
    for v, name in zip(result.model.trainable_variables, result.params, strict=True):
        np.testing.assert_array_equal(v.numpy(), result.params[name])


# -- every policy with two workers; lost updates ---------------------------------------


@pytest.mark.parametrize("policy", ps.POLICIES)
def test_every_policy_runs_two_tf_workers_and_locking_ones_lose_no_update(policy):
    workers, steps, n = 2, 100, 200_000
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.integers(0, 2, 64)
    # 64 training samples: each worker's shard is one batch of 32, so the gradient of the
    # mean is exactly 1 (with 25 or 26 samples it is 1 +- an ulp, and the order in which
    # two workers apply a stripe would then change its last bit).
    data = ps.Dataset(x, y, x[:8], y[:8], 2)
    cfg = config(
        policy=policy, workers=workers, steps=workers * steps, epochs=10_000, lr=1.0, momentum=0.0,
        devices="/CPU:0",  # the device option, on the only device here
    )  # fmt: skip
    model = ps.KerasModel(functools.partial(constant_grad_module, n))
    result = ps.train(model, data, cfg, loss=first_logit)
    assert result.updates == workers * steps
    assert [w["status"] for w in result.workers] == [2.0, 2.0]
    w = result.params["w"]
    if policy == "po3":
        # Hogwild!: updates may be lost, never invented or torn (see test_training.py).
        assert np.all(w == np.round(w)) and np.all(w >= -workers * steps) and np.all(w <= -steps)
    else:
        np.testing.assert_array_equal(w, np.full_like(w, -workers * steps))


# -- accuracy ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_keras_models_reach_95_percent_on_digits_with_two_workers(digits, kind):
    if kind == "sequential":  # the CLI's model: paramserver.models.tf_models.mlp
        from paramserver.models import build_model

        model = build_model("tf", "mlp", digits.input_shape, digits.classes, hidden=64)
    else:
        model = ps.KerasModel(subclassed_mlp)
    result = ps.train(model, digits, config(policy="po3", workers=2, epochs=10))
    assert result.test_accuracy >= 0.95, result.summary()


@pytest.mark.slow
def test_batch_norm_model_trains_with_two_workers_and_evaluates_with_calibrated_statistics(digits):
    result = ps.train(ps.KerasModel(bn_mlp), digits, config(policy="striped", workers=2, epochs=10))
    assert result.test_accuracy >= 0.93, result.summary()


# -- errors ----------------------------------------------------------------------------------


def test_a_built_keras_model_is_refused_with_the_fix(tf, digits):
    with pytest.raises(TypeError, match=r"KerasModel\(factory\)"):
        ps.train(seeded_mlp(), digits, config())
    with pytest.raises(TypeError, match="a factory that builds the model, not the model"):
        ps.KerasModel(seeded_mlp())  # Keras models are callable too
    with pytest.raises(TypeError, match="needs a factory"):
        ps.KerasModel("mlp")


def test_bad_devices_are_refused_before_any_process_starts(tf, digits):
    with pytest.raises(ValueError, match="TensorFlow device names"):
        config(devices="/CPU:0,cuda0")
    with pytest.raises(ValueError, match=r"do not exist here.*fix --devices"):
        ps.train(ps.KerasModel(seeded_mlp), small(digits), config(devices="/GPU:7"))
    from paramserver.models.numpy_models import NumpyMLP

    with pytest.raises(ValueError, match="tf backend only"):
        ps.train(NumpyMLP(64, 10, 8), small(digits), config(devices="/CPU:0"))
    assert config(devices="/cpu:0, /CPU:1,gpu").device_of(4) == "/CPU:1"  # rank mod count


def test_factory_returning_something_else_is_a_clear_error(tf, digits):
    with pytest.raises(TypeError, match="must return a Keras model or a tf.Module"):
        ps.train(ps.KerasModel(dict), small(digits), config())


# -- the command line --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_cli_trains_tf_models(model, tmp_path):
    cmd = [sys.executable, "-m", "paramserver", "train", "--backend", "tf", "--model", model,
           "--workers", "2", "--epochs", "3", "--out-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "stopped by epochs" in proc.stdout
    assert "oneDNN" not in proc.stderr, "TensorFlow's start-up notices are held back"


def test_cli_rejects_bad_devices_in_one_line():
    cmd = [sys.executable, "-m", "paramserver", "train", "--backend", "tf", "--devices", "warp:9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "TensorFlow device names" in proc.stderr
