"""Checkpoints: parameters, optimizer state, counters and metadata in one ``.npz``.

    ckpt = paramserver.load_checkpoint("runs/.../checkpoint.npz")
    ckpt.apply_to(model)                          # a torch module gets the parameters
    paramserver train ... --resume runs/.../checkpoint.npz

The file holds plain arrays (``params``: the flat vector; ``state``: the
optimizer's slots when they are shared; ``counters``: the workers' rows) and
one JSON document (``meta``, stored as UTF-8 bytes): layout, fingerprint,
global version, config, time. It is read with ``allow_pickle=False``: a
checkpoint can never run code. Writes are atomic: a temporary file in the same
directory, flushed and fsynced, then renamed over the old one, so a crash
leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .layout import Layout

FORMAT = "paramserver-checkpoint"
FORMAT_VERSION = 1
FILENAME = "checkpoint.npz"


@dataclass(frozen=True)
class Checkpoint:
    """The contents of a checkpoint file."""

    params: np.ndarray
    """The flat parameter vector (see ``layout``)."""
    state: np.ndarray
    """Optimizer state, ``slots x params`` (0 slots when it was per worker)."""
    counters: np.ndarray
    """The workers' counter rows when it was written."""
    meta: dict[str, Any]

    @property
    def layout(self) -> Layout:
        return Layout.from_dict(self.meta["layout"])

    @property
    def version(self) -> int:
        """Global update count when it was written."""
        return int(self.meta["version"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config", {}))

    def named_params(self) -> dict[str, np.ndarray]:
        """Parameters by name (copies)."""
        return {k: v.copy() for k, v in self.layout.unflatten(self.params).items()}

    def apply_to(self, model: Any) -> Any:
        """Copy the parameters into ``model`` (a ``torch.nn.Module`` with the same
        layout) and return it."""
        import torch

        mine = Layout.from_torch(model)
        if mine.fingerprint != self.layout.fingerprint:
            raise ValueError(
                f"the model does not match the checkpoint: it has {len(mine)} tensors / "
                f"{mine.num_params} parameters, the checkpoint {len(self.layout)} / "
                f"{self.layout.num_params}; build the model the checkpoint was trained with"
            )
        named = self.named_params()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in named:
                    p.copy_(torch.from_numpy(named[name]))
        return model


def save_checkpoint(
    path: str,
    *,
    layout: Layout,
    params: np.ndarray,
    state: np.ndarray,
    counters: np.ndarray,
    version: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically to ``path``; return the path.

    ``params`` may be live shared memory: it is copied once, first, so the
    file holds one moment's values (under po3 that moment may include
    half-applied updates, as any read of live parameters does).
    """
    params = np.array(params, copy=True)
    state = np.array(state, copy=True)
    counters = np.array(counters, copy=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout.to_dict(),
        "fingerprint": layout.fingerprint,
        "version": int(version),
        "config": config,
        "time": time.time(),
        **(extra or {}),
    }
    blob = np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, params=params, state=state, counters=counters, meta=blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (or by a run's ``checkpoint.npz``)."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path!r}; pass a checkpoint.npz written by a run")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"params", "state", "counters", "meta"} - set(z.files)
            if missing:
                raise ValueError(
                    f"{path!r} is not a paramserver checkpoint (missing {', '.join(sorted(missing))})"
                )
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] for k in ("params", "state", "counters")}
    except (OSError, EOFError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read checkpoint {path!r}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a paramserver checkpoint")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} was written by a newer paramserver (format {meta['format_version']}); upgrade"
        )
    ckpt = Checkpoint(arrays["params"], arrays["state"], arrays["counters"], meta)
    if ckpt.params.shape != (ckpt.layout.flat_size,):
        raise ValueError(f"{path!r} is damaged: its parameters do not fill its layout")
    return ckpt


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if callable(o):
        return getattr(o, "__qualname__", repr(o))
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
