"""Layouts: the only code that knows where a named array lives in a flat buffer.

A :class:`Layout` maps names to (offset, shape, dtype) inside one byte region,
each array starting on a 64-byte boundary (a cache line; also what Eigen and
oneDNN want to avoid copies). It has a fingerprint, a hash of the names,
shapes and dtypes, so that two processes can check they mean the same thing by
the same bytes before either reads a byte.

Two uses:

* a *model* layout: every parameter of a model, one dtype, packed into one
  flat vector (``Layout.from_torch``, ``Layout.from_arrays``). Update rules work
  on that flat vector; the gaps between tensors are zero and stay zero;
* a *segment* layout: the arrays of one shared-memory segment (parameters,
  optimizer state, counters, or a data set).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

ALIGN = 64
"""Every array starts on a multiple of this many bytes."""


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def _check_dtype(name: str, dt: np.dtype) -> None:
    if dt.hasobject or dt.kind not in "biuf":
        raise TypeError(
            f"array {name!r} has dtype {dt}: only numeric dtypes can live in "
            "shared memory; convert it, e.g. with .astype(np.float32)"
        )


@dataclass(frozen=True)
class Field:
    """One named array: ``shape`` of ``dtype`` at byte ``offset``."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Layout:
    """Named arrays packed, 64-byte aligned, into one region of ``nbytes`` bytes."""

    fields: tuple[Field, ...]
    nbytes: int

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        assert len(set(names)) == len(names), f"duplicate names in layout: {names}"

    # -- construction -------------------------------------------------------------

    @classmethod
    def pack(cls, specs: Mapping[str, tuple[tuple[int, ...], Any]]) -> Layout:
        """Pack ``{name: (shape, dtype)}`` in the given order."""
        fields = []
        offset = 0
        for name, (shape, dtype) in specs.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"layout names must be non-empty strings, got {name!r}")
            dt = np.dtype(dtype)
            _check_dtype(name, dt)
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise ValueError(f"array {name!r} has a negative dimension: {shape}")
            field = Field(name, offset, shape, dt.str)
            fields.append(field)
            offset = align_up(offset + field.nbytes)
        return cls(tuple(fields), offset)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        """The layout of a dict of arrays (their shapes and dtypes, in dict order)."""
        return cls.pack({name: (np.shape(a), np.asarray(a).dtype) for name, a in arrays.items()})

    @classmethod
    def from_torch(cls, module: torch.nn.Module) -> Layout:
        """The layout of a module's trainable parameters, in ``named_parameters()`` order.

        Buffers (batch-norm running statistics) are not part of it: they are not
        trained by gradients, so each worker keeps its own.
        """
        specs = {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                specs[name] = (tuple(p.shape), str(p.dtype).removeprefix("torch."))
        if not specs:
            raise ValueError("the module has no trainable parameters")
        return cls.pack(specs)

    # -- queries ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no array named {name!r} in layout; names: {self.names}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def dtype(self) -> np.dtype:
        """The one dtype of every array (model layouts); ValueError if mixed."""
        dtypes = {f.dtype for f in self.fields}
        if len(dtypes) != 1:
            raise ValueError(
                f"a flat parameter vector needs one dtype, the model has {sorted(dtypes)}; "
                "cast the model first (e.g. model.float())"
            )
        return np.dtype(dtypes.pop())

    @property
    def flat_size(self) -> int:
        """Length of the flat vector (padding included) in elements of ``dtype``."""
        return self.nbytes // self.dtype.itemsize

    @property
    def num_params(self) -> int:
        """Number of real elements, padding excluded."""
        return sum(f.size for f in self.fields)

    @property
    def fingerprint(self) -> str:
        """Hash of names, offsets, shapes and dtypes: equal layouts, equal fingerprints."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:32]

    # -- views ----------------------------------------------------------------------

    def ranges_without(self, names: Iterable[str]) -> list[tuple[int, int]]:
        """Element ranges ``[lo, hi)`` of the flat vector that hold the tensors other than
        ``names`` (the dense part of a model whose ``names`` get row-sparse gradients).
        Padding between two such tensors stays inside a range (fewer, longer ranges for
        the update rule; a zero gradient there changes nothing); padding alone, next to a
        table, makes no range: a step would check and update it for nothing."""
        size, skip = self.dtype.itemsize, set(names)
        spans = sorted((f.offset // size, f.offset // size + f.size, f.name in skip) for f in self.fields)
        out: list[tuple[int, int]] = []
        joinable = False  # the last range may grow across padding: no table since
        for a, b, is_table in spans:
            if is_table:
                joinable = False
            elif b > a:
                if joinable:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((a, b))
                joinable = True
        return out

    def views(self, buf: Any, base: int = 0) -> dict[str, np.ndarray]:
        """Writable NumPy views of every array in ``buf`` (starting at byte ``base``).

        ``np.frombuffer`` keeps an export of ``buf`` alive, so a shared-memory
        segment cannot be closed while a view exists (a clean BufferError
        instead of a segfault on the next access).
        """
        out = {}
        for f in self.fields:
            a = np.frombuffer(buf, dtype=f.dtype, count=f.size, offset=base + f.offset)
            out[f.name] = a.reshape(f.shape)
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of a flat vector of this (model) layout, one per parameter."""
        itemsize = self.dtype.itemsize
        assert flat.size == self.flat_size, f"flat vector of {flat.size}, layout needs {self.flat_size}"
        return {
            f.name: flat[f.offset // itemsize : f.offset // itemsize + f.size].reshape(f.shape)
            for f in self.fields
        }

    def flatten(self, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """Copy named arrays into a (new, zero-padded) flat vector of this layout."""
        if out is None:
            out = np.zeros(self.flat_size, dtype=self.dtype)
        views = self.unflatten(out)
        missing = set(self.names) - set(arrays)
        if missing:
            raise KeyError(f"arrays missing for layout entries: {sorted(missing)}")
        for name, view in views.items():
            src = np.asarray(arrays[name])
            if src.shape != view.shape:
                raise ValueError(f"array {name!r} has shape {src.shape}, layout says {view.shape}")
            view[...] = src
        return out

    # -- serialisation (JSON, never pickle) ----------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "nbytes": self.nbytes,
            "fields": [[f.name, f.offset, list(f.shape), f.dtype] for f in self.fields],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        fields = tuple(
            Field(str(n), int(o), tuple(int(s) for s in sh), str(dt)) for n, o, sh, dt in d["fields"]
        )
        for f in fields:
            _check_dtype(f.name, np.dtype(f.dtype))
        return cls(fields, int(d["nbytes"]))

    def describe(self) -> str:
        """A table of the layout, for humans."""
        rows = [f"{'name':<32} {'offset':>10} {'shape':<18} dtype"]
        for f in self.fields:
            rows.append(f"{f.name:<32} {f.offset:>10} {str(f.shape):<18} {np.dtype(f.dtype).name}")
        return "\n".join(rows)
