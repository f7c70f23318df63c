"""The TensorFlow backend: Keras 3 models (Sequential, functional, subclassed) and plain
``tf.Module`` models, built by a factory inside each worker.

TensorFlow variables cannot alias foreign memory, so each step begins with a
*pull*: the shared parameters are copied into the worker's variables. The pull
runs inside the same compiled ``tf.function`` as the step itself, from the
flat vector passed as its argument (one slice-and-assign per variable, in the
graph). Measured (``paramserver bench --suites tf``, 1 thread), that adds
about 0.1 ms to a 5.5 ms step of the Hogwild CNN and 0.05 ms to a 0.45 ms
step of the digits MLP, while ``Variable.assign`` from NumPy views costs one
eager dispatch per variable: 1.4 ms for the CNN's 8, 0.5 ms for the MLP's 4. A
DLPack read is not used: ``AssignVariableOp`` adopts the buffer of a tensor it
is the last user of, and then the variable *is* the shared memory (seen with
TF 2.21). The gradient leaves the graph as one flat tensor laid out like the
segment (padding included), copied once into the worker's gradient buffer.

When the gradient is computed depends on the policy (``TFBackend.fused``):

* po3, striped: the gradient is computed in parallel anyway, so ``forward``
  does pull, loss and gradient in one call and ``backward`` only copies it;
* po1, po2: their point is to serialise the gradient computation (po1: under
  the update lock; po2: at most k at once), so ``forward`` does pull and loss,
  and ``backward`` (called under the lock or slot) computes loss and gradient
  again from the variables as pulled: one extra forward pass per step.

Either way the gradient is that of the parameters read at the pull.

Non-trainable variables (batch-norm moving statistics) are not shared: they
are not trained by gradients, so each worker keeps its own, updated by its own
batches (as PyTorch buffers are). The server's copy of the model (test
accuracy, the model handed back to the caller) re-estimates them from a sample
of the training set with the current parameters before it predicts.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from paramserver import portable
from paramserver.api import KerasModel, is_keras, looks_like_tf_model
from paramserver.data import take
from paramserver.layout import Layout

from .backends import Backend, ModelSpec

CALIBRATION_SAMPLES = 1024
"""Training samples the server's copy uses to re-estimate batch-norm statistics."""
GRADIENT_IN_FORWARD = ("po3", "striped")
"""Policies that compute the gradient in parallel: ``forward`` computes it too."""
_TF_LOG_NOISE = (
    "WARNING: All log messages before absl::InitializeLog()",
    "I0000 ",
    "To enable the following instructions:",
)


def import_tf() -> Any:
    """TensorFlow, imported quietly; a clear message if it is not installed.

    Its C++ start-up lines (oneDNN and CPU-feature notices) go to file
    descriptor 2 before any log level applies; they are held back unless the
    import fails (see ``quiet_stderr``).
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with quiet_stderr():
            import tensorflow as tf
    except ImportError:
        raise ImportError("the tf backend needs TensorFlow: pip install 'paramserver[tf]'") from None
    return tf


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hold back TensorFlow's start-up notices (at import and when its runtime starts);
    every other line written to stderr meanwhile is passed on, all of them on error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = lines if failed else [ln for ln in lines if not ln.startswith(_TF_LOG_NOISE)]
            sys.stderr.write("".join(kept))


def set_threads_and_seed(threads: int, seed: int) -> None:
    """Size TensorFlow's pools before it initialises (they cannot change later): ``threads``
    for one op, 1 for running ops side by side (a worker's graph is a chain)."""
    tf = import_tf()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    with quiet_stderr():
        tf.config.list_logical_devices()  # starts the runtime, with these pools
    import keras

    keras.utils.set_random_seed(seed)  # dropout masks; initial values come from the server


def _build(km: KerasModel) -> Any:
    model = km.factory()
    tf = import_tf()
    if not (is_keras(model) or isinstance(model, tf.Module)):
        raise TypeError(
            f"the KerasModel factory must return a Keras model or a tf.Module, got {type(model).__name__}"
        )
    if not model.trainable_variables and km.input_shape is not None:
        # Subclassed Keras models create their variables on the first call.
        model(_zeros(km.input_shape, km.input_dtypes))
    if not model.trainable_variables:
        raise ValueError(
            "the model has no trainable variables; give it an input shape (keras.Input) "
            "or build it in the factory"
        )
    return model


def _zeros(shape: Any, dtypes: Any) -> Any:
    """One sample of zeros for inputs of ``shape`` (a dict of them for named inputs)."""
    if isinstance(shape, dict):
        return {k: np.zeros((1, *s), (dtypes or {}).get(k, "float32")) for k, s in shape.items()}
    return np.zeros((1, *shape), dtypes or np.float32)


def _spec_of(tf: Any, shape: Any, dtypes: Any, batch: int | None = None) -> Any:
    """The TensorSpec (a dict of them) of a batch of inputs of one sample's ``shape``."""
    if shape is None:
        return tf.TensorSpec(None, tf.float32)
    if isinstance(shape, dict):
        return {k: tf.TensorSpec([batch, *s], (dtypes or {}).get(k, "float32")) for k, s in shape.items()}
    return tf.TensorSpec([batch, *shape], dtypes or "float32")


def _dtypes_of(x: Any) -> Any:
    """The dtype names of inputs (a dict of them for named inputs)."""
    if isinstance(x, dict):
        return {k: v.dtype.name for k, v in x.items()}
    return x.dtype.name


def _dtype(v: Any) -> np.dtype:
    """A variable's dtype (Keras 3 variables give a string, ``tf.Variable`` a ``tf.DType``)."""
    return np.dtype(getattr(v.dtype, "name", v.dtype))


def _names(variables: list[Any]) -> list[str]:
    """Stable, unique names: Keras 3 variable paths, ``tf.Variable`` names otherwise."""
    out: list[str] = []
    for v in variables:
        name = base = getattr(v, "path", None) or v.name.split(":")[0]
        k = 0
        while name in out:  # plain tf.Variables are all called "Variable" unless named
            k += 1
            name = f"{base}_{k}"
        out.append(name)
    return out


def model_spec(
    km: KerasModel, loss: Callable[..., Any] | None, data: Any
) -> tuple[ModelSpec, Layout, np.ndarray]:
    """Build the model once in this process: the spec the workers rebuild it from, its
    layout (its trainable variables, in the model's order) and its initial values."""
    sample = take(data.x_train, slice(0, CALIBRATION_SAMPLES))
    sample = {k: np.array(v) for k, v in sample.items()} if isinstance(sample, dict) else np.array(sample)
    target = None if data.task == "unsupervised" else tuple(data.target_shape)
    km = replace(
        km, input_shape=data.input_shape, input_dtypes=_dtypes_of(data.x_train), calibration=sample,
        target_shape=target,
    )  # fmt: skip
    with quiet_stderr():  # the first TensorFlow op of this process may start its runtime
        model = _build(km)
    variables = list(model.trainable_variables)
    dtypes = {_dtype(v).name for v in variables}
    if dtypes != {"float32"}:
        raise TypeError(
            f"the model's trainable variables have dtypes {sorted(dtypes)}; the tf backend trains "
            "float32 models (no mixed-precision policy)"
        )
    names = _names(variables)
    init = {n: np.asarray(v.numpy()) for n, v in zip(names, variables, strict=True)}
    layout = Layout.from_arrays(init)
    payload = portable.dumps(km, "the model factory")
    if loss is not None:
        portable.check(loss, "the loss")
    return ModelSpec("tf", payload, loss, task=data.task), layout, layout.flatten(init)


def check_devices(devices: list[str]) -> None:
    """ValueError naming any device this machine's TensorFlow does not have."""
    tf = import_tf()
    have = {_canonical(tf, d.name) for d in tf.config.list_logical_devices()}
    missing = [d for d in devices if _canonical(tf, d) not in have]
    if missing:
        raise ValueError(
            f"devices {missing} do not exist here; TensorFlow sees {sorted(have)}; fix --devices"
        )


def _canonical(tf: Any, device: str) -> str:
    spec = tf.DeviceSpec.from_string(device if device.startswith("/") else "/" + device)
    return f"/{spec.device_type.upper()}:{spec.device_index or 0}"


class _Graphs:
    """The compiled steps of one model. Kept apart from the backend: the ``tf.function``s
    refer back to this object, and a reference cycle through the backend would keep its
    views of the segment alive after the owner lets go of it (a BufferError on close)."""

    def __init__(self, model: Any, layout: Layout, loss_fn: Any, km: KerasModel, task: str):
        tf = import_tf()
        self.tf = tf
        self.model = model
        self.keras = is_keras(model)
        self.loss_fn = loss_fn
        self.variables = list(model.trainable_variables)
        self.non_trainable = list(getattr(model, "non_trainable_variables", []))
        itemsize = layout.dtype.itemsize
        # (offset, size, shape) of each variable in the flat vector, and the padding after it.
        self.slices = [(f.offset // itemsize, f.size, f.shape) for f in layout]
        ends = [o for o, _, _ in self.slices[1:]] + [layout.flat_size]
        self.pads = [end - o - n for (o, n, _), end in zip(self.slices, ends, strict=True)]
        flat = tf.TensorSpec([layout.flat_size], layout.dtype.name)
        x = _spec_of(tf, km.input_shape, km.input_dtypes)
        if task == "classify":
            y = tf.TensorSpec([None], tf.int64)
        elif task == "regress":
            y = tf.TensorSpec(None if km.target_shape is None else [None, *km.target_shape], tf.float32)
        else:  # unsupervised: the inputs are the targets
            y = x
        self.x_spec = x
        self.flat_spec = flat
        self.loss_and_grad = tf.function(self._loss_and_grad, input_signature=[flat, x, y])
        self.loss_only = tf.function(self._loss_only, input_signature=[flat, x, y])
        self.grad_only = tf.function(self._grad, input_signature=[x, y])
        self.predict = tf.function(self._predict, input_signature=[flat, x])
        self.pull = tf.function(self._pull, input_signature=[flat])

    def _pull(self, flat: Any) -> None:
        # Each assign copies the slice into the variable's own buffer: the variable never
        # aliases the segment (tests/test_tf.py checks both directions).
        for v, (o, n, shape) in zip(self.variables, self.slices, strict=True):
            v.assign(self.tf.reshape(flat[o : o + n], shape))

    def _call(self, x: Any, training: bool) -> Any:
        return self.model(x, training=training) if self.keras else self.model(x)

    def _grad(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Loss and the flat gradient, laid out like the segment (zeros in the padding)."""
        tf = self.tf
        with tf.GradientTape() as tape:
            loss = self._loss(y, self._call(x, training=True))
        parts = []
        grads = tape.gradient(loss, self.variables)
        for g, v, pad in zip(grads, self.variables, self.pads, strict=True):
            parts.append(tf.reshape(g if g is not None else tf.zeros_like(v), [-1]))
            if pad:
                parts.append(tf.zeros([pad], parts[-1].dtype))
        return loss, tf.concat(parts, 0)

    def _loss_and_grad(self, flat: Any, x: Any, y: Any) -> tuple[Any, Any]:
        self._pull(flat)
        return self._grad(x, y)

    def _loss_only(self, flat: Any, x: Any, y: Any) -> Any:
        self._pull(flat)
        # The gradient pass in backward() updates the batch-norm statistics; this pass
        # must not update them a second time with the same batch.
        saved = [self.tf.convert_to_tensor(v) for v in self.non_trainable]
        loss = self._loss(y, self._call(x, training=True))
        for v, s in zip(self.non_trainable, saved, strict=True):
            v.assign(s)
        return loss

    def _loss(self, y: Any, out: Any) -> Any:
        """The loss of ``out`` against ``y``; a scalar target per sample meets an (n, 1) output."""
        if not isinstance(y, dict) and y.dtype.is_floating and y.shape.rank == 1 and out.shape.rank == 2:
            y = self.tf.reshape(y, [-1, 1])
        return self.loss_fn(y, out)

    def _predict(self, flat: Any, x: Any) -> Any:
        self._pull(flat)
        return self._call(x, training=False)

    def calibration(self, x: Any) -> Any:
        """A graph that pulls, then sets every batch-norm layer's moving statistics to those
        of a batch (momentum 0, only in this graph); None for a model without batch norm."""
        import keras

        layers = []
        if self.keras and hasattr(self.model, "_flatten_layers"):
            layers = [
                ly for ly in self.model._flatten_layers() if isinstance(ly, keras.layers.BatchNormalization)
            ]
        if not layers:
            return None

        def graph(flat: Any, x: Any) -> None:
            self._pull(flat)
            self._call(x, training=True)

        tf = self.tf
        saved = [ly.momentum for ly in layers]
        for ly in layers:
            ly.momentum = 0.0  # read when the graph is traced, so only this graph sees it
        try:
            x_spec = tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, a.dtype.name), x)
            return tf.function(graph).get_concrete_function(self.flat_spec, x_spec)
        finally:
            for ly, m in zip(layers, saved, strict=True):
                ly.momentum = m


class TFBackend(Backend):
    """A Keras model (or ``tf.Module``) in this process, its variables pulled from the
    shared vector every step; see the module docstring for when the gradient is computed."""

    name = "tf"

    def __init__(
        self,
        spec: ModelSpec,
        layout: Layout,
        params: np.ndarray,
        grad: np.ndarray | None,
        *,
        config: Any = None,
        rank: int = 0,
    ):
        # A worker passes its config: its device, and when to compute the gradient.
        device = config.device_of(rank) if config is not None else None
        fused = config.policy in GRADIENT_IN_FORWARD if config is not None else True
        tf = import_tf()
        self.tf = tf
        km: KerasModel = spec.load()
        self.device = tf.device(device) if device else contextlib.nullcontext()
        with self.device:
            model = _build(km)
        mine = [(tuple(v.shape), _dtype(v).str) for v in model.trainable_variables]
        theirs = [(f.shape, f.dtype) for f in layout]
        if mine != theirs:
            raise ValueError(
                "the model the factory built here does not match the server's layout "
                f"(here {mine}, server {theirs}); the factory must build the same model every time"
            )
        loss_fn = spec.loss
        if loss_fn is None:
            import keras

            if spec.task == "classify":
                loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            else:
                loss_fn = keras.losses.MeanSquaredError()
        self.model = model
        self.params = params
        self.grad = grad
        self.fused = fused
        self.calibration = km.calibration
        self._graphs = _Graphs(model, layout, loss_fn, km, spec.task)
        self._calibrate: Any = None
        self._stash: Any = None

    @classmethod
    def accepts(cls, model: Any) -> bool:
        if isinstance(model, KerasModel):
            return True
        if looks_like_tf_model(model):
            raise TypeError(
                f"pass TensorFlow models as paramserver.KerasModel(factory), where factory() builds "
                f"the model in each worker; got a built {type(model).__name__}"
            )
        return False

    @classmethod
    def make_spec(cls, model, loss, seed, data):  # type: ignore[no-untyped-def]
        if data is None:
            raise ValueError("a KerasModel needs the data set (its input shape) to be built")
        if type(data.x_train).__name__ == "CSR":
            raise ValueError(
                "sparse rows (CSR) train with the torch or numpy backends; densify them for Keras"
            )
        return model_spec(model, loss, data)

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.device_list:
            check_devices(config.device_list)

    @classmethod
    def hand_back(cls, model, spec, layout, params, data):  # type: ignore[no-untyped-def]
        return cls(spec, layout, layout.flatten(params), None).trained_model()

    @classmethod
    def seed_initial(cls, seed: int) -> None:
        import_tf()
        import keras

        keras.utils.set_random_seed(seed)

    @classmethod
    def configure(cls, threads: int, seed: int) -> None:
        set_threads_and_seed(threads, seed)

    def forward(self, x: Any, y: np.ndarray | None) -> float:
        if y is None:
            y = x  # unsupervised: the loss compares the outputs with the inputs
        with self.device:
            if self.fused:
                loss, self._stash = self._graphs.loss_and_grad(self.params, x, y)
            else:
                self._stash = (x, y)
                loss = self._graphs.loss_only(self.params, x, y)
        return float(loss)

    def backward(self) -> None:
        assert self.grad is not None, "backend built without a gradient buffer"
        assert self._stash is not None, "backward() without forward()"
        if not self.fused:
            with self.device:
                _, self._stash = self._graphs.grad_only(*self._stash)
        self.grad[...] = self._stash  # one copy out of TensorFlow's buffer
        self._stash = None

    def predict(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Logits with the current shared parameters. TensorFlow's pool size is fixed when it
        starts, so ``threads`` cannot narrow it here."""
        with self.device:
            self.calibrate()
            return self._graphs.predict(self.params, x).numpy()

    def loss_of(self, outputs: np.ndarray, targets: Any) -> float:
        with self.device:
            return float(
                self._graphs._loss(
                    self.tf.nest.map_structure(self.tf.constant, targets), self.tf.constant(outputs)
                )
            )

    def pull(self) -> None:
        """Copy the shared parameters into the variables (alone: for the trained model)."""
        with self.device:
            self._graphs.pull(self.params)

    def calibrate(self) -> None:
        """Re-estimate batch-norm moving statistics from the calibration inputs with the
        current parameters (nothing to do without calibration inputs or batch norm)."""
        if self.calibration is None:
            return
        if self._calibrate is None:
            self._calibrate = self._graphs.calibration(self.calibration) or False
        if self._calibrate is not False:
            tf = self.tf
            with self.device:
                self._calibrate(
                    tf.constant(self.params), tf.nest.map_structure(tf.constant, self.calibration)
                )

    def trained_model(self) -> Any:
        """The model with the shared parameters (and calibrated batch-norm statistics)."""
        self.pull()
        self.calibrate()
        return self.model
