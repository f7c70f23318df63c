"""TensorBoard event files of a run's scalars, with neither TensorFlow nor torch.

    python -c "from paramserver.tensorboard import ScalarLog
    with ScalarLog('/tmp/tb') as log: log.add(0, {'loss': 1.0})"
    tensorboard --logdir /tmp/tb

:class:`ScalarLog` writes ``events.out.tfevents.*`` files the way
``torch.utils.tensorboard.SummaryWriter.add_scalar`` does (one ``Event`` with
``simple_value`` summaries per call), so the Scalars dashboard and every reader
of event files (``EventAccumulator``, tbparse) see them. It needs only the
``tensorboard`` package (the ``bench`` extra), whose protobuf messages and
record framing it uses; TensorBoard's own writers are avoided because they go
through ``tensorboard.compat.tf``, which imports TensorFlow whenever it is
installed (seconds and hundreds of MB in the server process), and start a
flushing thread nobody here would own.

:func:`train_scalars` and :func:`episode_scalars` turn the server's figures
(a ``metrics.jsonl`` line, an ``episodes.jsonl`` line) into tag -> value.
Importing this module imports nothing of TensorBoard; creating a ScalarLog does.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, BinaryIO

from .report import require_extra

_uid = itertools.count()  # two logs of one process in one second still get two files


def _event_api() -> tuple[Any, Any, Any]:
    """(event_pb2, summary_pb2, RecordWriter) of the installed tensorboard.

    ``tensorboard.summary.writer.record_writer.RecordWriter`` (TFRecord framing
    with masked CRC32C) and the ``tensorboard.compat.proto`` messages are not in
    TensorBoard's documented API, but they are what torch's SummaryWriter and
    TensorBoard's own writer build on; checked with tensorboard 2.21.0. The
    documented ``tensorboard.summary.Writer`` is marked experimental and goes
    through ``tensorboard.compat.tf`` (see the module docstring).
    """
    require_extra("tensorboard", "bench")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    return event_pb2, summary_pb2, RecordWriter


class ScalarLog:
    """Scalars of one run as a TensorBoard event file in ``logdir``; a context manager.

    Each :meth:`add` is flushed at once: a TensorBoard watching ``logdir``
    shows a running job, and a killed job loses nothing it logged. Not
    thread-safe: one owner (the server's watch loop) writes.
    """

    _file: BinaryIO | None = None  # class default: close() works after a failed __init__

    def __init__(self, logdir: str) -> None:
        if not isinstance(logdir, str | os.PathLike) or not os.fspath(logdir):
            raise ValueError(f"logdir must be a directory path, got {logdir!r}")
        event_pb2, summary_pb2, record_writer = _event_api()
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.logdir = os.fspath(logdir)
        if os.path.exists(self.logdir) and not os.path.isdir(self.logdir):
            raise ValueError(f"logdir {self.logdir!r} is a file; give a directory (it is created if missing)")
        os.makedirs(self.logdir, exist_ok=True)
        # TensorBoard reads every file whose name contains "tfevents", in name order; this is
        # the name TensorFlow and torch use, so files of both kinds sort together by time.
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_uid)}"
        )
        self.path = os.path.join(self.logdir, name)
        self._file = open(self.path, "wb")  # noqa: SIM115 -- owned by this object, closed in close()
        try:
            self._records = record_writer(self._file)
            # The first record names the format; readers refuse files without it.
            self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        except BaseException:
            self.close()
            raise

    def add(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        """Log ``scalars`` (tag -> value) at ``step``; ``wall_time`` defaults to now (Unix seconds).

        Tags group by their first ``/`` in TensorBoard (``worker/0/staleness``
        lands in the ``worker`` section). NaN and infinities are written as they
        are: TensorBoard shows them, and a diverging run should look like one.
        """
        if self._file is None:
            raise ValueError(f"ScalarLog of {self.logdir!r} is closed; open a new one to log more")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int (e.g. the update count), got {step!r}")
        values = []
        for tag, value in scalars.items():
            if not isinstance(tag, str) or not tag:
                raise TypeError(f"scalar tags must be non-empty strings, got {tag!r}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"scalar {tag!r} must be a number, got {value!r}")
            values.append(self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))
        if not values:
            return
        event = self._event_pb2.Event(
            wall_time=time.time() if wall_time is None else float(wall_time),
            step=step,
            summary=self._summary_pb2.Summary(value=values),
        )
        self._write(event)

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def close(self) -> None:
        """Close the file; safe to call twice."""
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._file is None else "open"
        return f"ScalarLog({self.logdir!r}, {state})"


# -- the server's figures as scalars ------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _numbers(value: Any) -> list[float | None]:
    return [_number(v) for v in value] if isinstance(value, list) else []


def train_scalars(line: Mapping[str, Any], previous: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Scalars of one ``metrics.jsonl`` line (``paramserver.server._metrics_line``).

    Rates are over the interval since ``previous`` (the line before), or, without
    it, averages since the first worker started (``t`` = 0, counters at zero).
    Missing or null figures are left out, so lines may gain or lose keys.

    Tags: ``train/loss``, ``train/samples_per_second``, ``train/updates_per_second``,
    ``train/accuracy``, ``test/accuracy``, ``test/<metric>`` (``test_metric``
    named by ``metric``), ``staleness/mean`` (over workers, weighted by steps),
    and per worker ``worker/<r>/staleness``, ``worker/<r>/staleness_max``,
    ``worker/<r>/steps_per_second``, ``worker/<r>/lr``.
    """
    out: dict[str, float] = {}
    metric = line.get("metric") if isinstance(line.get("metric"), str) else "metric"
    for key, tag in (
        ("loss", "train/loss"),
        ("train_accuracy", "train/accuracy"),
        ("test_accuracy", "test/accuracy"),
        ("train_metric", f"train/{metric}"),
        ("test_metric", f"test/{metric}"),
    ):
        value = _number(line.get(key))
        if value is not None:
            out[tag] = value

    t = _number(line.get("t"))
    t0 = _number(previous.get("t")) if previous is not None else 0.0
    dt = t - t0 if t is not None and t0 is not None else 0.0
    before = previous if previous is not None else {}
    for key, tag in (("samples", "train/samples_per_second"), ("updates", "train/updates_per_second")):
        now, then = _number(line.get(key)), _number(before.get(key, 0))
        if dt > 0 and now is not None and then is not None and now >= then:
            out[tag] = (now - then) / dt

    steps = _numbers(line.get("steps"))
    steps_before = _numbers(before.get("steps")) if previous is not None else [0.0] * len(steps)
    staleness = _numbers(line.get("staleness_mean"))
    weighted, total_steps = 0.0, 0.0
    for r, s in enumerate(staleness):
        if s is None:
            continue
        out[f"worker/{r}/staleness"] = s
        n = steps[r] if r < len(steps) else None
        if n is not None and n > 0:
            weighted, total_steps = weighted + s * n, total_steps + n
    if total_steps > 0:
        out["staleness/mean"] = weighted / total_steps
    for key, name in (("staleness_max", "staleness_max"), ("lr", "lr")):
        for r, v in enumerate(_numbers(line.get(key))):
            if v is not None:
                out[f"worker/{r}/{name}"] = v
    for r, n in enumerate(steps):
        then_r = steps_before[r] if r < len(steps_before) else None
        # A restarted worker keeps its row, but guard anyway: a negative rate is never true.
        if dt > 0 and n is not None and then_r is not None and n >= then_r:
            out[f"worker/{r}/steps_per_second"] = (n - then_r) / dt
    return out


def episode_scalars(doc: Mapping[str, Any]) -> dict[str, float]:
    """Scalars of one finished episode (an ``episodes.jsonl`` line, or the RL callback's dict).

    Tags: ``episode/return``, ``episode/mean_return`` (running mean of the
    server's window), ``episode/length`` (environment steps) and
    ``worker/<r>/return``.
    """
    out: dict[str, float] = {}
    for key, tag in (
        ("return", "episode/return"),
        ("mean_return", "episode/mean_return"),
        ("length", "episode/length"),
    ):
        value = _number(doc.get(key))
        if value is not None:
            out[tag] = value
    worker, ret = doc.get("worker"), _number(doc.get("return"))
    if isinstance(worker, int) and not isinstance(worker, bool) and ret is not None:
        out[f"worker/{worker}/return"] = ret
    return out
