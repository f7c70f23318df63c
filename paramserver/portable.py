"""User code that crosses into worker processes: models, losses, Keras and environment factories.

Workers are started fresh (spawn or forkserver), so everything they receive is
pickled. Plain pickle stores a class or function by reference (its module and
name), which a worker cannot resolve when the definition lives in ``__main__``
of a notebook or of ``python -`` (there is no file to import it from). These
objects are pickled with cloudpickle instead: definitions from ``__main__``
(and other dynamic modules) travel by value, anything importable still by
reference, exactly as plain pickle would store it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle


def dumps(obj: Any, what: str) -> bytes:
    """``obj`` as bytes a worker can load with ``pickle.loads``; TypeError naming ``what``
    (``"the model"``, ``"the loss"``) and the cause if it cannot be pickled."""
    try:
        return cloudpickle.dumps(obj)
    except Exception as e:
        raise TypeError(
            f"{what} could not be pickled for the worker processes ({type(e).__name__}: {e}); "
            "it must not hold open files, locks, threads or generators"
        ) from None


class ByValue:
    """Wraps an object so that *pickling the wrapper* uses cloudpickle; unpickling gives
    back the object itself, not the wrapper. Put one in the place of a user's object in
    a ``__reduce__``/``__getstate__``: the receiving side never sees this class."""

    __slots__ = ("data",)

    def __init__(self, obj: Any, what: str = "an object"):
        self.data = dumps(obj, what)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return pickle.loads, (self.data,)


def check(obj: Any, what: str) -> None:
    """Fail now, in the calling process, with one clear message, if ``obj`` cannot travel."""
    dumps(obj, what)


@contextlib.contextmanager
def main_without_file() -> Iterator[None]:
    """While starting a worker: hide a ``__main__.__file__`` that names no file.

    multiprocessing tells a spawned (or forkserver) child to re-run the parent's main
    script from ``__main__.__file__``; under ``python -`` that is ``'<stdin>'`` and the
    child dies with FileNotFoundError before it runs any of our code. Nothing needs
    re-running there: the session's definitions travel by value (:class:`ByValue`). A
    notebook's ``__main__`` has no ``__file__`` at all, and a real script's is left as it
    is, so such a script still needs its ``if __name__ == '__main__'`` guard.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None or os.path.exists(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path
