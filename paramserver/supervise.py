"""The life of a run's worker processes: the process half of :class:`paramserver.server.Server`.

Every job (supervised training, A3C, DQN) runs under the one server; how its
worker processes live is written once, here:

- start: spawned, or forked by a forkserver that imported the framework first
  (:func:`worker_context`; never forked from the server itself), daemonic; a
  spawned worker gets its BLAS/OpenMP pool sizes in its environment before it
  imports anything (:func:`thread_env`), a forked one sizes torch's pools before
  its first operation starts them; a worker asks the kernel to kill it when its
  parent (the server, or the forkserver, which exits with the server) dies
  (:func:`paramserver.workers.worker.die_with_parent`);
- supervision: a worker that dies (killed, crashed in native code, exited) or
  makes no step for ``hang_timeout`` seconds is restarted with the same rank and
  counter row, up to ``max_restarts`` times in a run; locks and slots it held
  are given back first (:meth:`Store.recover`). A worker that raised a Python
  exception is not restarted (the same code would raise again): the run stops
  with a :class:`WorkerError`;
- signals: from start-up on, SIGTERM and SIGINT stop a run cleanly (results
  written; a second is ignored, a third gives up the results, :class:`Terminated`);
- stop: the ``stop`` control word, a join with a deadline, SIGKILL for a worker
  that did not stop in time; then every segment is unlinked and closed.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .portable import main_without_file
from .store import STATUS, make_private_dir

JOIN_TIMEOUT = 10.0
"""Seconds the workers get to stop on their own before they are killed."""
START_TIMEOUT = 120.0
"""Seconds a worker waits at the start barrier for the others before it starts alone."""
START_GRACE = 10.0
"""Seconds a worker may take to start (spawn, imports, model) before it counts as hung,
when ``hang_timeout`` is shorter: importing a framework on a loaded machine takes
seconds, and ``hang_timeout`` is sized for one step."""

Launch = Callable[[int, int], mp.process.BaseProcess]
"""``launch(rank, life)`` starts worker ``rank``: life 0 at first, n at its n-th restart."""


_EARLY_SIGNALS: list[int] = []
"""SIGTERMs heard by :func:`install_early_signals`' handler before a server's own."""


def install_early_signals() -> None:
    """For a command line, until a server installs its handlers: SIGTERM raises
    KeyboardInterrupt (the command ends at once, like Ctrl-C), SIGUSR1 is ignored rather
    than killing a run that is still loading its data. Main thread only.

    Each SIGTERM is also recorded, and a server that starts after one stops its run at
    once: a KeyboardInterrupt raised in the middle of a third-party import can be
    swallowed there (seen: SIGTERM 0.25 s after launch, inside NumPy's lazy submodule
    imports that scikit-learn triggers; the run then trained on)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _EARLY_SIGNALS.clear()

    def interrupt(signum: int, frame: Any) -> None:
        _EARLY_SIGNALS.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def take_early_signal() -> bool:
    """Whether a SIGTERM reached :func:`install_early_signals`' handler (its
    KeyboardInterrupt lost on the way); the record is cleared. Called by whoever
    installs the handlers of a run, which then stops at once."""
    heard = bool(_EARLY_SIGNALS)
    _EARLY_SIGNALS.clear()
    return heard


class WorkerError(RuntimeError):
    """A worker process died or failed (past its restarts); the run was stopped."""


class Terminated(Exception):
    """A third SIGTERM or SIGINT reached the server while it was stopping: stop at once,
    without results (resources are still released)."""


FORCE_AFTER = 3
"""The signal (SIGTERM or SIGINT) that gives up a clean stop: the first stops the run,
the second is ignored (results and checkpoint are being written), the third forces an exit."""


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Thread-pool sizes for a child about to be spawned: BLAS and OpenMP read these
    at import, which in a spawned child happens before any of our code runs."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


WORKER_PRELOAD = ("paramserver.workers.worker", "paramserver.kernels")
"""What a forkserver imports for every backend that starts its workers from one: the
worker's own modules (numba's among them) take 0.4-0.6 s to import in each worker."""


def worker_context(backend: str, start_method: str = "auto") -> tuple[Any, int]:
    """The multiprocessing context a run's workers start from, and the pid of their parent.

    ``auto`` takes the backend's :attr:`~paramserver.workers.backends.Backend.start_method`.
    Spawn starts a fresh interpreter per worker, which then imports its framework
    (torch: 1.5-2.5 s on a loaded 2-core machine, see benchmarks/startup.py). A forkserver
    imports the framework once, before it serves any worker, and forks each worker from
    that state in milliseconds; it lives until this process exits, so later runs in the
    same session (a notebook, benchmark repeats, tests) start at once. It is safe because
    the forkserver is single-threaded: it is started with one-thread BLAS/OpenMP settings,
    importing torch starts no pool, and each worker pins itself and sizes its pools
    (``configure``) before its first operation creates them. TensorFlow must be spawned: it
    hangs after fork. A context, never ``set_start_method``; the preload list is the
    forkserver's own, fixed before it starts.
    """
    from paramserver.workers.backends import backend_class

    cls = backend_class(backend)
    method = cls.start_method if start_method == "auto" else start_method
    if method == "forkserver" and not cls.forkserver_ok:
        raise ValueError(f"the {backend} backend's workers must be spawned; use start_method 'auto'")
    if method == "spawn":
        return mp.get_context("spawn"), os.getpid()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*cls.preload, *WORKER_PRELOAD])
    _own_multiprocessing_temp_dir()
    # The forkserver reads its environment once, when it starts: one thread for every
    # pool, so that nothing it imports starts threads a forked worker would lack.
    with thread_env(1):
        forkserver.ensure_running()
    return ctx, _forkserver_pid()


def _own_multiprocessing_temp_dir() -> None:
    """Have multiprocessing keep its files (the forkserver's socket) in a private
    directory of this process, ``<tmp>/paramserver-<pid>-<random>``, instead of its own
    ``<tmp>/pymp-<random>``: both are removed when this process exits, but only ours is
    swept (:func:`paramserver.store.sweep_stale`, ``paramserver clean``) after a SIGKILL.
    Nothing changes if multiprocessing made its directory already.

    multiprocessing has no public setter: ``get_temp_dir`` reads the current process's
    ``_config["tempdir"]`` (checked with CPython 3.11-3.13)."""
    config = mp.current_process()._config  # type: ignore[attr-defined]
    if config.get("tempdir") is None:
        path, lock_fd = make_private_dir()
        config["tempdir"] = path
        # multiprocessing's own directory goes in the same finalizer pass, at exit.
        mp.util.Finalize(None, _remove_dir, args=(path, lock_fd), exitpriority=-100)


def _remove_dir(path: str, lock_fd: int) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(lock_fd)


def _forkserver_pid() -> int:
    """The running forkserver's pid: the parent of every worker it forks, which a worker
    watches to die with the server (the forkserver exits when this process does).

    multiprocessing has no public accessor; ``_forkserver._forkserver_pid`` is set by
    ``ensure_running`` (checked with CPython 3.11-3.13)."""
    pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert pid, "forkserver not running"
    return int(pid)


class StartBarrier:
    """Where a run's first workers wait for each other before their first step.

    Two semaphores, not multiprocessing's ``Barrier``: that one is built on its
    ``Condition``, whose ``notify`` waits, without a timeout, for every sleeper it wakes
    to say it woke. A party killed while it waited there (SIGKILL, the OOM killer, the
    restart of a worker taken for hung) never says so, and the next ``abort()`` or last
    arrival blocks for ever: in the server, its whole watch (no supervision, no
    ``max_seconds``, a SIGTERM only noted). Here a party only adds permits and takes
    one, so that no process ever waits for another to do something.

    Pickled to the workers when they are spawned, like any semaphore.
    """

    def __init__(self, ctx: Any, parties: int):
        self.parties = parties
        self._arrived = ctx.Semaphore(0)
        self._open = ctx.Semaphore(0)

    def wait(self, timeout: float | None = None) -> bool:
        """Arrive, and wait until every party has arrived or the barrier was opened
        (True), or for ``timeout`` seconds (False). Each party waits once."""
        self._arrived.release()
        # Each party counts after it arrived, so the last one sees them all. Two arriving
        # together may both open: spare permits are harmless, nobody waits twice.
        if self._arrived.get_value() >= self.parties:
            self.abort()
        return self._open.acquire(True, timeout)

    def abort(self) -> None:
        """Let every party through, those that wait and those still to come; never blocks.
        The server calls it when a party died before it arrived (its restart does not wait)."""
        for _ in range(self.parties):
            self._open.release()


def run_span(rows: list[dict[str, float]]) -> tuple[float, float]:
    """``time.time()`` when the first worker began and when the last one finished
    (now, if one has not finished), from the workers' counter rows."""
    begun = [r["started"] for r in rows if r["started"] > 0]
    ended = [r["finished"] for r in rows if r["finished"] > 0]
    t_first = min(begun) if begun else time.time()
    t_last = max(ended) if len(ended) == len(rows) else time.time()
    return t_first, t_last


class Supervisor:
    """Owns the segments and the worker processes of one run; base of both servers.

    A subclass's ``start()`` creates its segments with :meth:`own` (the
    store as ``self._store``), the policy and the start barrier, then
    hands :meth:`_start_workers` a :data:`Launch` that spawns one worker with
    :meth:`_spawn`; the same function restarts it. ``config`` needs ``workers``,
    ``max_restarts`` and ``hang_timeout``.

    A context manager: segments and processes are released on exit, whatever
    happened.
    """

    _store: Any = None

    def __init__(self, config: Any):
        self.config = config
        self.processes: list[mp.process.BaseProcess] = []
        self.start_barrier: Any = None
        self.restarts = 0
        """Workers restarted in this run."""
        self._segments: list[Any] = []
        self._launch: Launch | None = None
        self._launched: list[float] = []
        """time.time() when each rank's current process was started."""
        self.stop_signal: str | None = None
        """"terminated" or "interrupted" once SIGTERM or SIGINT asked the run to stop."""
        self._signals_heard = 0
        self._closing = False
        self._restore_signals: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Create the segments, the policy and the barrier; start the workers."""
        raise NotImplementedError

    def __enter__(self) -> Any:
        # Handlers first: a signal during start-up (before the watch) must stop the run
        # cleanly, not kill it by the default action with segments half-written.
        self._restore_signals = self._install_signals()
        try:
            self.start()
        except BaseException:
            self.close()
            self._restore_signals()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self._restore_signals()

    @property
    def store(self) -> Any:
        """The run's :class:`~paramserver.store.Store`."""
        assert self._store is not None, "server not started"
        return self._store

    def own(self, segment: Any) -> Any:
        """Record ``segment`` (or the store) as this server's, to unlink and close in
        :meth:`close`; return it."""
        self._segments.append(segment)
        return segment

    def _spawn(
        self, ctx: Any, target: Callable[..., None], args: tuple[Any, ...], *, name: str, threads: int
    ) -> mp.process.BaseProcess:
        """Start one worker process running ``target(*args)``."""
        p = ctx.Process(target=target, args=args, name=name, daemon=True)  # never outlive the server
        with thread_env(threads), main_without_file():
            p.start()
        return p

    def _start_workers(self, launch: Launch) -> None:
        self._launch = launch
        for rank in range(self.config.workers):
            self._launched.append(time.time())
            self.processes.append(launch(rank, 0))

    def close(self) -> None:
        """Stop and join every worker, then unlink the segments. Safe to call twice."""
        self._closing = True
        if self._store is not None:
            self._store.request_stop()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for p in self.processes:
            with contextlib.suppress(ValueError):
                p.close()
        self.processes = []
        segments, self._segments = self._segments, []
        for seg in segments:  # unlink first: it cannot fail on views still in use
            seg.unlink()
        for seg in segments:
            # After an error, a traceback can still hold views (an evaluator, a counter
            # row); the mapping is then released when they are collected.
            with contextlib.suppress(BufferError):
                seg.close()
        self._store = None

    # -- supervision --------------------------------------------------------------

    def _cause_of_death(self, rank: int, now: float) -> tuple[str, bool] | None:
        """Why worker ``rank`` is dead or hung, and whether a restart can help; None if well."""
        p = self.processes[rank]
        row = self.store.counters.row(rank)
        code = p.exitcode
        if code is not None:
            if code == 0 and row.status != STATUS["failed"]:
                return None  # finished its share
            if row.status == STATUS["failed"] or code == 1:
                # Python's exit code for an uncaught exception (also one raised while the
                # worker was starting): the same code would raise again.
                return "raised an exception; its traceback is above", False
            if code < 0:
                return f"killed by {signal.Signals(-code).name}", True
            return f"exit code {code}", True
        timeout = self.config.hang_timeout
        if timeout and row.status == STATUS["running"]:
            silent = now - row.heartbeat
            if silent > timeout:
                return f"hung: no step for {silent:.1f} s, --hang-timeout {timeout:g}", True
        if timeout and row.status == STATUS["starting"]:
            # A worker stuck before its first step (in an import, building its model)
            # would otherwise be waited for at the start barrier or never noticed.
            starting = now - self._launched[rank]
            if starting > max(timeout, START_GRACE):
                return f"hung: not started after {starting:.1f} s, --hang-timeout {timeout:g}", True
        if timeout and row.status == STATUS["ready"]:
            # Waiting at the start barrier for the others is not hanging: that wait ends
            # when they arrive, when the barrier is opened for them, or after START_TIMEOUT.
            waiting = now - row.heartbeat
            if waiting > START_TIMEOUT + max(timeout, START_GRACE):
                return f"hung: at the start barrier for {waiting:.1f} s", True
        return None

    def _supervise(self, *, restart: bool = True) -> None:
        """Restart dead or hung workers, or raise :class:`WorkerError` past the limit."""
        cfg = self.config
        store = self.store
        now = time.time()
        dead: list[int] = []
        for rank in range(len(self.processes)):
            found = self._cause_of_death(rank, now)
            if found is None:
                continue
            cause, restartable = found
            if not restart and cause.startswith("killed"):
                continue  # stopping anyway
            if not restartable or not restart or self.restarts >= cfg.max_restarts:
                limit = f" after {self.restarts} restart(s) (--max-restarts {cfg.max_restarts})"
                raise WorkerError(
                    f"worker {rank} died ({cause}){limit if restartable and restart else ''}. "
                    "The run was stopped."
                )
            self.restarts += 1
            print(
                f"paramserver: worker {rank} died ({cause}); restarting it "
                f"({self.restarts} of at most {cfg.max_restarts})",
                file=sys.stderr,
                flush=True,
            )
            p = self.processes[rank]
            if p.is_alive():  # hung: end it first
                p.kill()
            p.join(JOIN_TIMEOUT)
            dead.append(rank)
            if self.start_barrier is not None:
                # The dead party will never reach the start barrier (its restart does not
                # wait there): release whoever waits, rather than strand them for
                # START_TIMEOUT. Harmless once everyone has passed it, and it never
                # blocks (a StartBarrier), even if the dead one was waiting there.
                self.start_barrier.abort()
        if self.restarts:  # free what the dead held (also locks leaked in a kill's window)
            alive = np.array([p.is_alive() for p in self.processes])
            store.recover(alive, dead)
        for rank in dead:
            row = store.counters.row(rank)
            row.urgent = 0
            row.status = STATUS["starting"]
            row.restarts += 1
            old = self.processes[rank]
            with contextlib.suppress(ValueError):
                old.close()
            assert self._launch is not None
            self._launched[rank] = time.time()
            self.processes[rank] = self._launch(rank, int(row.restarts))

    def check_workers(self) -> None:
        """Restart dead or hung workers as configured; raise :class:`WorkerError` when
        one cannot be (for callers that drive a run themselves, like the benchmarks)."""
        self._supervise()

    def _join_workers(self) -> None:
        """After a run: wait for every worker to stop; raise :class:`WorkerError` if one failed."""
        for p in self.processes:
            p.join(JOIN_TIMEOUT)
        self._supervise(restart=False)

    def worker_rows(self) -> list[dict[str, float]]:
        return self.store.counters.as_dicts()

    def _signal_handlers(self) -> dict[int, Callable[[int, Any], None]]:
        """Handlers besides SIGTERM and SIGINT (a subclass adds SIGUSR1)."""
        return {}

    def _stop_on_signal(self, signum: int, frame: Any) -> None:
        # The handler only notes the request: raising here could land anywhere (in
        # start-up, while joining the workers, half-way through writing the results).
        # The watch loop stops at its next poll; a stop in progress goes on undisturbed.
        self._signals_heard += 1
        if self.stop_signal is None:
            self.stop_signal = "terminated" if signum == signal.SIGTERM else "interrupted"
        elif self._signals_heard >= FORCE_AFTER and not self._closing:
            # The user insists: give up the results, but still release every resource
            # (``close`` runs on the way out; it is never interrupted itself).
            raise Terminated

    def _install_signals(self) -> Callable[[], None]:
        """From the main thread: SIGTERM and SIGINT stop the run (:attr:`stop_signal`),
        :meth:`_signal_handlers` are installed; return a function that puts the previous
        handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        handlers = {signal.SIGTERM: self._stop_on_signal, signal.SIGINT: self._stop_on_signal}
        previous = {
            signum: signal.signal(signum, h) for signum, h in {**handlers, **self._signal_handlers()}.items()
        }
        if take_early_signal():  # a SIGTERM before these handlers whose KeyboardInterrupt was lost
            self._stop_on_signal(signal.SIGTERM, None)

        def restore() -> None:
            for signum, old in previous.items():
                signal.signal(signum, old)
            previous.clear()

        return restore
