"""Update rules on the flat parameter vector, in place: one compiled pass, or NumPy passes.

A rule updates ``params[lo:hi]`` from ``grad[lo:hi]`` and its state slots over
the same range, so a policy can hand it the whole vector or one stripe. The
arithmetic follows ``torch.optim`` (same formulas, same defaults), so a run
with one worker can be compared with plain PyTorch training.

``apply`` runs the rule's fused kernel from :mod:`paramserver.kernels` (one
read and one write of each array) when numba is importable, else
``apply_numpy``, a few vectorized NumPy passes; both give the same bits.
Rules that PyTorch defines on sparse gradients also update rows of a table
(``apply_rows``): SGD, Adagrad and lazy Adam (``torch.optim.SparseAdam``).

Nothing here allocates per step: the NumPy passes' temporaries go to scratch
buffers the worker allocates once (``scratch`` rows, each as long as the
parameter vector, or one block of it in :class:`Updater`).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np


@functools.cache
def _kernels() -> ModuleType | None:
    """:mod:`paramserver.kernels`, or None without numba (the NumPy passes then run).
    Imported on first use, so that ``import paramserver`` does not pay numba's import."""
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
"""What numba computes in on a CPU (it has no float16 arithmetic there)."""


def _fusable(p: np.ndarray, *arrays: np.ndarray) -> np.dtype | None:
    """The dtype the kernels compute in, or None where they must not run: mixed dtypes
    (NumPy would promote, the kernels would not), float16, or no numba."""
    if _kernels() is None or p.dtype not in _KERNEL_DTYPES or any(a.dtype != p.dtype for a in arrays):
        return None
    return p.dtype


def coalesce(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sparse gradient with duplicates summed: ``(rows, sums)``, rows sorted and unique
    (int64), ``sums`` (len(rows), dim). ``values`` is (len(indices), dim)."""
    indices = np.ascontiguousarray(indices, np.int64)
    values = np.ascontiguousarray(values)
    if values.ndim != 2 or values.shape[0] != indices.size or indices.ndim != 1:
        raise ValueError(
            f"coalesce needs 1-D indices and (len(indices), dim) values, got {indices.shape} and "
            f"{values.shape}"
        )
    k = _kernels()
    if k is not None:
        rows, sums = k.coalesce(indices, values)
        return rows, sums
    rows, inverse = np.unique(indices, return_inverse=True)
    sums = np.zeros((rows.size, values.shape[1]), values.dtype)
    np.add.at(sums, inverse, values)
    return rows, sums


_EXPONENT_BITS = {
    np.dtype(np.float32): (np.uint32, np.uint32(0x7F80_0000)),
    np.dtype(np.float64): (np.uint64, np.uint64(0x7FF0_0000_0000_0000)),
}
"""The unsigned type of each kernel dtype's width, and the mask of its exponent bits."""


def _bits(values: np.ndarray) -> tuple[np.ndarray, np.unsignedinteger]:
    """A C-contiguous float32/float64 array as the 1-D unsigned integers of its bits, and
    the mask of its exponent bits (what :func:`paramserver.kernels.all_finite` takes)."""
    unsigned, exponent = _EXPONENT_BITS[values.dtype]
    return values.reshape(-1).view(unsigned), exponent


def finite_check(values: np.ndarray) -> Callable[[], bool]:
    """``values_finite(values)`` as a call with nothing left to look up: for an array
    checked every step (a worker's dense gradient), whose own microseconds count."""
    k = _kernels()
    if k is None or values.dtype not in _KERNEL_DTYPES or not values.flags.c_contiguous:
        return lambda: values_finite(values)
    (bits, exponent), kernel = _bits(values), k.all_finite
    return lambda: kernel(bits, exponent)


def values_finite(values: np.ndarray) -> bool:
    """True if no element of ``values`` is inf or NaN (exact: no sum that could overflow)."""
    k = _kernels()
    values = np.ascontiguousarray(values)
    if k is None or values.dtype not in _KERNEL_DTYPES:
        return bool(np.isfinite(values).all())
    return bool(k.all_finite(*_bits(values)))


_ROWS_OUT_OF_RANGE = "rows must lie in [0, rows of the table)"
_ROWS_UNSORTED = "rows must be sorted and unique; coalesce(indices, values) first"


def _check_rows_code(code: int) -> None:
    """Turns a row kernel's error code into the caller's error."""
    if code == 0:  # kernels.ROWS_OK, without an import per step
        return
    from .kernels import ROWS_OUT_OF_RANGE

    raise ValueError(_ROWS_OUT_OF_RANGE if code == ROWS_OUT_OF_RANGE else _ROWS_UNSORTED)


def _check_rows_numpy(rows: np.ndarray, n_rows: int) -> None:
    """The row kernels' checks, for the NumPy fallback (the same order, the same errors)."""
    if rows.size and (rows[0] < 0 or rows[-1] >= n_rows):
        raise ValueError(_ROWS_OUT_OF_RANGE)
    if rows.size > 1 and not (rows[1:] > rows[:-1]).all():
        raise ValueError(_ROWS_UNSORTED)


class UpdateRule(ABC):
    """``apply(p, g, state, t, lr, scratch)``: one step on a range of the flat vector;
    ``apply_rows(table, state, rows, values, t, lr)``: one step on some rows of a table."""

    name: ClassVar[str]
    state_slots: ClassVar[int] = 0
    """Rows of optimizer state (momentum, moments) per parameter."""
    scratch_slots: ClassVar[int] = 1
    """Rows of process-local temporaries the rule needs."""

    def apply(
        self, p: np.ndarray, g: np.ndarray, state: np.ndarray, t: int, lr: float, scratch: np.ndarray
    ) -> None:
        """Update ``p`` in place. ``state`` is ``(state_slots, n)``, ``scratch``
        ``(scratch_slots, n)``; ``t`` is the 1-based step number (bias correction).
        Runs the fused kernel (:meth:`apply_fused`) where it can, else :meth:`apply_numpy`."""
        dt = _fusable(p, g, state)
        if dt is None:
            self.apply_numpy(p, g, state, t, lr, scratch)
            return
        k = _kernels()
        assert k is not None
        self.apply_fused(k, dt, p, g, state, t, lr)

    def apply_fused(
        self, k: Any, dt: np.dtype, p: np.ndarray, g: np.ndarray, state: np.ndarray, t: int, lr: float
    ) -> None:
        """:meth:`apply` as one compiled pass of :mod:`paramserver.kernels` (``k``) in ``dt``."""
        raise NotImplementedError

    @abstractmethod
    def apply_numpy(
        self, p: np.ndarray, g: np.ndarray, state: np.ndarray, t: int, lr: float, scratch: np.ndarray
    ) -> None:
        """:meth:`apply` as NumPy passes (the fallback without numba, and the reference)."""

    @property
    def fused(self) -> bool:
        """Whether :meth:`apply` runs one compiled pass (then blocking gains nothing)."""
        return _kernels() is not None

    @property
    def supports_rows(self) -> bool:
        """Whether :meth:`apply_rows` is defined for these settings (torch's sparse rules)."""
        return False

    def warm_up(self, dtype: type[np.floating] = np.float32) -> None:
        """Compiles this rule's kernels for ``dtype`` now, or loads them from the disk cache.
        Each worker calls it before its first step, where ``hang_timeout`` does not count
        yet. The server does not: loading numba there would add 0.3-0.5 s to every start,
        to spare only the first run after an install (N workers compile at once then)."""
        p = np.zeros(8, dtype)
        scratch = np.zeros((self.scratch_slots, 8), dtype)
        self.apply(p, np.zeros_like(p), np.zeros((self.state_slots, 8), dtype), 1, 0.0, scratch)
        if self.supports_rows and _kernels() is not None:
            rows, values = coalesce(np.array([1, 1]), np.zeros((2, 4), dtype))
            self.apply_rows(p.reshape(2, 4), np.zeros((self.state_slots, 2, 4), dtype), rows, values, 1, 0.0)
            values_finite(values)
            if self.takes_ids:
                self.apply_ids(p.reshape(2, 4), np.array([1, 1]), np.zeros((2, 4), dtype), 0.0)

    @property
    def takes_ids(self) -> bool:
        """Whether :meth:`apply_ids` works: a rule that adds each row's gradient in
        (SGD without momentum or weight decay) needs no coalescing, as in torch.optim."""
        return False

    def apply_ids(self, table: np.ndarray, ids: np.ndarray, values: np.ndarray, lr: float) -> None:
        """Update ``table`` from an uncoalesced sparse gradient: ``values[k]`` is a gradient
        of row ``ids[k]``, ids in any order and repeated (each adds in). Only where
        :attr:`takes_ids`; ``ids`` int64, ``values`` (len(ids), dim) of the table's dtype."""
        raise ValueError(f"{self.name} needs coalesced rows (see coalesce) for sparse gradients")

    def apply_rows(
        self,
        table: np.ndarray,
        state: np.ndarray,
        rows: np.ndarray,
        values: np.ndarray,
        t: int,
        lr: float,
    ) -> None:
        """Update ``table[rows]`` in place from a coalesced sparse gradient, leaving every
        other row's bytes as they were. ``table`` is (n_rows, dim), ``state``
        ``(state_slots, n_rows, dim)``, ``rows`` int64, sorted and unique (see
        :func:`coalesce`), ``values`` (len(rows), dim); ``t`` counts this table's steps
        (1-based), as torch counts them per parameter tensor."""
        raise ValueError(
            f"{self.name} has no update for sparse gradients (torch.optim refuses it too); "
            "use sgd without momentum or weight decay, adagrad without weight decay, or adam "
            "(lazy, as torch.optim.SparseAdam)"
        )

    def _rows_args(
        self, table: np.ndarray, state: np.ndarray, rows: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Checks shapes and dtypes for the row kernels; ``rows`` and ``values`` as they need them."""
        if table.ndim != 2 or state.shape != (self.state_slots, *table.shape):
            raise ValueError(
                f"apply_rows needs a (rows, dim) table and ({self.state_slots}, rows, dim) state, "
                f"got {table.shape} and {state.shape}"
            )
        if rows.dtype != np.int64 or rows.ndim != 1:
            raise TypeError(f"rows must be 1-D int64 (ids keep their dtype), got {rows.dtype} {rows.shape}")
        if table.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"row updates take float32 or float64 tables, got {table.dtype}")
        if values.shape != (rows.size, table.shape[1]) or values.dtype != table.dtype:
            raise ValueError(
                f"values must be {table.dtype} of shape {(rows.size, table.shape[1])}, "
                f"got {values.dtype} {values.shape}"
            )
        rows, values = np.ascontiguousarray(rows), np.ascontiguousarray(values)
        if _kernels() is None:
            _check_rows_numpy(rows, table.shape[0])
        return rows, values


@dataclass
class SGD(UpdateRule):
    """``torch.optim.SGD``: momentum, Nesterov, L2 weight decay (dampening 0)."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name: ClassVar[str] = "sgd"
    scratch_slots: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov needs momentum > 0 (e.g. --momentum 0.9)")

    @property
    def state_slots(self) -> int:  # type: ignore[override]
        return 1 if self.momentum else 0

    def apply_fused(self, k, dt, p, g, state, t, lr):  # type: ignore[no-untyped-def]
        if self.momentum:
            lr_, mom, wd = k.scalars(dt, lr, self.momentum, self.weight_decay)
            k.sgd_momentum(p, g, state[0], lr_, mom, wd, bool(self.weight_decay), self.nesterov)
        elif self.weight_decay:
            k.sgd_weight_decay(p, g, *k.scalars(dt, lr, self.weight_decay))
        else:
            k.sgd(p, g, *k.scalars(dt, lr))

    def apply_numpy(self, p, g, state, t, lr, scratch):  # type: ignore[no-untyped-def]
        d = g
        if self.weight_decay:
            d = np.multiply(p, self.weight_decay, out=scratch[0])
            d += g
        if self.momentum:
            buf = state[0]
            buf *= self.momentum
            buf += d  # first step: buf = g, as torch (buf starts at zero)
            if self.nesterov:
                tmp = np.multiply(buf, self.momentum, out=scratch[1])
                tmp += d
                d = tmp
            else:
                d = buf
        step = np.multiply(d, lr, out=scratch[1])
        p -= step

    @property
    def supports_rows(self) -> bool:
        return not (self.momentum or self.weight_decay)

    def apply_rows(self, table, state, rows, values, t, lr):  # type: ignore[no-untyped-def]
        if not self.supports_rows:
            # torch refuses weight decay on sparse gradients; momentum it keeps as a sparse
            # buffer that grows to every row ever touched and decays all of them each step,
            # which is a dense update in disguise.
            raise ValueError(
                "sgd row updates take no momentum and no weight decay (set both to 0), or use "
                "adagrad or adam for sparse gradients"
            )
        rows, values = self._rows_args(table, state, rows, values)
        k = _kernels()
        if k is None:  # fancy indexing: a gather and a scatter, fine as rows are unique
            table[rows] -= values * table.dtype.type(lr)
            return
        _check_rows_code(k.sgd_rows(table, rows, values, *k.scalars(table.dtype, lr)))

    @property
    def takes_ids(self) -> bool:
        return self.supports_rows

    def apply_ids(self, table, ids, values, lr):  # type: ignore[no-untyped-def]
        # A lean check: this runs every step of an embedding model, where the rest of the
        # step is a few hundred microseconds.
        if not self.takes_ids:
            super().apply_ids(table, ids, values, lr)
        if (
            ids.dtype != np.int64
            or ids.ndim != 1
            or table.ndim != 2
            or values.shape != (ids.size, table.shape[1])
            or values.dtype != table.dtype
        ):
            raise ValueError(
                f"apply_ids needs 1-D int64 ids and ({ids.size}, {table.shape[1:]}) values of the "
                f"table's dtype {table.dtype}, got {ids.dtype} {ids.shape} and {values.dtype} {values.shape}"
            )
        k = _kernels()
        if k is None or table.dtype not in _KERNEL_DTYPES:
            if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
                raise ValueError(_ROWS_OUT_OF_RANGE)
            np.subtract.at(table, ids, values * table.dtype.type(lr))
            return
        ids, values = np.ascontiguousarray(ids), np.ascontiguousarray(values)
        _check_rows_code(k.sgd_ids(table, ids, values, table.dtype.type(lr)))


@dataclass
class Adam(UpdateRule):
    """``torch.optim.Adam`` (L2 weight decay) or, with ``decoupled``, ``AdamW``."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    name: ClassVar[str] = "adam"
    state_slots: ClassVar[int] = 2
    scratch_slots: ClassVar[int] = 2

    def __post_init__(self) -> None:
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                raise ValueError(f"{b} must be in [0, 1), got {getattr(self, b)}")

    def apply_fused(self, k, dt, p, g, state, t, lr):  # type: ignore[no-untyped-def]
        bc1 = 1.0 - self.beta1**t
        bc2 = 1.0 - self.beta2**t
        mode = 0 if not self.weight_decay else 2 if self.decoupled else 1
        k.adam(
            p, g, state[0], state[1],
            *k.scalars(
                dt, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, math.sqrt(bc2), self.eps, lr / bc1,
                self.weight_decay, 1.0 - lr * self.weight_decay,
            ),
            mode,
        )  # fmt: skip

    def apply_numpy(self, p, g, state, t, lr, scratch):  # type: ignore[no-untyped-def]
        m, v = state[0], state[1]
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - lr * self.weight_decay
            else:
                g = np.add(g, np.multiply(p, self.weight_decay, out=scratch[0]), out=scratch[0])
        # v before m, on purpose: with state shared lock-free (po3), another worker
        # that sees this worker's m must also see its v (x86 keeps stores in order), or
        # where its own gradient is zero it divides this m by sqrt(0) + eps and jumps.
        sq = np.multiply(g, g, out=scratch[1])
        v *= self.beta2
        sq *= 1.0 - self.beta2
        v += sq
        # m += (1 - b1) * (g - m), which is torch's lerp
        d = np.subtract(g, m, out=scratch[1])
        d *= 1.0 - self.beta1
        m += d
        bc1 = 1.0 - self.beta1**t
        bc2 = 1.0 - self.beta2**t
        denom = np.sqrt(v, out=scratch[1])
        denom /= math.sqrt(bc2)
        denom += self.eps
        np.divide(m, denom, out=denom)
        denom *= lr / bc1
        p -= denom

    @property
    def supports_rows(self) -> bool:
        return not self.weight_decay

    def apply_rows(self, table, state, rows, values, t, lr):  # type: ignore[no-untyped-def]
        """Lazy Adam, as ``torch.optim.SparseAdam``: only the touched rows' moments move, and
        eps is added before the bias correction (``lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)``)."""
        if self.weight_decay:
            raise ValueError(
                f"{'adamw' if self.decoupled else 'adam'} row updates take no weight decay "
                "(torch.optim.SparseAdam has none); set weight_decay to 0"
            )
        rows, values = self._rows_args(table, state, rows, values)
        k = _kernels()
        step_size = lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        if k is None:
            kind = table.dtype.type
            m, v = state[0], state[1]
            v_old = v[rows]
            v_new = v_old + (values * values - v_old) * kind(1.0 - self.beta2)
            v[rows] = v_new  # v before m, as in the kernel
            m_old = m[rows]
            m_new = m_old + (values - m_old) * kind(1.0 - self.beta1)
            m[rows] = m_new
            table[rows] += -kind(step_size) * (m_new / (np.sqrt(v_new) + kind(self.eps)))
            return
        code = k.sparse_adam_rows(
            table, state[0], state[1], rows, values,
            *k.scalars(table.dtype, 1.0 - self.beta1, 1.0 - self.beta2, self.eps, step_size),
        )  # fmt: skip
        _check_rows_code(code)


def _with_decay(g: np.ndarray, p: np.ndarray, weight_decay: float, out: np.ndarray) -> np.ndarray:
    """``g + weight_decay * p`` (L2 weight decay as torch adds it), in ``out``; ``g`` itself
    without weight decay."""
    if not weight_decay:
        return g
    return np.add(g, np.multiply(p, weight_decay, out=out), out=out)


def _scaled_step(
    p: np.ndarray, g: np.ndarray, acc: np.ndarray, eps: float, lr: float, out: np.ndarray
) -> None:
    """``p -= lr * g / (sqrt(acc) + eps)`` through ``out`` (RMSprop's and Adagrad's step)."""
    denom = np.sqrt(acc, out=out)
    denom += eps
    np.divide(g, denom, out=denom)
    denom *= lr
    p -= denom


@dataclass
class RMSProp(UpdateRule):
    """``torch.optim.RMSprop`` (not centered, no momentum); the A3C optimizer."""

    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: ClassVar[str] = "rmsprop"
    state_slots: ClassVar[int] = 1
    scratch_slots: ClassVar[int] = 2

    def apply_fused(self, k, dt, p, g, state, t, lr):  # type: ignore[no-untyped-def]
        alpha, one_minus_alpha, eps, lr_, wd = k.scalars(
            dt, self.alpha, 1.0 - self.alpha, self.eps, lr, self.weight_decay
        )
        k.square_average(p, g, state[0], alpha, one_minus_alpha, eps, lr_, wd, bool(self.weight_decay))

    def apply_numpy(self, p, g, state, t, lr, scratch):  # type: ignore[no-untyped-def]
        v = state[0]
        g = _with_decay(g, p, self.weight_decay, scratch[0])
        sq = np.multiply(g, g, out=scratch[1])
        sq *= 1.0 - self.alpha
        v *= self.alpha
        v += sq
        _scaled_step(p, g, v, self.eps, lr, scratch[1])


@dataclass
class Adagrad(UpdateRule):
    """``torch.optim.Adagrad`` with lr_decay 0 and initial_accumulator_value 0; dense or,
    without weight decay, on rows."""

    eps: float = 1e-10
    weight_decay: float = 0.0
    name: ClassVar[str] = "adagrad"
    state_slots: ClassVar[int] = 1
    scratch_slots: ClassVar[int] = 2

    def apply_fused(self, k, dt, p, g, state, t, lr):  # type: ignore[no-untyped-def]
        one, eps, lr_, wd = k.scalars(dt, 1.0, self.eps, lr, self.weight_decay)
        # RMSprop's pass with both weights 1: the sum of squares grows by g * g.
        k.square_average(p, g, state[0], one, one, eps, lr_, wd, bool(self.weight_decay))

    def apply_numpy(self, p, g, state, t, lr, scratch):  # type: ignore[no-untyped-def]
        s = state[0]
        g = _with_decay(g, p, self.weight_decay, scratch[0])
        s += np.multiply(g, g, out=scratch[1])
        _scaled_step(p, g, s, self.eps, lr, scratch[1])

    @property
    def supports_rows(self) -> bool:
        return not self.weight_decay

    def apply_rows(self, table, state, rows, values, t, lr):  # type: ignore[no-untyped-def]
        if self.weight_decay:
            raise ValueError(
                "adagrad row updates take no weight decay (torch refuses it with sparse "
                "gradients); set weight_decay to 0"
            )
        rows, values = self._rows_args(table, state, rows, values)
        k = _kernels()
        if k is None:
            kind = table.dtype.type
            s = state[0]
            s_new = s[rows] + values * values
            s[rows] = s_new
            table[rows] -= (values / (np.sqrt(s_new) + kind(self.eps))) * kind(lr)
            return
        _check_rows_code(k.adagrad_rows(table, state[0], rows, values, *k.scalars(table.dtype, self.eps, lr)))


UPDATE_BLOCK = 16384
"""Elements a rule handles per call in :class:`Updater` (64 KiB of float32 a row)."""


class Updater:
    """Applies a rule to ranges of one flat vector, in one call or block by block.

    A fused rule (one compiled pass) takes the whole range in one call. The NumPy
    passes (Adam: 13) go over blocks of ``block`` elements, so that they stay in
    cache instead of streaming whole-vector temporaries through memory, and the
    scratch rows are one block long instead of one vector.
    Set ``t`` (1-based step) and ``lr`` before each step.
    """

    def __init__(
        self,
        rule: UpdateRule,
        params: np.ndarray,
        grad: np.ndarray,
        state: np.ndarray,
        lr: float,
        block: int = UPDATE_BLOCK,
    ):
        assert state.shape == (rule.state_slots, params.size), "state must be (slots, params)"
        self.rule, self.params, self.grad, self.state = rule, params, grad, state
        self.block = block
        self.scratch = np.zeros((rule.scratch_slots, min(block, params.size)), params.dtype)
        # A kernel call costs microseconds of dispatch, and its one pass gains nothing from
        # blocks, so a fused rule gets each range in one call (where the arrays let it fuse).
        self.whole_ranges = rule.fused and _fusable(params, grad, state) is not None
        self._kernels, self._dtype = _kernels(), params.dtype  # looked up once, not per call
        self.t = 1
        self.lr = lr

    def __call__(self, a: int, b: int) -> None:
        if self.whole_ranges:  # one kernel call; the dtypes were checked once, above
            state = self.state
            self.rule.apply_fused(
                self._kernels, self._dtype, self.params[a:b], self.grad[a:b], state[:, a:b], self.t, self.lr
            )
            return
        rule, p, g, state, scratch, t, lr = (
            self.rule,
            self.params,
            self.grad,
            self.state,
            self.scratch,
            self.t,
            self.lr,
        )
        block = max(b - a, 1) if self.whole_ranges else self.block
        for lo in range(a, b, block):
            hi = min(lo + block, b)
            rule.apply(p[lo:hi], g[lo:hi], state[:, lo:hi], t, lr, scratch[:, : hi - lo])


RULES = ("sgd", "adam", "adamw", "rmsprop", "adagrad")


def make_rule(
    name: str,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
    alpha: float = 0.99,
) -> UpdateRule:
    """The update rule called ``name`` (one of :data:`RULES`). ``eps`` defaults to the
    rule's own, as in torch.optim: 1e-8, or 1e-10 for adagrad."""
    if name == "sgd":
        return SGD(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        return Adam(betas[0], betas[1], 1e-8 if eps is None else eps, weight_decay, decoupled=name == "adamw")
    if name == "rmsprop":
        return RMSProp(alpha=alpha, eps=1e-8 if eps is None else eps, weight_decay=weight_decay)
    if name == "adagrad":
        return Adagrad(eps=1e-10 if eps is None else eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(RULES)}")
