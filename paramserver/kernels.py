"""Compiled update kernels: one pass over memory per step, dense or row by row.

The NumPy rules in :mod:`paramserver.optim` make 2-13 passes per step, each
streaming whole rows through memory; these loops read every input once and
write every output once, so a step costs about what its bytes cost.

Every kernel is compiled with numba on first use for the dtypes it is called
with, and the machine code is cached on disk (``cache=True``): next to this file
in ``__pycache__`` (``kernels.<function>-<line>.py3XX.nbi`` index and ``.nbc``
code) when that folder is writable, as in an editable install, else in
``NUMBA_CACHE_DIR`` or numba's user cache directory. N spawned workers
therefore load the code instead of compiling it N times. The kernels are
single-threaded (no ``parallel=True``): each worker is one thread of the
machine's budget, and numba's thread pool is never started.

Arithmetic is in the arrays' dtype, with the scalars cast to it by the caller
(:func:`scalars`) and ``fastmath=False`` (no contraction into FMA, no
reordering), so each element goes through exactly the roundings the NumPy
passes make: the kernels equal the NumPy rules bitwise, and tests check it.

Row kernels take a 2-D ``table`` (rows, dim), state slots of the same shape,
``rows`` (int64, sorted and unique, as :func:`coalesce` returns them) and
``values`` (len(rows), dim). They validate the rows before touching anything
and return an error code (:data:`ROWS_OK`, ...); :mod:`paramserver.optim` turns
a code into an exception.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}
"""``error_model='numpy'``: x / 0 gives inf as in NumPy, instead of raising (and
it keeps the division out of a Python-exception branch, so the loop vectorizes)."""

ROWS_OK = 0
ROWS_UNSORTED = 1
"""``rows`` is not strictly increasing (unsorted or duplicated): coalesce first."""
ROWS_OUT_OF_RANGE = 2
"""A row is negative or not below the table's row count."""


def scalars(dtype: np.dtype, *values: float) -> tuple[np.floating, ...]:
    """``values`` as scalars of ``dtype``, so that numba computes in the arrays' precision
    (a Python float would promote every float32 element to float64), rounded as
    NumPy rounds a Python scalar in ``array * scalar``."""
    kind = dtype.type
    return tuple(kind(v) for v in values)


# -- dense: one call updates p[i] for every i, reading g, state once -----------------------


@njit(**_JIT)
def sgd(p: np.ndarray, g: np.ndarray, lr: np.floating) -> None:
    """``p -= g * lr``."""
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr


@njit(**_JIT)
def sgd_weight_decay(p: np.ndarray, g: np.ndarray, lr: np.floating, weight_decay: np.floating) -> None:
    """``p -= (p * weight_decay + g) * lr``."""
    for i in range(p.size):
        d = p[i] * weight_decay + g[i]
        p[i] = p[i] - d * lr


@njit(**_JIT)
def sgd_momentum(
    p: np.ndarray,
    g: np.ndarray,
    buf: np.ndarray,
    lr: np.floating,
    momentum: np.floating,
    weight_decay: np.floating,
    use_weight_decay: bool,
    nesterov: bool,
) -> None:
    """Momentum SGD (dampening 0) as ``torch.optim.SGD``; the flags are branched on
    once per element but are loop-invariant, so LLVM hoists them (unswitching)."""
    for i in range(p.size):
        d = g[i]
        if use_weight_decay:
            d = p[i] * weight_decay + d
        b = buf[i] * momentum + d
        buf[i] = b
        d = b * momentum + d if nesterov else b
        p[i] = p[i] - d * lr


@njit(**_JIT)
def adam(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    one_minus_b1: np.floating,
    b2: np.floating,
    one_minus_b2: np.floating,
    sqrt_bc2: np.floating,
    eps: np.floating,
    lr_bc1: np.floating,
    weight_decay: np.floating,
    decay: np.floating,
    mode: int,
) -> None:
    """Adam / AdamW as ``torch.optim``. ``mode``: 0 no weight decay, 1 L2 (Adam:
    ``g + p * weight_decay``), 2 decoupled (AdamW: ``p *= decay``, decay = 1 - lr * wd)."""
    for i in range(p.size):
        x = p[i]
        gi = g[i]
        if mode == 1:
            gi = gi + x * weight_decay
        elif mode == 2:
            x = x * decay
        # v before m, on purpose: with state shared lock-free (po3), another worker
        # that sees this worker's m must also see its v (x86 keeps stores in order), or
        # where its own gradient is zero it divides this m by sqrt(0) + eps and jumps.
        # Here the order holds per element, in program order (the stores are not atomics,
        # so the language does not promise it; the compiled loop keeps it).
        vi = v[i] * b2 + (gi * gi) * one_minus_b2
        v[i] = vi
        mi = m[i] + (gi - m[i]) * one_minus_b1  # torch's lerp
        m[i] = mi
        denom = math.sqrt(vi) / sqrt_bc2 + eps
        p[i] = x - (mi / denom) * lr_bc1


@njit(**_JIT)
def square_average(
    p: np.ndarray,
    g: np.ndarray,
    v: np.ndarray,
    alpha: np.floating,
    one_minus_alpha: np.floating,
    eps: np.floating,
    lr: np.floating,
    weight_decay: np.floating,
    use_weight_decay: bool,
) -> None:
    """``v = v * alpha + g * g * one_minus_alpha``, ``p -= g / (sqrt(v) + eps) * lr``:
    ``torch.optim.RMSprop`` (not centered, no momentum), and with ``alpha`` and
    ``one_minus_alpha`` both 1 ``torch.optim.Adagrad`` (lr_decay 0, initial accumulator 0:
    ``v += g * g``, bit for bit, as a product by 1 is exact)."""
    for i in range(p.size):
        gi = g[i]
        if use_weight_decay:
            gi = gi + p[i] * weight_decay
        vi = v[i] * alpha + (gi * gi) * one_minus_alpha
        v[i] = vi
        p[i] = p[i] - (gi / (math.sqrt(vi) + eps)) * lr


# -- rows: update only table[rows[k]] from values[k] ---------------------------------------


@njit(**_JIT)
def check_rows(rows: np.ndarray, n_rows: int) -> int:
    """:data:`ROWS_OK` if ``rows`` is strictly increasing and inside ``[0, n_rows)``."""
    if rows.size == 0:
        return ROWS_OK
    if rows[0] < 0 or rows[rows.size - 1] >= n_rows:
        return ROWS_OUT_OF_RANGE
    for k in range(1, rows.size):
        if rows[k] <= rows[k - 1]:
            return ROWS_UNSORTED
    return ROWS_OK


@njit(**_JIT)
def _sgd_scatter(table: np.ndarray, rows: np.ndarray, values: np.ndarray, lr: np.floating) -> None:
    for k in range(rows.size):
        row = table[rows[k]]
        val = values[k]
        for j in range(row.size):
            row[j] = row[j] - val[j] * lr


@njit(**_JIT)
def sgd_rows(table: np.ndarray, rows: np.ndarray, values: np.ndarray, lr: np.floating) -> int:
    """``torch.optim.SGD`` on a coalesced sparse gradient: ``table[r] -= values * lr``."""
    code = check_rows(rows, table.shape[0])
    if code != ROWS_OK:
        return code
    _sgd_scatter(table, rows, values, lr)
    return ROWS_OK


@njit(**_JIT)
def sgd_ids(table: np.ndarray, ids: np.ndarray, values: np.ndarray, lr: np.floating) -> int:
    """``torch.optim.SGD`` on an uncoalesced sparse gradient: ``table[ids[k]] -= values[k] *
    lr`` for each k in order, repeats included (what torch does with one: no sort)."""
    n_rows = table.shape[0]
    for k in range(ids.size):
        if ids[k] < 0 or ids[k] >= n_rows:
            return ROWS_OUT_OF_RANGE
    _sgd_scatter(table, ids, values, lr)
    return ROWS_OK


@njit(**_JIT)
def adagrad_rows(
    table: np.ndarray, s: np.ndarray, rows: np.ndarray, values: np.ndarray, eps: np.floating, lr: np.floating
) -> int:
    """``torch.optim.Adagrad`` on a coalesced sparse gradient: the sum of squares and the
    parameters change on the touched rows only."""
    code = check_rows(rows, table.shape[0])
    if code != ROWS_OK:
        return code
    for k in range(rows.size):
        r = rows[k]
        row, srow, val = table[r], s[r], values[k]
        for j in range(row.size):
            gj = val[j]
            sj = srow[j] + gj * gj
            srow[j] = sj
            row[j] = row[j] - (gj / (math.sqrt(sj) + eps)) * lr
    return ROWS_OK


@njit(**_JIT)
def sparse_adam_rows(
    table: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    rows: np.ndarray,
    values: np.ndarray,
    one_minus_b1: np.floating,
    one_minus_b2: np.floating,
    eps: np.floating,
    step_size: np.floating,
) -> int:
    """``torch.optim.SparseAdam`` (lazy Adam): the moments of the touched rows move
    towards the gradient; ``step_size = lr * sqrt(bc2) / bc1`` from the table's step count
    (torch counts steps per parameter tensor, not per row), and eps is added to
    ``sqrt(v)`` before the bias correction, unlike dense Adam."""
    code = check_rows(rows, table.shape[0])
    if code != ROWS_OK:
        return code
    for k in range(rows.size):
        r = rows[k]
        row, mrow, vrow, val = table[r], m[r], v[r], values[k]
        for j in range(row.size):
            gj = val[j]
            vj = vrow[j] + (gj * gj - vrow[j]) * one_minus_b2  # v before m, as in dense Adam
            vrow[j] = vj
            mj = mrow[j] + (gj - mrow[j]) * one_minus_b1
            mrow[j] = mj
            row[j] = row[j] + -step_size * (mj / (math.sqrt(vj) + eps))
    return ROWS_OK


# -- sparse gradients: duplicates summed, non-finite values found --------------------------


_POSITION_BITS = 20
_POSITIONS = 1 << _POSITION_BITS
_KEY_LIMIT = 1 << (62 - _POSITION_BITS)


@njit(**_JIT)
def _coalesce_keys(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`coalesce` for fewer than 2**20 ids below 2**42: each (id, position) packed in
    one int64 and sorted, which is a stable sort of the ids, 3.5x faster than an argsort
    with fix-ups at 2,300 ids of 50,000 (the sparse suite's batch)."""
    n, dim = values.shape
    keys = np.empty(n, np.int64)
    for k in range(n):
        keys[k] = (indices[k] << _POSITION_BITS) | k
    keys.sort()
    unique = 0
    for k in range(n):
        if k == 0 or (keys[k] >> _POSITION_BITS) != (keys[k - 1] >> _POSITION_BITS):
            unique += 1
    rows = np.empty(unique, np.int64)
    sums = np.zeros((unique, dim), values.dtype)
    u = -1
    mask = _POSITIONS - 1
    for k in range(n):
        r = keys[k] >> _POSITION_BITS
        if k == 0 or r != rows[u]:
            u += 1
            rows[u] = r
        out, val = sums[u], values[keys[k] & mask]
        for j in range(dim):
            out[j] += val[j]
    return rows, sums


@njit(**_JIT)
def coalesce(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, sums)``: the sorted unique ``indices`` and, for each, the sum of its rows of
    ``values`` (``values`` is (len(indices), dim)), summed in the order they came."""
    n, dim = values.shape
    if n < _POSITIONS and (n == 0 or (indices.max() < _KEY_LIMIT and indices.min() > -_KEY_LIMIT)):
        return _coalesce_keys(indices, values)
    # Quicksort, then each run of equal indices back in input order: the same sums as a
    # stable sort, in half the time of numba's mergesort at a few hundred ids.
    order = np.argsort(indices)
    unique = 0
    start = 0
    for k in range(1, n + 1):
        if k == n or indices[order[k]] != indices[order[start]]:
            if k - start > 1:
                order[start:k] = np.sort(order[start:k])
            unique += 1
            start = k
    rows = np.empty(unique, np.int64)
    sums = np.zeros((unique, dim), values.dtype)
    u = -1
    for k in range(n):
        i = order[k]
        if k == 0 or indices[i] != indices[order[k - 1]]:
            u += 1
            rows[u] = indices[i]
        out, val = sums[u], values[i]
        for j in range(dim):
            out[j] += val[j]
    return rows, sums


@njit(**_JIT)
def all_finite(bits: np.ndarray, exponent: np.unsignedinteger) -> bool:
    """True if no element of a float array, given as its bits (1-D, the unsigned integers
    of its width), is inf or NaN: those, and only those, have every ``exponent`` bit set.
    A max over integers, not a test per element that stops at the first bad one: it
    vectorizes, and reads 1e6 float32 in about a third of the time of a NumPy sum."""
    top = bits.dtype.type(0)
    for i in range(bits.size):
        e = bits[i] & exponent
        if e > top:
            top = e
    return top != exponent
