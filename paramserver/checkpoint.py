"""Checkpoints, trained parameters and RL policies as ``.safetensors`` files.

    ckpt = paramserver.checkpoint.load_checkpoint("runs/<run>/checkpoint.safetensors")
    ckpt.apply_to(model)                          # a torch module gets the parameters
    paramserver train ... --resume runs/<run>/checkpoint.safetensors
    model.load_state_dict(safetensors.torch.load_file("runs/<run>/params.safetensors"))

A ``.safetensors`` file is a JSON header (tensor names, dtypes, shapes, offsets
and a string-to-string ``__metadata__`` map) followed by raw tensor bytes: no
pickle anywhere, so reading one can never run code, and any tool that reads
safetensors reads our tensors by name.

* ``params.safetensors``: one tensor per model parameter, named as the model
  names it, so a torch user's ``load_state_dict`` takes the file as it is.
* ``checkpoint.safetensors``: ``params.<name>`` per model tensor, ``state``
  (optimizer slots x flat size) and ``counters`` (the workers' rows, float64);
  the metadata holds the layout, fingerprint, global version, config (JSON),
  time and extra fields (JSON). Older runs' ``checkpoint.npz`` still loads.
* ``policy.safetensors``: an RL run's network, with the model arguments, the
  environment id and the config in its metadata.

Everything read from a file is checked against what this module writes before
anyone uses it: a damaged, truncated or foreign file is a ``ValueError`` whose
message starts with the file's path and says what is wrong and what to do.
Writes are atomic: a temporary file in the same directory, fsynced, then
renamed over the old one, so a crash leaves the old file or the new one, never
half of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from .layout import Layout
from .store import COUNTER_FIELDS, Counters

FORMAT = "paramserver-checkpoint"
FORMAT_VERSION = 2
"""1: ``checkpoint.npz`` (still read); 2: ``checkpoint.safetensors``."""
FILENAME = "checkpoint.safetensors"
LEGACY_FILENAME = "checkpoint.npz"
PARAMS_FILENAME = "params.safetensors"
PARAMS_FORMAT = "paramserver-params"
POLICY_FILENAME = "policy.safetensors"
POLICY_FORMAT = "paramserver-rl-policy"
POLICY_FORMAT_VERSION = 1

PARAM_PREFIX = "params."
"""A checkpoint names model tensor ``w`` ``params.w``, beside ``state`` and ``counters``."""
MAX_JSON_DEPTH = 64
"""Deeper JSON in a file is refused: nothing here writes more than a few levels,
and Python's parser would otherwise raise RecursionError on a hostile document."""
MAX_INT = 2**53
"""Counters are float64: integers at or above this cannot be told apart from their neighbours."""
_INTEGER_COUNTERS = ("steps", "epoch", "batch")
"""Counter fields that a resumed run turns into ints (version, epoch and batch to start at)."""
_ENV_ID = re.compile(r"[A-Za-z0-9_\-\.]+-v\d+")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a .npz is a zip file (the second: an empty one)
_SAFETENSORS_MAX_HEADER = 100_000_000  # the library refuses larger headers too


def _error(path: str, what: str) -> ValueError:
    """The one shape of every error about a file: its path first, then what and what to do."""
    return ValueError(f"{path}: {what}")


@dataclass(frozen=True)
class Checkpoint:
    """The contents of a checkpoint file (validated when it was read)."""

    params: np.ndarray
    """The flat parameter vector (see ``layout``; the padding between tensors is zero)."""
    state: np.ndarray
    """Optimizer state, ``slots x params`` (0 slots when it was per worker)."""
    counters: np.ndarray
    """The workers' counter rows (float64, columns as ``paramserver.store.COUNTER_FIELDS``)."""
    meta: dict[str, Any]
    """format, format_version, layout (dict), fingerprint, version, config, time, and
    the writer's extra fields at the top level (e.g. ``backend``)."""

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


# -- writing -------------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it to
    ``path``; on any failure remove the temporary file and leave ``path`` as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + "-", suffix=".tmp", dir=directory)
    os.close(fd)  # safetensors writes by name; the empty file only reserves a unique name
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the rename makes them the file
        finally:
            os.close(fd)
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


def _write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    # safetensors wants C-contiguous arrays; the copy also freezes live shared memory.
    owned = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return _atomic_write(path, lambda tmp: safetensors.numpy.save_file(owned, tmp, metadata=dict(metadata)))


def _json_text(value: Any) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


def save_params(path: str, named: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> str:
    """Write ``named`` parameters to a ``.safetensors`` file atomically; return ``path``.

    Tensor names are the keys of ``named`` (for a torch model, its parameter
    names), so ``model.load_state_dict(safetensors.torch.load_file(path))``
    takes the file as it is. ``metadata`` (string to string) goes into the header,
    beside ``format``.
    """
    meta = {"format": PARAMS_FORMAT, **(metadata or {})}
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata maps strings to strings; {k!r}: {v!r} is not")
    return _write_safetensors(path, {k: np.asarray(v) for k, v in named.items()}, meta)


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
    """Write a checkpoint atomically to ``path`` (normally ``<run>/checkpoint.safetensors``);
    return the path.

    ``params`` may be live shared memory: it is copied once, first, so the
    file holds one moment's values (under po3 that moment may include
    half-applied updates, as any read of live parameters does).
    """
    if isinstance(version, bool) or int(version) != version or not 0 <= version < 2**63:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    params = np.array(params, copy=True)
    state = np.array(state, copy=True)
    counters = np.array(counters, dtype=np.float64, copy=True)
    tensors = {PARAM_PREFIX + name: view for name, view in layout.unflatten(params).items()}
    tensors["state"] = state
    tensors["counters"] = counters
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layout": layout.to_json(),
        "fingerprint": layout.fingerprint,
        "version": str(int(version)),
        "config": _json_text(config),
        "time": repr(time.time()),
        "extra": _json_text(extra or {}),
    }
    return _write_safetensors(path, tensors, metadata)


# -- reading: what a file is ---------------------------------------------------------------


def _sniff(path: str) -> str:
    """``"safetensors"`` or ``"npz"`` from a file's first bytes (never its name), else ValueError."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise _error(
            path, f"cannot be read ({e.strerror or e}); check the path and its permissions"
        ) from None
    if head[:4] in _ZIP_MAGIC:
        return "npz"
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= _SAFETENSORS_MAX_HEADER:
            return "safetensors"
    raise _error(
        path,
        "is not a paramserver file: it is neither a .safetensors nor a .npz file (empty, text "
        "or other bytes); pass the checkpoint.safetensors (or checkpoint.npz) a run wrote",
    )


def _read_safetensors(path: str, what: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The header metadata and every tensor of a .safetensors file (the library checks
    that the header is UTF-8 JSON with string metadata and that offsets cover the data)."""
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            names = f.keys()  # the handle itself is not iterable
            tensors = {k: f.get_tensor(k) for k in names}  # arrays of their own, not views of the file
    except (safetensors.SafetensorError, OSError) as e:
        raise _error(
            path, f"is truncated or damaged and cannot be read as a {what} ({e}); use another copy"
        ) from None
    except TypeError as e:  # a dtype NumPy lacks (bfloat16, float8): nothing here writes one
        raise _error(
            path, f"holds a tensor NumPy cannot represent ({e}); it is not a paramserver {what}"
        ) from None
    # Once ml_dtypes is imported (TensorFlow, JAX and tensorboard import it), safetensors hands
    # bfloat16 and float8 over as NumPy "void"-kind dtypes instead of failing: refuse them the
    # same way, whatever else the process imported.
    odd = [f"{k}: {v.dtype}" for k, v in tensors.items() if v.dtype.kind not in "biuf"]
    if odd:
        raise _error(
            path, f"holds a tensor NumPy cannot represent ({', '.join(odd)}); it is not a paramserver {what}"
        )
    return metadata, tensors


def _json_depth(value: Any) -> int:
    # Iterative, so that measuring a deep document cannot itself overflow the stack.
    depth, level = 0, [(value, 1)]
    while level:
        v, d = level.pop()
        if isinstance(v, dict | list):
            depth = max(depth, d)
            if depth > MAX_JSON_DEPTH:
                break
            level.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return depth


def _parse_json(path: str, what: str, text: str | bytes, kind: type = dict) -> Any:
    """``text`` as JSON of type ``kind``; every way it can fail is a ValueError naming the file."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError:
        raise _error(path, f"its {what} is not UTF-8 text; the file is damaged or not ours") from None
    except json.JSONDecodeError as e:
        raise _error(path, f"its {what} is not valid JSON ({e}); the file is damaged") from None
    except RecursionError:
        raise _error(
            path, f"its {what} is JSON nested too deeply to read; the file is damaged or hostile"
        ) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (CVE-2020-10735)
        raise _error(path, f"its {what} cannot be read as JSON ({e}); the file is damaged") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise _error(
            path, f"its {what} is JSON nested deeper than {MAX_JSON_DEPTH} levels; the file is damaged"
        )
    if not isinstance(value, kind):
        raise _error(
            path,
            f"its {what} is a JSON {type(value).__name__}, expected a {kind.__name__}; the file is damaged",
        )
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_version(path: str, v: Any, *, text: bool = False) -> int:
    if text and isinstance(v, str):  # a safetensors header holds it as decimal text; JSON as a number
        v = int(v) if re.fullmatch(r"\d{1,19}", v) else v
    if not _is_int(v) or not 0 <= v < 2**63:
        raise _error(path, f"its version {v!r} is not a non-negative integer; the file is damaged")
    return v


def _check_format(path: str, fmt: Any, version: Any, expected: str, newest: int) -> int:
    if fmt != expected:
        raise _error(path, f"is not a {expected} file (format {fmt!r}); pass a file a paramserver run wrote")
    if isinstance(version, str) and re.fullmatch(r"\d{1,9}", version):
        version = int(version)
    if not _is_int(version) or version < 1:
        raise _error(path, f"has no valid format version ({version!r}); the file is damaged")
    if version > newest:
        raise _error(
            path, f"was written by a newer paramserver (format {version}, this one reads {newest}); upgrade"
        )
    return version


def _check_layout(path: str, doc: Any, fingerprint: Any) -> Layout:
    """The model layout described by ``doc``, once it is exactly what ``Layout.pack``
    makes of its names, shapes and dtypes (so offsets cannot overlap or run past the
    end) and its fingerprint is the one written beside it."""
    bad = "its layout is {}; the file is damaged"
    if not isinstance(doc, dict) or not isinstance(doc.get("fields"), list) or not _is_int(doc.get("nbytes")):
        raise _error(path, bad.format("not a {fields, nbytes} object"))
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for i, f in enumerate(doc["fields"]):
        if not (isinstance(f, list) and len(f) == 4 and isinstance(f[0], str) and f[0]):
            raise _error(path, bad.format(f"entry {i} is not [name, offset, shape, dtype]"))
        name, _offset, shape, dtype = f
        if name in specs:
            raise _error(path, bad.format(f"naming {name!r} twice"))
        if not (
            isinstance(shape, list) and len(shape) <= 32 and all(_is_int(s) and 0 <= s < 2**40 for s in shape)
        ):
            raise _error(path, bad.format(f"giving {name!r} the shape {shape!r}"))
        if math.prod(shape) >= 2**40:
            raise _error(path, bad.format(f"giving {name!r} {math.prod(shape)} elements"))
        try:
            dt = np.dtype(dtype) if isinstance(dtype, str) else None
        except TypeError:
            dt = None
        if dt is None or dt.kind not in "biuf" or not dt.isnative:
            raise _error(path, bad.format(f"giving {name!r} the dtype {dtype!r}"))
        specs[name] = (tuple(shape), dt)
    if not specs:
        raise _error(path, bad.format("empty"))
    layout = Layout.pack(specs)
    if layout.to_dict() != {"nbytes": doc["nbytes"], "fields": doc["fields"]}:
        raise _error(path, bad.format("not what its names, shapes and dtypes pack into (offsets differ)"))
    if len({f.dtype for f in layout}) != 1:
        raise _error(path, bad.format("of mixed dtypes, which no flat parameter vector has"))
    if fingerprint is not None and fingerprint != layout.fingerprint:
        raise _error(path, "its layout does not match its fingerprint; the file is damaged")
    return layout


def _check_array(path: str, name: str, a: Any, *, ndim: int, dtype: np.dtype) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.ndim != ndim:
        shape = getattr(a, "shape", None)
        raise _error(path, f"its {name}: shape {shape}, expected {ndim} dimensions; the file is damaged")
    if a.dtype != dtype:
        raise _error(path, f"its {name}: dtype {a.dtype}, expected {dtype}; the file is damaged")
    return a


def _check_counters(path: str, counters: Any) -> np.ndarray:
    counters = _check_array(path, "counters", counters, ndim=2, dtype=np.dtype(np.float64))
    rows, cols = counters.shape
    if rows < 1 or cols < len(COUNTER_FIELDS):
        raise _error(
            path,
            f"its counters are {rows} x {cols}, expected at least one worker's row of "
            f"{len(COUNTER_FIELDS)} fields; the file is damaged or from an incompatible paramserver",
        )
    named = Counters(counters[:, : len(COUNTER_FIELDS)])
    for field in _INTEGER_COUNTERS:
        col = named.column(field)
        ok = np.isfinite(col) & (col >= 0) & (col < MAX_INT)
        ok[ok] = col[ok] == np.floor(col[ok])
        if not ok.all():
            rank = int(np.flatnonzero(~ok)[0])
            raise _error(
                path,
                f"worker {rank}'s {field} counter is {float(col[rank])!r}, not a whole number in "
                f"[0, 2**53); the file is damaged: resume from another checkpoint",
            )
    return counters


def _check_state(path: str, state: Any, layout: Layout) -> np.ndarray:
    state = _check_array(path, "optimizer state", state, ndim=2, dtype=layout.dtype)
    if state.shape[1] != layout.flat_size:
        raise _error(
            path,
            f"its optimizer state is {state.shape[0]} x {state.shape[1]}, its layout needs "
            f"{layout.flat_size} columns; the file is damaged",
        )
    return state


# -- reading checkpoints --------------------------------------------------------------------


def find_checkpoint(path: str) -> str:
    """The checkpoint file ``path`` names: the file itself, or the one inside a run directory."""
    if os.path.isdir(path):
        for name in (FILENAME, LEGACY_FILENAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise _error(
            path,
            f"this directory holds no checkpoint (no {FILENAME} or {LEGACY_FILENAME}); "
            "pass a run directory or the checkpoint file itself",
        )
    if not os.path.exists(path):
        raise _error(
            path, f"no checkpoint at this path; pass a {FILENAME} written by a run (or its directory)"
        )
    return path


def load_checkpoint(path: str) -> Checkpoint:
    """Read and validate a checkpoint (``checkpoint.safetensors``, an older
    ``checkpoint.npz``, or a run directory holding one)."""
    path = find_checkpoint(path)
    if _sniff(path) == "npz":
        return _load_npz_checkpoint(path)
    metadata, tensors = _read_safetensors(path, "checkpoint")
    if "format" not in metadata:
        raise _error(
            path, "is not a paramserver checkpoint (its header names no format); pass one a run wrote"
        )
    fmt_version = _check_format(
        path, metadata.get("format"), metadata.get("format_version"), FORMAT, FORMAT_VERSION
    )
    for key in ("layout", "fingerprint", "version", "config"):
        if key not in metadata:
            raise _error(path, f"its metadata lacks the {key}; the file is damaged or not a checkpoint")
    layout = _check_layout(path, _parse_json(path, "layout", metadata["layout"]), metadata["fingerprint"])
    meta: dict[str, Any] = {
        **_parse_json(path, "extra metadata", metadata.get("extra", "{}")),
        "format": FORMAT,
        "format_version": fmt_version,
        "layout": layout.to_dict(),
        "fingerprint": layout.fingerprint,
        "version": _check_version(path, metadata["version"], text=True),
        "config": _parse_json(path, "config", metadata["config"]),
        "time": _check_time(path, metadata.get("time")),
    }
    named = {}
    for f in layout:
        a = tensors.pop(PARAM_PREFIX + f.name, None)
        if a is None:
            raise _error(
                path, f"lacks the tensor {PARAM_PREFIX + f.name!r} its layout names; the file is damaged"
            )
        if a.shape != f.shape or a.dtype != np.dtype(f.dtype):
            raise _error(
                path,
                f"its tensor {PARAM_PREFIX + f.name!r} is {a.dtype}{list(a.shape)}, its layout says "
                f"{np.dtype(f.dtype)}{list(f.shape)}; the file is damaged",
            )
        named[f.name] = a
    for key in ("state", "counters"):
        if key not in tensors:
            raise _error(path, f"lacks the tensor {key!r}; the file is damaged or not a checkpoint")
    state = _check_state(path, tensors.pop("state"), layout)
    counters = _check_counters(path, tensors.pop("counters"))
    if tensors:
        raise _error(
            path,
            f"holds tensors its layout does not name ({', '.join(sorted(tensors))}); the file is damaged",
        )
    return Checkpoint(layout.flatten(named), state, counters, meta)


def _check_time(path: str, text: Any) -> float | None:
    if text is None:
        return None
    try:
        t = float(text)
    except (TypeError, ValueError):
        t = math.nan
    if not math.isfinite(t):
        raise _error(path, f"its time {text!r} is not a number; the file is damaged")
    return t


def _load_npz_checkpoint(path: str) -> Checkpoint:
    """A format-1 checkpoint: a .npz of params, state, counters and meta (JSON as uint8)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"params", "state", "counters", "meta"} - set(z.files)
            if missing:
                raise _error(path, f"is not a paramserver checkpoint (missing {', '.join(sorted(missing))})")
            arrays = {k: z[k] for k in ("params", "state", "counters", "meta")}
    except ValueError as e:
        if str(e).startswith(path):
            raise
        if "pickle" in str(e):
            # NumPy refuses object arrays with advice to allow pickle, which would let the file run code.
            raise _error(
                path, "holds arrays of Python objects, which no paramserver checkpoint does"
            ) from None
        raise _error(path, f"is damaged: an array in it cannot be read ({e}); use another copy") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise _error(
            path, f"is truncated or damaged and cannot be read as a checkpoint ({e}); use another copy"
        ) from None
    blob = arrays["meta"]
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise _error(
            path, f"its meta is {blob.dtype}{list(blob.shape)}, expected UTF-8 bytes; the file is damaged"
        )
    meta = _parse_json(path, "meta", blob.tobytes())
    if "format" not in meta:
        raise _error(path, "is not a paramserver checkpoint (its meta names no format); pass one a run wrote")
    meta["format_version"] = _check_format(path, meta.get("format"), meta.get("format_version", 1), FORMAT, 1)
    for key in ("layout", "version"):
        if key not in meta:
            raise _error(path, f"its meta lacks the {key}; the file is damaged or not a checkpoint")
    layout = _check_layout(path, meta["layout"], meta.get("fingerprint"))
    meta["version"] = _check_version(path, meta["version"])
    if not isinstance(meta.setdefault("config", {}), dict):
        raise _error(path, "its config is not a JSON object; the file is damaged")
    params = _check_array(path, "parameters", arrays["params"], ndim=1, dtype=layout.dtype)
    if params.shape != (layout.flat_size,):
        raise _error(
            path,
            f"its parameters are {params.size} long, its layout needs {layout.flat_size}; "
            "the file is damaged",
        )
    state = _check_state(path, arrays["state"], layout)
    counters = _check_counters(path, arrays["counters"])
    return Checkpoint(params, state, counters, meta)


# -- RL policies -------------------------------------------------------------------------------------


def validate_env_id(env: Any, *, source: str | None = None) -> str:
    """``env`` if it is a plain gymnasium id such as ``CartPole-v1``, else ValueError.

    gymnasium imports the module named before a colon (``"mod:Env-v0"``) and
    resolves namespaces (``"ns/Env-v0"``), so an id read from a file could make
    ``gym.make`` run any code: only ``name-vN`` ids pass. ``source`` (a file
    path) starts the message.
    """
    if (
        isinstance(env, str)
        and len(env) <= 200
        and ":" not in env
        and "/" not in env
        and _ENV_ID.fullmatch(env)
    ):
        return env
    msg = (
        f"environment id {env!r} is not a plain gymnasium id such as 'CartPole-v1' (a colon or "
        "slash would make gymnasium import code); pass --env to choose the environment instead"
    )
    raise _error(source, msg) if source else ValueError(msg)


_MODEL_KEYS = ("algo", "obs_dim", "n_actions", "hidden")


def _check_model_args(path: str, model: Any) -> dict[str, Any]:
    from paramserver.models.rl_models import ALGOS

    if not isinstance(model, dict) or set(model) != set(_MODEL_KEYS):
        got = sorted(model) if isinstance(model, dict) else type(model).__name__
        raise _error(
            path, f"its model arguments are {got}, expected {list(_MODEL_KEYS)}; the file is damaged"
        )
    if model["algo"] not in ALGOS:
        raise _error(
            path, f"its algorithm {model['algo']!r} is none of {', '.join(ALGOS)}; the file is damaged"
        )
    for key in _MODEL_KEYS[1:]:
        if not _is_int(model[key]) or not 1 <= model[key] < 2**31:
            raise _error(
                path,
                f"its model argument {key} is {model[key]!r}, not a positive integer; the file is damaged",
            )
    return model


def _expected_policy_tensors(model: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes of the network ``model`` describes, built on torch's meta
    device so that no memory is allocated whatever sizes a file claims."""
    import torch

    from paramserver.models.rl_models import build

    with torch.device("meta"):
        net = build(**model)
    return {
        k: (tuple(v.shape), np.dtype(str(v.dtype).removeprefix("torch.")))
        for k, v in net.state_dict().items()
    }


def _check_policy_tensors(path: str, tensors: Mapping[str, Any], model: dict[str, Any]) -> None:
    expected = _expected_policy_tensors(model)
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise _error(
            path,
            f"its tensors do not match its model {model} (missing: {missing or 'none'}; "
            f"unexpected: {unknown or 'none'}); the file is damaged",
        )
    for name, (shape, dtype) in expected.items():
        a = np.asarray(tensors[name])
        if a.shape != shape or a.dtype != dtype:
            raise _error(
                path,
                f"its tensor {name!r} is {a.dtype}{list(a.shape)}, the model {model} needs "
                f"{dtype}{list(shape)}; the file is damaged",
            )


def save_policy(path: str, state_dict: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """Write an RL run's network atomically to ``path`` (normally ``<run>/policy.safetensors``).

    ``meta``: ``model`` (``{algo, obs_dim, n_actions, hidden}``, what
    ``paramserver.models.rl_models.build`` takes), ``env`` (a plain gymnasium id,
    or None when the run used an environment factory) and ``config`` (a dict).
    It is checked as :func:`load_policy_file` checks it, so what is written loads.
    """
    model = _check_model_args(path, meta.get("model"))
    _check_policy_tensors(path, state_dict, model)
    env = meta.get("env")
    if env is not None:
        validate_env_id(env, source=path)
    metadata = {
        "format": POLICY_FORMAT,
        "format_version": str(POLICY_FORMAT_VERSION),
        "model": _json_text(model),
        "env": env or "",
        "config": _json_text(meta.get("config", {})),
        "time": repr(time.time()),
    }
    return _write_safetensors(path, {k: np.asarray(v) for k, v in state_dict.items()}, metadata)


def load_policy_file(path: str, *, need_env: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The state dict (NumPy arrays) and metadata of a policy written by :func:`save_policy`.

    The metadata: ``format``, ``format_version``, ``model`` (dict), ``env`` (a plain
    gymnasium id, or None), ``config`` (dict), ``time``. An ``env`` that is not a
    plain id is refused; with ``need_env=False`` (the caller brings its own
    environment, e.g. ``--env``) it is dropped to None instead, and never used.
    """
    if not os.path.isfile(path):
        raise _error(path, f"no policy file here; a run writes one to <out-dir>/<run>/{POLICY_FILENAME}")
    if _sniff(path) != "safetensors":
        raise _error(
            path,
            f"is not a {POLICY_FILENAME} file (a zip: torch.save or .npz?); pass the policy file a run wrote",
        )
    metadata, tensors = _read_safetensors(path, "policy")
    version = _check_format(
        path, metadata.get("format"), metadata.get("format_version"), POLICY_FORMAT, POLICY_FORMAT_VERSION
    )
    for key in ("model", "env", "config"):
        if key not in metadata:
            raise _error(path, f"its metadata lacks the {key}; the file is damaged or not a policy")
    model = _check_model_args(path, _parse_json(path, "model arguments", metadata["model"]))
    _check_policy_tensors(path, tensors, model)
    env: str | None = metadata["env"] or None
    if env is not None:
        try:
            validate_env_id(env, source=path)
        except ValueError:
            if need_env:
                raise
            env = None
    meta = {
        "format": POLICY_FORMAT,
        "format_version": version,
        "model": model,
        "env": env,
        "config": _parse_json(path, "config", metadata["config"]),
        "time": _check_time(path, metadata.get("time")),
    }
    return tensors, meta


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if callable(o):
        return getattr(o, "__qualname__", repr(o))
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
