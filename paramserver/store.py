"""Shared-memory segments: one header, a JSON description, then named arrays.

    +----------------------------------------------------------------+
    | header (64 B): magic, format version, body offset and size,    |
    |                fingerprint of the body layout, JSON length     |
    | JSON: {"layout": <body layout>, "meta": {...}}  (never pickle) |
    | body: the arrays of the layout, each 64-byte aligned           |
    +----------------------------------------------------------------+

A :class:`Segment` is a small handle in the manner of CPython's
``SharedMemory``: it pickles to its *name* (a worker that unpickles it
attaches and validates), ``close()`` is idempotent, and only the creator
unlinks. :class:`Store` is what workers and the server need of the parameters;
:class:`ShmStore`, the parameter server's segment (parameters, optimizer
state, per-worker counters, control words), implements it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import multiprocessing
import os
import secrets
import shutil
import struct
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any

import numpy as np

from .layout import ALIGN, Layout, align_up

if TYPE_CHECKING:
    from .policy import Policy

PREFIX = "psrv_"
"""Every segment of this project is named ``psrv_<creator pid>_<random>``."""
MAGIC = b"PSRVSEG\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQQ32sI")  # magic, version, body offset, body size, fingerprint, json length
assert _HEADER.size <= ALIGN
SHM_DIR = "/dev/shm"
SHM_RESERVE = 256 * 1024
"""Room left in /dev/shm after every segment: the run's semaphores (a page each) and
multiprocessing's shared heap, if anything uses it, live there too, in sparse files
that kill the process with SIGBUS, not an error, when a page cannot be had."""

# Names this process created. Its resource tracker holds them until unlink(), so an
# attach from this same process must not unregister them (see Segment.attach).
_created_here: set[str] = set()


class _SharedMemory(SharedMemory):
    """``SharedMemory`` whose finalizer stays quiet when views still pin the mapping.

    A mapping that cannot be closed because an array still uses it is released when
    the process exits; the name is unlinked by then. CPython's finalizer would print
    ``Exception ignored ... BufferError`` at exit instead, which reads like a crash."""

    def __del__(self) -> None:
        with contextlib.suppress(BufferError, OSError):
            self.close()


class SegmentError(ValueError):
    """A segment that is not there, not ours, or not what the caller expects."""


def _why(e: BaseException) -> str:
    """The reason in an exception raised while reading a header, for one line."""
    if isinstance(e, KeyError):
        return f"no {e.args[0]!r}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)[:120] or type(e).__name__


def _new_name() -> str:
    # The random part makes names unguessable; the pid lets `clean` find dead creators.
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(8)}"


def _is_multiprocessing_child() -> bool:
    # A spawned child unpickles its arguments (and so attaches) before
    # parent_process() is set; `_inheriting` is true exactly then.
    me = multiprocessing.current_process()
    return multiprocessing.parent_process() is not None or bool(getattr(me, "_inheriting", False))


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


class Segment:
    """A shared-memory segment holding the named arrays of a :class:`Layout`."""

    # Class-level defaults so that close()/__del__ work after a failed constructor.
    _shm: SharedMemory | None = None
    _arrays: dict[str, np.ndarray] | None = None
    _owner = False

    def __init__(self, shm: SharedMemory, layout: Layout, meta: dict[str, Any], owner: bool):
        self._shm = shm
        self._layout = layout
        self._meta = meta
        self._owner = owner
        self._name = shm.name
        body = _HEADER.unpack_from(shm.buf, 0)[2]
        self._arrays = layout.views(shm.buf, body)

    # -- creation and attachment -------------------------------------------------

    @classmethod
    def create(cls, layout: Layout, meta: Mapping[str, Any] | None = None) -> Segment:
        """Create a new segment for ``layout``, zero-filled, readable by this user only.

        Raises OSError(ENOSPC) *before* anything is written when /dev/shm lacks
        room: without the check the first write past the free space kills the
        process with SIGBUS.
        """
        meta = dict(meta or {})
        blob = json.dumps({"layout": layout.to_dict(), "meta": meta}, separators=(",", ":")).encode()
        body = align_up(_HEADER.size + len(blob))
        size = body + max(layout.nbytes, 1)
        free = shm_free_bytes()
        if size + SHM_RESERVE > free:
            raise OSError(
                errno.ENOSPC,
                f"shared memory needs {_format_bytes(size)} (and {_format_bytes(SHM_RESERVE)} "
                f"for the run's locks) but {SHM_DIR} has "
                f"{_format_bytes(free)} free; free space there (paramserver clean removes "
                "stale segments) or enlarge it (docker run --shm-size=...)",
            )
        shm = _SharedMemory(name=_new_name(), create=True, size=size)  # mode 0o600
        try:
            # Reserve the pages now, so that a full /dev/shm is a clean error here.
            os.posix_fallocate(shm._fd, 0, size)  # type: ignore[attr-defined]
            _HEADER.pack_into(
                shm.buf, 0, MAGIC, FORMAT_VERSION, body, layout.nbytes,
                layout.fingerprint.encode(), len(blob),
            )  # fmt: skip
            shm.buf[_HEADER.size : _HEADER.size + len(blob)] = blob
            # Held as long as the creator has the segment open (the kernel drops it when
            # the process dies): what tells `clean` a live run from a dead one, also
            # across PID namespaces, where the pid in the name means nothing.
            fcntl.flock(shm._fd, fcntl.LOCK_SH)  # type: ignore[attr-defined]
            seg = cls(shm, layout, meta, owner=True)
            _created_here.add(shm.name)
            return seg
        except BaseException:
            shm.close()
            shm.unlink()
            raise

    @classmethod
    def attach(cls, name: str, *, kind: str | None = None) -> Segment:
        """Attach to an existing segment by name and check that it is one of ours.

        ``kind`` (e.g. ``"params"``) must match the creator's ``meta["kind"]``.
        """
        if not isinstance(name, str) or not name.startswith(PREFIX):
            raise SegmentError(
                f"{name!r} is not a paramserver segment name (they start with {PREFIX!r}); "
                "`paramserver inspect` without a name lists the live ones"
            )
        try:
            shm = _SharedMemory(name=name)
        except FileNotFoundError:
            raise SegmentError(
                f"no shared-memory segment named {name!r}: the run has ended or the name "
                "is wrong; `paramserver inspect` lists the live ones"
            ) from None
        except OSError as e:  # another user's (EACCES), a '/' or an over-long name (EINVAL)
            raise SegmentError(f"cannot open segment {name!r}: {e.strerror or e}") from None
        if not _is_multiprocessing_child() and name not in _created_here:
            # This process has a resource tracker of its own, which would unlink the
            # segment when we exit (CPython gh-82300). A multiprocessing child shares
            # its parent's tracker instead, where the creator's unlink() unregisters.
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        try:
            layout, meta = cls._read_header(shm)
            if kind is not None and meta.get("kind") != kind:
                raise SegmentError(f"segment {name!r} holds {meta.get('kind')!r}, expected {kind!r}")
            return cls(shm, layout, meta, owner=False)
        except BaseException:
            shm.close()
            raise

    @staticmethod
    def _read_header(shm: SharedMemory) -> tuple[Layout, dict[str, Any]]:
        if shm.size < _HEADER.size:
            raise SegmentError(f"segment {shm.name!r} is too small to be a paramserver segment")
        magic, version, body, body_nbytes, fingerprint, jlen = _HEADER.unpack_from(shm.buf, 0)
        if magic != MAGIC:
            raise SegmentError(f"segment {shm.name!r} is not a paramserver segment (bad magic)")
        if version != FORMAT_VERSION:
            raise SegmentError(
                f"segment {shm.name!r} has format version {version}, this paramserver reads "
                f"{FORMAT_VERSION}: use the same paramserver version for server and workers"
            )
        if body + body_nbytes > shm.size or _HEADER.size + jlen > body:
            raise SegmentError(f"segment {shm.name!r} has an inconsistent header")
        try:  # a crafted or damaged header: one line naming the segment, never a traceback
            doc = json.loads(bytes(shm.buf[_HEADER.size : _HEADER.size + jlen]).decode("utf-8"))
            layout = Layout.from_dict(doc["layout"])
            if not isinstance(doc["meta"], dict):
                raise TypeError(f"meta is a {type(doc['meta']).__name__}, not an object")
        except (ValueError, KeyError, TypeError, IndexError, OverflowError, RecursionError) as e:
            raise SegmentError(f"segment {shm.name!r} has a damaged header ({_why(e)})") from None
        if layout.fingerprint.encode() != fingerprint or layout.nbytes != body_nbytes:
            raise SegmentError(f"segment {shm.name!r}: layout does not match its fingerprint")
        return layout, doc["meta"]

    # -- the handle ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._shm.size if self._shm is not None else 0

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def meta(self) -> dict[str, Any]:
        return self._meta

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            raise ValueError(f"segment {self._name!r} is closed")
        return self._arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def close(self) -> None:
        """Drop this process's mapping. Idempotent.

        Every view handed out (arrays, tensors, models built on them) must be
        gone first, or the mapping cannot be released (BufferError).
        """
        self._arrays = None
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:
                raise BufferError(
                    f"segment {self._name!r} still has views in use; delete the arrays, "
                    "tensors and models built on it before close()"
                ) from None
            self._shm = None

    def unlink(self) -> None:
        """Remove the segment's name (creator only; once). Mappings stay valid until closed."""
        if not self._owner:
            raise PermissionError(f"only the creator of segment {self._name!r} may unlink it")
        self._owner = False
        _created_here.discard(self._name)
        try:
            SharedMemory.unlink(self._shm) if self._shm is not None else _unlink_name(self._name)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        # Unlink first: it needs no view to be gone, so nothing leaks even if close() fails.
        if self._owner:
            self.unlink()
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle to the name, never to the bytes: unpickling attaches.
        return (type(self).attach, (self._name,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, size={self.size}, owner={self._owner})"


def _unlink_name(name: str) -> None:
    shm = SharedMemory(name=name)
    shm.close()
    shm.unlink()  # also unregisters it from this process's resource tracker


# -- the counter table ------------------------------------------------------------------

COUNTER_FIELDS = (
    "steps",  # updates this worker has applied
    "samples",  # training samples (RL: environment steps) it has consumed
    "loss",  # smoothed loss of its last batches
    "pulled_version",  # global update count when it last read the parameters
    "heartbeat",  # time.time() of its last step (or of reaching the start barrier)
    "status",  # one of STATUS
    "epoch",  # passes over its shard completed
    "batch",  # batches of the current epoch done (a restarted worker resumes there)
    "nonfinite",  # gradients with NaN/Inf it refused to apply
    "started",  # time.time() when its first step began
    "finished",  # time.time() when it left its loop (0 while running)
    "staleness",  # staleness of its last update (updates by anyone since its read)
    "staleness_sum",  # summed over its updates (mean = staleness_sum / steps)
    "staleness_max",  # the largest
    "lr",  # learning rate of its last update (schedule x attenuation)
    "urgent",  # stale-first: its staleness while it waits to go first, else 0
    "held_lock",  # 1 + index of the update lock it holds, 0 when none (see Policy.recover)
    "held_slot",  # 1 while it holds a po2 gradient slot
    "restarts",  # times the server restarted this rank
    "pid",  # its process id (for inspect, and for tests that kill it)
)
"""The named columns of a worker's row; :class:`Counters` is the only code that
knows their positions."""
_COLUMN = {name: i for i, name in enumerate(COUNTER_FIELDS)}
STATUS = {"starting": 0.0, "running": 1.0, "done": 2.0, "failed": 3.0, "ready": 4.0}
"""A worker's state: ``starting`` (spawned, importing, building its model), ``ready``
(built, waiting at the start barrier for the others), ``running``, ``done``, ``failed``."""
CONTROL_FIELDS = (
    "stop",  # set by the server: every worker leaves at its next step
    "base_version",  # updates made before this run (a resumed checkpoint's version)
)
_CONTROL = {name: i for i, name in enumerate(CONTROL_FIELDS)}


class Row:
    """One worker's row of figures, by name: ``row.steps += 1`` writes the segment.

    Each row has one writer (its worker; the server only between that worker's
    lives), so no lock is needed."""

    __slots__ = ("_a",)

    def __init__(self, array: np.ndarray):
        assert array.shape == (len(COUNTER_FIELDS),), "a row holds one value per counter field"
        self._a = array

    def as_dict(self) -> dict[str, float]:
        return dict(zip(COUNTER_FIELDS, map(float, self._a), strict=True))

    # Typed names for the generated properties below.
    steps: float
    samples: float
    loss: float
    pulled_version: float
    heartbeat: float
    status: float
    epoch: float
    batch: float
    nonfinite: float
    started: float
    finished: float
    staleness: float
    staleness_sum: float
    staleness_max: float
    lr: float
    urgent: float
    held_lock: float
    held_slot: float
    restarts: float
    pid: float


def _column_property(i: int) -> property:
    def get(self: Row) -> float:
        return self._a[i]  # type: ignore[no-any-return]

    def put(self: Row, value: float) -> None:
        self._a[i] = value

    return property(get, put)


for _i, _name in enumerate(COUNTER_FIELDS):
    setattr(Row, _name, _column_property(_i))
del _i, _name


class Counters:
    """The workers' rows (``workers x len(COUNTER_FIELDS)`` float64) and the figures
    derived from them, each computed here and nowhere else.

    ``array`` is the raw table (checkpoints store it as it is); everything else
    asks for a :meth:`row` or a :meth:`column` by name."""

    def __init__(self, array: np.ndarray, base_version: int = 0):
        assert array.ndim == 2 and array.shape[1] == len(COUNTER_FIELDS), "not a counter table"
        self.array = array
        # Read twice a step by every worker: a Python sum over a memoryview of a handful of
        # floats (exact: whole numbers) takes a tenth of a NumPy reduction's set-up.
        self._steps = memoryview(array[:, _COLUMN["steps"]])
        self.base_version = base_version
        """Updates made before this run (a resumed checkpoint's): part of the global version."""

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def row(self, rank: int) -> Row:
        return Row(self.array[rank])

    def column(self, name: str) -> np.ndarray:
        """The view of one column (all workers)."""
        return self.array[:, _COLUMN[name]]

    def copy(self) -> Counters:
        """A snapshot (the live table changes while it is read)."""
        return Counters(self.array.copy(), self.base_version)

    def version(self) -> int:
        """Global update count: the base plus the sum of the workers' step counters
        (no lock: each term has one writer)."""
        return int(self.base_version + sum(self._steps))

    def updates(self) -> int:
        """Updates made in this run (the version less the base)."""
        return int(sum(self._steps))

    def mean_staleness(self) -> np.ndarray:
        """Each worker's mean staleness over its updates (0 before its first)."""
        steps = self.column("steps")
        return self.column("staleness_sum") / np.maximum(steps, 1)

    def staleness(self) -> dict[str, float]:
        """Mean and max staleness of every update of this run."""
        return staleness(self.column("steps"), self.column("staleness_sum"), self.column("staleness_max"))

    def mean_loss(self) -> float | None:
        """The workers' smoothed losses averaged over those that made a step."""
        active = self.column("steps") > 0
        return float(self.column("loss")[active].mean()) if active.any() else None

    def all_done(self) -> bool:
        return bool(np.all(self.column("status") == STATUS["done"]))

    def as_dicts(self) -> list[dict[str, float]]:
        return [self.row(r).as_dict() for r in range(len(self))]


def staleness(steps: np.ndarray, sums: np.ndarray, maxes: np.ndarray) -> dict[str, float]:
    """Mean and max staleness over workers, from their steps, summed and largest staleness."""
    total_steps = float(np.sum(steps))
    mean = float(np.sum(sums)) / total_steps if total_steps else 0.0
    return {"mean": mean, "max": float(np.max(maxes)) if len(maxes) else 0.0}


def status_name(value: float) -> str:
    return next((k for k, s in STATUS.items() if s == value), f"?{value}")


# -- gradients and the Store interface ----------------------------------------------------


@dataclass
class SparseRows:
    """The gradient of some rows of one 2-D tensor of the layout: ``values[i]`` is the
    gradient of row ``rows[i]``. The push of a sparse model carries these instead of a
    dense buffer as large as the table.

    Coalesced (the default): rows sorted and unique. Not coalesced: ids as the model
    gave them, in any order and repeated (each adds in), which a rule that takes them
    (:attr:`paramserver.optim.UpdateRule.takes_ids`) applies without a sort, where the
    store applies a push in one piece (:attr:`Store.whole_pushes`)."""

    offset: int
    """Flat offset of the tensor (its row 0) in the parameter vector."""
    dim: int
    """Elements per row."""
    rows: np.ndarray
    values: np.ndarray
    coalesced: bool = True


@dataclass
class Gradient:
    """One step's gradient: a dense flat vector, sparse rows, or both (a model with an
    embedding table and dense layers). ``finite`` is False when it must not be applied."""

    dense: np.ndarray | None = None
    sparse: list[SparseRows] = field(default_factory=list)
    finite: bool = True
    ranges: list[tuple[int, int]] | None = None
    """The element ranges of ``dense`` that hold a gradient (None: all of it); the rest
    belongs to the tensors of ``sparse`` and is never written."""

    def touches(self, lo: int, hi: int) -> bool:
        """Whether applying this gradient changes anything in ``[lo, hi)`` of the flat vector
        (a row belongs to the range its first element lies in), so that a policy can skip
        the lock of a range it leaves alone."""
        dense = self.dense is not None
        if dense and (self.ranges is None or any(a < hi and lo < b for a, b in self.ranges)):
            return True
        for s in self.sparse:
            if not s.coalesced:
                if len(s.rows):  # not sorted: assume it may (a lock taken for nothing at worst)
                    return True
                continue
            first, last = row_span(s, lo, hi)
            if last > first:
                return True
        return False


def row_span(s: SparseRows, lo: int, hi: int) -> tuple[int, int]:
    """``[first, last)``: the entries of ``s.rows`` whose row starts in ``[lo, hi)``
    (coalesced rows: they are searched)."""
    assert s.coalesced, "row_span searches sorted rows: coalesce first"
    # Row r starts at s.offset + r * dim: it lies in [lo, hi) iff ceil((lo - offset) / dim)
    # <= r < ceil((hi - offset) / dim).
    a = -(-(lo - s.offset) // s.dim)
    b = -(-(hi - s.offset) // s.dim)
    n = len(s.rows)
    # Rows are sorted and >= 0: a span covering every row (a lock-free push, one stripe
    # for the whole vector) needs no search.
    first = 0 if a <= 0 or n == 0 else int(np.searchsorted(s.rows, a))
    last = n if n == 0 or b > s.rows[-1] else int(np.searchsorted(s.rows, b))
    return first, last


Backward = Callable[[], Gradient]
"""Computes this step's gradient (the policy decides what is locked meanwhile)."""
Apply = Callable[[Gradient, int, int], None]
"""Applies the update rule to the part of the gradient in ``[lo, hi)`` of the flat vector."""


class Store(ABC):
    """What workers and the server need of the parameters, and nothing more.

    The worker loop and the server use only this interface. :class:`ShmStore` is
    the shared-memory segment (zero copy: ``params`` is the live vector); a store
    on other machines implements the same calls.
    """

    @property
    @abstractmethod
    def model_layout(self) -> Layout:
        """The model's layout (names, shapes, offsets in ``params``)."""

    @property
    @abstractmethod
    def params(self) -> np.ndarray:
        """The flat parameter vector to read (a live view where the store allows it)."""

    @property
    @abstractmethod
    def state(self) -> np.ndarray:
        """The shared optimizer state, ``slots x params`` (0 slots when per worker)."""

    @property
    @abstractmethod
    def counters(self) -> Counters:
        """The workers' rows of figures."""

    @abstractmethod
    def push(self, rank: int, backward: Backward, apply: Apply) -> None:
        """Compute one gradient with ``backward()`` and apply it with ``apply``, under this
        store's consistency rule (which parts run under which lock)."""

    @property
    def whole_pushes(self) -> bool:
        """Whether :meth:`push` calls ``apply`` once, over the whole vector (no stripes):
        then rows of a sparse gradient need not be sorted to be applied."""
        return False

    @abstractmethod
    def request_stop(self) -> None:
        """Ask every worker to leave at its next step."""

    @property
    def stop_requested(self) -> bool:
        return bool(self.stop_word()[0])

    @abstractmethod
    def stop_word(self) -> np.ndarray:
        """A one-element array, nonzero once a stop is requested (a worker reads it every
        step, so it should be a view where the store allows it)."""

    def version(self) -> int:
        """Global update count (a resumed run's base included)."""
        return self.counters.version()

    # -- the server's side ----------------------------------------------------------------

    def prepare(self, ctx: Any, config: Any) -> None:
        """Before the workers start: make what the consistency rule needs (locks come from
        the server's multiprocessing context ``ctx``; ``config.policy`` names the rule)."""

    @abstractmethod
    def set_base_version(self, version: int) -> None:
        """Updates made before this run (a resumed checkpoint's), before the workers start."""

    def recover(self, alive: np.ndarray, dead: list[int]) -> int:
        """Give back what dead workers held; return how many locks or slots were freed."""
        return 0

    def unlink(self) -> None:
        """Remove the store's storage (its creator, once; handles stay valid until closed)."""

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold off the workers' updates (as far as the consistency rule locks them) while
        something else writes the parameters: a multi-machine sync."""
        return contextlib.nullcontext()

    # -- the worker's side ----------------------------------------------------------------

    def bind(self, rank: int) -> None:
        """Called by worker ``rank`` before its first push (it records its claims)."""

    def unbind(self) -> None:
        """Called by a worker before it closes the store (drops its views)."""

    def close(self) -> None:
        """Drop this process's handle. Idempotent."""


class ShmStore(Segment, Store):
    """The server's segment: flat parameters, optimizer state, counters, control words,
    and the locking policy that says how pushes are applied.

    Arrays: ``params`` (the flat parameter vector of the model layout),
    ``state`` (``slots x params``, the optimizer state when it is shared),
    ``counters`` (``workers x len(COUNTER_FIELDS)`` float64, each row written by
    its worker only, so no lock is needed) and ``control`` (int64 words the
    server writes: ``stop``, ``base_version``).

    It pickles to its name and its policy (whose locks can travel only while a
    worker is being spawned); a worker that unpickles it attaches.
    """

    policy: Policy | None = None
    _counters: Counters | None = None

    @classmethod
    def create_for(
        cls,
        model_layout: Layout,
        *,
        workers: int,
        state_slots: int = 0,
        meta: Mapping[str, Any] | None = None,
    ) -> ShmStore:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        n = model_layout.flat_size
        dtype = model_layout.dtype
        layout = Layout.pack(
            {
                "params": ((n,), dtype),
                "state": ((state_slots, n), dtype),
                "counters": ((workers, len(COUNTER_FIELDS)), np.float64),
                "control": ((len(CONTROL_FIELDS),), np.int64),
            }
        )
        full_meta = {
            "kind": "params",
            "model_layout": model_layout.to_dict(),
            "model_fingerprint": model_layout.fingerprint,
            "counter_fields": list(COUNTER_FIELDS),
            "created": time.time(),
            **(meta or {}),
        }
        store = cls.create(layout, full_meta)
        assert isinstance(store, ShmStore)
        return store

    @classmethod
    def attach(cls, name: str, *, kind: str | None = "params") -> ShmStore:  # type: ignore[override]
        store = super().attach(name, kind=kind)
        assert isinstance(store, ShmStore)
        if store.meta.get("kind") == "params":
            try:
                store._check_params_header()
            except BaseException:
                store.close()
                raise
        return store

    def _check_params_header(self) -> None:
        """What a params segment's header must say for workers and `inspect` to read it."""
        try:
            model = Layout.from_dict(self.meta["model_layout"])
            if model.fingerprint != self.meta["model_fingerprint"]:
                raise ValueError("the model layout does not match its fingerprint")
            shapes = {f.name: f.shape for f in self.layout.fields}
            n = model.flat_size
            expected = {  # state slots and workers: whatever the first axis says
                "params": (n,),
                "state": (*shapes["state"][:1], n),
                "counters": (*shapes["counters"][:1], len(COUNTER_FIELDS)),
                "control": (len(CONTROL_FIELDS),),
            }
            for array, shape in expected.items():
                if shapes[array] != shape:
                    raise ValueError(f"array {array!r} is {shapes[array]}, expected {shape}")
        except (ValueError, KeyError, TypeError, IndexError, OverflowError) as e:
            raise SegmentError(f"segment {self.name!r} has a damaged params header ({_why(e)})") from None

    @classmethod
    def _attach_with(cls, name: str, policy: Policy | None) -> ShmStore:
        store = cls.attach(name)
        store.policy = policy
        return store

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._attach_with, (self.name, self.policy))

    @property
    def model_layout(self) -> Layout:
        return Layout.from_dict(self.meta["model_layout"])

    def check_model(self, layout: Layout) -> None:
        """Raise unless ``layout`` (a worker's model) is the layout the server stored."""
        if layout.fingerprint != self.meta["model_fingerprint"]:
            theirs = self.model_layout
            raise SegmentError(
                f"the model does not match segment {self.name!r}: it has "
                f"{len(layout)} tensors / {layout.num_params} parameters ({layout.fingerprint[:8]}), "
                f"the server's has {len(theirs)} / {theirs.num_params} ({theirs.fingerprint[:8]}); "
                "build the same model (same architecture and dtype) on both sides"
            )

    @property
    def params(self) -> np.ndarray:
        return self.arrays["params"]

    @property
    def state(self) -> np.ndarray:
        return self.arrays["state"]

    @property
    def counters(self) -> Counters:
        if self._counters is None:
            self._counters = Counters(self.arrays["counters"], self.base_version)
        return self._counters

    @property
    def control(self) -> np.ndarray:
        return self.arrays["control"]

    @property
    def workers(self) -> int:
        return len(self.counters)

    @property
    def base_version(self) -> int:
        return int(self.control[_CONTROL["base_version"]])

    def set_base_version(self, version: int) -> None:
        """Updates made before this run (server only, before the workers start)."""
        self.control[_CONTROL["base_version"]] = version
        self.counters.base_version = version

    def prepare(self, ctx: Any, config: Any) -> None:
        from .policy import make_policy

        # Kept for the whole run: a lock's name is unlinked when the object that created it
        # is collected, and a worker still starting would then fail to open it.
        self.policy = make_policy(
            config.policy, self.model_layout.flat_size, ctx, k=config.k, stripes=config.stripes
        )

    @property
    def whole_pushes(self) -> bool:
        return self.policy is None or not self.policy.splits

    def push(self, rank: int, backward: Backward, apply: Apply) -> None:
        policy = self.policy
        if policy is None:  # no policy handed over: Hogwild!
            apply(backward(), 0, self.params.size)
            return
        policy.step(backward, apply, rank)

    def bind(self, rank: int) -> None:
        if self.policy is not None:
            self.policy.bind(self.counters.row(rank))

    def unbind(self) -> None:
        if self.policy is not None:
            self.policy.unbind()

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self.policy.hold_all() if self.policy is not None else contextlib.nullcontext()

    def recover(self, alive: np.ndarray, dead: list[int]) -> int:
        if self.policy is None:
            return 0
        return self.policy.recover(self.counters, alive, dead)

    def request_stop(self) -> None:
        self.control[_CONTROL["stop"]] = 1

    def stop_word(self) -> np.ndarray:
        i = _CONTROL["stop"]
        return self.control[i : i + 1]

    def close(self) -> None:
        self._counters = None
        # Its locks' names are unlinked when the last reference goes: let them go now,
        # not whenever a reference cycle through this handle is collected.
        self.policy = None
        Segment.close(self)


ParamStore = ShmStore
"""The name of :class:`ShmStore` before the Store interface existed."""


SEM_PREFIX = "sem."
"""POSIX named semaphores live in /dev/shm as ``sem.<name>``; a run names its own
``psrv_<pid>_<random>...`` (:func:`semaphore_names`), so they are swept like segments."""


def held_by_a_live_process(path: str) -> bool:
    """Whether some process holds a lock on the file at ``path`` (a live creator)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell (another user's): keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _creator_alive(pid: int | None, lock_path: str) -> bool:
    # The pid alone would call a run in another PID namespace dead (its pids mean
    # nothing here); the lock its creator holds would call a segment dead in the instant
    # between its creation and the lock. Alive if either says so.
    import psutil

    return (pid is not None and psutil.pid_exists(pid)) or held_by_a_live_process(lock_path)


def _pid_in(name: str, prefix: str, sep: str) -> int | None:
    pid_text = name[len(prefix) :].split(sep, 1)[0]
    return int(pid_text) if pid_text.isdigit() else None


def list_segments() -> list[tuple[str, int | None, bool]]:
    """This project's segments (and semaphores, ``sem.psrv_...``) in /dev/shm:
    (name, creator pid, creator alive)."""
    out = []
    try:
        names = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    for name in names:
        bare = name[len(SEM_PREFIX) :] if name.startswith(SEM_PREFIX) else name
        if not bare.startswith(PREFIX):
            continue
        pid = _pid_in(bare, PREFIX, "_")
        out.append((name, pid, _creator_alive(pid, os.path.join(SHM_DIR, name))))
    return out


@contextlib.contextmanager
def semaphore_names(run: str) -> Iterator[list[int]]:
    """Semaphores created in the block are named ``/<run>-<n>`` (``run`` starts with
    :data:`PREFIX` and the creator's pid); yields a list that receives, on leaving the
    block, one open descriptor per semaphore, locked (close them when the semaphores go).

    multiprocessing names a semaphore with ``SemLock._make_name()`` (checked on CPython
    3.10-3.13; joblib's loky replaces it process-wide with ``/loky-<pid>-...``; there is
    no public way to name a semaphore), so that is replaced for the block and put back
    after. Without our prefix a run killed together with its resource tracker (a
    process-group SIGKILL) leaves its semaphores in /dev/shm for ever.
    """
    from multiprocessing import synchronize

    counter = iter(range(1 << 62))
    saved = synchronize.SemLock.__dict__["_make_name"]
    synchronize.SemLock._make_name = staticmethod(lambda: f"/{run}-{next(counter)}")  # type: ignore[method-assign]
    fds: list[int] = []
    try:
        yield fds
    finally:
        synchronize.SemLock._make_name = saved  # type: ignore[method-assign]
        for path in glob.glob(os.path.join(SHM_DIR, f"{SEM_PREFIX}{run}-*")):
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_SH)
                fds.append(fd)


TMP_PREFIX = "paramserver-"
"""A server's private temporary directory is ``<tmp>/paramserver-<pid>-<random>``."""


LOCK_FILE = "lock"
"""A server holds a lock on this file in its private directory while it runs."""


def private_dir_prefix() -> str:
    """How this process's private directories' names begin: ``paramserver-<pid>-``."""
    return f"{TMP_PREFIX}{os.getpid()}-"


def make_private_dir(parent: str | None = None) -> tuple[str, int]:
    """A private directory ``<parent or tmp>/paramserver-<pid>-<random>`` and an open,
    locked descriptor of its lock file (closing it marks the directory stale)."""
    path = tempfile.mkdtemp(prefix=private_dir_prefix(), dir=parent)
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return path, fd


def _sweep_private_dirs(tmp: str) -> list[str]:
    """Remove this user's private directories in ``tmp`` whose creator is dead, first
    killing the Ray processes that still hold files open there: what a SIGKILLed driver
    of a local Ray instance leaves (Ray's agents outlive their parent, keeping their logs
    there open)."""
    removed = []
    try:
        entries = os.listdir(tmp)
    except OSError:
        return []
    for entry in entries:
        if not entry.startswith(TMP_PREFIX):
            continue
        path = os.path.join(tmp, entry)
        pid = _pid_in(entry, TMP_PREFIX, "-")
        if pid is None or _creator_alive(pid, os.path.join(path, LOCK_FILE)):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue  # another user's
            if _kill_holders(path):
                time.sleep(0.2)  # what they were writing as they died is on disk now
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _kill_holders(path: str) -> bool:
    """SIGKILL this user's Ray processes (``ray::*`` agents and workers, ``raylet``,
    ``gcs_server``: "ray" in the command line) with a file open under ``path``, and wait
    a little for them to go; say whether there were any. Nothing else is killed: a shell
    or a pager looking at a dead run's logs is the user's."""
    import psutil

    inside = path.rstrip("/") + "/"
    holders = []
    for proc in psutil.process_iter(["uids", "cmdline"]):
        try:
            uids, cmdline = proc.info["uids"], " ".join(proc.info["cmdline"] or ())
            if proc.pid == os.getpid() or uids is None or uids.real != os.getuid() or "ray" not in cmdline:
                continue
            fd_dir = f"/proc/{proc.pid}/fd"
            links = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        except (OSError, psutil.Error):
            continue  # gone, or not ours to look at
        if any(link.startswith(inside) for link in links):
            holders.append(proc)
    for proc in holders:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(holders, timeout=5)
    return bool(holders)


def _sweep_segments() -> list[str]:
    removed = []
    for name, _pid, alive in list_segments():
        if alive:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass  # another process swept it first
        except PermissionError:
            pass  # another user's: /dev/shm is sticky, and theirs to remove
    return removed


def sweep_stale() -> list[str]:
    """Unlink this project's segments and semaphores (and private temporary directories)
    whose creator is dead; return their names.

    Dead means: no process holds the lock its creator took, and its pid is not
    alive here (a reused pid errs on the side of keeping it).
    """
    removed: list[str] = []
    # The processes killed for holding files in a stale directory (a dead local Ray
    # instance's agents and node servers) may have left segments and directories of
    # their own: a further pass removes those.
    for _ in range(3):
        removed += _sweep_segments()
        # A local Ray instance's directory is in /tmp when TMPDIR is too long for its sockets.
        tmps = dict.fromkeys([tempfile.gettempdir(), "/tmp"])
        swept = [path for tmp in tmps for path in _sweep_private_dirs(tmp)]
        removed += swept
        if not swept:
            break
    return removed
