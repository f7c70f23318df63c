"""paramserver: a Hogwild-style shared-memory parameter server.

One server process owns a model's parameters in shared memory; N worker
processes read them in place, compute gradients (PyTorch, TensorFlow or
NumPy) and write updates back, lock-free or under a locking policy (po1, po2,
po3, striped). Reinforcement learning on gymnasium (A3C, DQN) shares an agent
the same way: ``paramserver.train_rl`` (:mod:`paramserver.rl`).
"""

from .api import KerasModel, model_spec, train
from .checkpoint import Checkpoint, load_checkpoint
from .config import RunConfig, TrainConfig, TrainJob
from .data import CSR, Dataset, load, load_digits, load_npy, load_npz, load_svmlight, make_dataset
from .layout import Layout
from .metrics import CollapseWarning
from .optim import RULES, make_rule
from .policy import POLICIES, make_policy
from .rl import RLConfig, RLResult, train_rl  # imports neither torch nor gymnasium
from .server import Job, ParameterServer, Server, TrainResult, WorkerError
from .store import Counters, Gradient, ParamStore, Segment, SegmentError, ShmStore, SparseRows, Store

__all__ = [
    "Checkpoint",
    "CollapseWarning",
    "Counters",
    "Gradient",
    "Job",
    "POLICIES",
    "RunConfig",
    "Server",
    "ShmStore",
    "SparseRows",
    "Store",
    "load_checkpoint",
    "model_spec",
    "RLConfig",
    "RLResult",
    "RULES",
    "Dataset",
    "KerasModel",
    "Layout",
    "ParamStore",
    "ParameterServer",
    "Segment",
    "SegmentError",
    "TrainConfig",
    "TrainJob",
    "TrainResult",
    "WorkerError",
    "load",
    "load_digits",
    "make_dataset",
    "load_npy",
    "load_npz",
    "load_svmlight",
    "CSR",
    "make_policy",
    "make_rule",
    "train",
    "train_rl",
]
__version__ = "0.1.0"
