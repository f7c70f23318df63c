"""Definitions made in an interactive session reach the workers by value.

A model class, a loss or a Keras factory defined in ``__main__`` of ``python -``
or of a notebook cell has no file a spawned worker could import it from; these
tests run both for real: a script fed on standard input, and a notebook executed
by a Jupyter kernel (nbclient + ipykernel).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import pytest

import paramserver as ps
from paramserver import portable

HERE = os.path.dirname(__file__)

SCRIPT = """
import numpy as np
import torch
import paramserver as ps
from paramserver.models.numpy_models import NumpyModel

class Net(torch.nn.Module):  # defined here, in __main__ of `python -`
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
    def forward(self, x):
        return self.fc(x)

calls = []
def my_loss(logits, labels):  # a custom loss from __main__ too
    return torch.nn.functional.cross_entropy(logits, labels) * 1.0

class Linear(NumpyModel):  # and a NumPy model
    def shapes(self):
        return {"w": (64, 10)}
    def init(self, rng):
        return {"w": np.zeros((64, 10), np.float32)}
    def forward(self, params, x):
        return x @ params["w"], x
    def backward(self, params, cache, dlogits, grads):
        grads["w"][...] = cache.T @ dlogits

data = ps.load_digits()
cfg = ps.TrainConfig(workers=2, epochs=2, batch_size=32, lr=0.05, out_dir="", progress=False)
a = ps.train(Net(), data, cfg, loss=my_loss)
b = ps.train(Linear(), data, cfg)
print("ACCURACY", a.test_accuracy, b.test_accuracy, a.updates, b.updates)
"""


def test_python_stdin_trains_main_definitions_with_two_workers(tmp_path) -> None:
    # No entry-point guard in the script: nothing re-runs it in the workers.
    proc = subprocess.run(
        [sys.executable, "-"], input=SCRIPT, capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ACCURACY"))
    acc_torch, acc_numpy, updates_torch, updates_numpy = map(float, line.split()[1:])
    assert updates_torch > 0 and updates_numpy > 0
    # Digits, 2 epochs: a linear model that really trained is far above chance (10%).
    assert acc_torch > 0.5 and acc_numpy > 0.5, line


def test_importable_definitions_stay_by_reference() -> None:
    from paramserver.models.torch_models import MLP

    data = portable.dumps(MLP(64, 10, hidden=8), "the model")
    assert b"paramserver.models.torch_models" in data and b"MLP" in data
    # A by-value class would carry its code; a reference is just the names.
    assert b"co_code" not in data and b"_make_skeleton_class" not in data


def test_unpicklable_model_is_one_clear_error() -> None:
    torch = pytest.importorskip("torch")

    model = torch.nn.Linear(4, 2)
    model.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"^the model could not be pickled for the worker processes \("):
        ps.train(model, (torch.zeros(8, 4).numpy(), [0, 1] * 4), ps.TrainConfig(workers=1, out_dir=""))


def test_by_value_unpickles_to_the_object_itself() -> None:
    wrapped = portable.ByValue(len, "a function")
    assert pickle.loads(pickle.dumps(wrapped)) is len


@pytest.mark.timeout(600)
def test_notebook_trains_torch_loss_and_keras_defined_in_cells(tmp_path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = os.path.join(HERE, "notebooks", "interactive.ipynb")
    nb = nbformat.read(path, as_version=4)
    # The kernel is this interpreter's (installed by .ci/setup into the venv); the
    # notebook runs from a scratch directory so that its runs/ land nowhere.
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", startup_timeout=120)
    # The kernel's TMPDIR is the test's: TensorFlow's autograph leaves its generated
    # sources (__autograph_generated_file*.py) in the kernel's temporary directory.
    client.execute(cwd=HERE, env={**os.environ, "TMPDIR": str(tmp_path)})
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    for what in ("torch", "custom loss", "keras"):
        line = next(ln for ln in outputs.splitlines() if ln.startswith(f"{what}:"))
        accuracy = float(line.split()[-1])
        assert accuracy > 0.5, line
