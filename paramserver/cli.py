"""The command line: ``paramserver train | rl | inspect | clean | bench``.

    paramserver train --workers 2 --policy po3          # digits, torch MLP
    paramserver inspect                                 # live segments
    paramserver inspect psrv_1234_0123abcd              # layout and counters of one
    paramserver clean                                   # remove segments of dead runs
    paramserver report runs/<run>                       # PNG plots of a run
    paramserver bench --quick                           # benchmark suites (paramserver.benchmarks)
    paramserver rl --algo a3c --env CartPole-v1         # reinforcement learning (paramserver.rl)
    paramserver rl --evaluate runs/<run>/policy.safetensors      # a saved policy's mean return

Options of ``train`` are generated from :class:`paramserver.config.TrainJob`,
one per field, and those of ``rl`` from :class:`paramserver.rl.RLConfig`.
A bad value is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import time
import typing
import warnings
from collections.abc import Sequence
from typing import Any

from .config import TrainJob
from .metrics import CollapseWarning

USER_ERRNOS = frozenset({
    errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
    errno.ENAMETOOLONG, errno.EINVAL, errno.ENOENT,
})  # fmt: skip
"""OS errors a user's input or machine causes (and can fix): one line, exit 2."""


class UsageError(Exception):
    """A user's mistake on the command line: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": f.name, "default": f.default}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, **kw)
            continue
        if typing.get_origin(kind) in (
            typing.Union,
            getattr(__import__("types"), "UnionType", None),
        ):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        default = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=kind, help=help_text + default, metavar=f.name.upper(), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paramserver", description="Hogwild-style shared-memory parameter server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model with N workers sharing its parameters")
    _add_dataclass_options(train, TrainJob)
    inspect = sub.add_parser("inspect", help="show the layout and live counters of a running server")
    inspect.add_argument("name", nargs="?", help="segment name (omit to list live segments)")
    sub.add_parser("clean", help="remove segments left behind by runs whose server is dead")
    report = sub.add_parser("report", help="draw PNG plots of a finished (or running) run from its directory")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run's directory (runs/<time>-...)")
    report.add_argument("--out-dir", default=None, help="where to write the PNGs (default: RUN_DIR/report)")
    from paramserver.benchmarks.common import BenchConfig

    from .rl import RLConfig

    rl = sub.add_parser("rl", help="train an agent on a gymnasium environment (a3c or dqn) with N workers")
    _add_dataclass_options(rl, RLConfig)
    rl.add_argument(
        "--evaluate", metavar="PATH", help="run the policy saved at PATH for --eval-episodes episodes"
    )
    bench = sub.add_parser("bench", help="benchmark suites against the peers, side by side")
    _add_dataclass_options(bench, BenchConfig)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from . import data as data_mod
    from .api import train
    from .models import build_model

    job = TrainJob(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainJob)})
    from paramserver.workers.backends import backend_class

    try:
        backend_class(job.backend).seed_initial(job.seed)  # imports the framework; the initial parameters
    except ImportError as e:
        raise UsageError(f"--backend {job.backend}: {e}") from None
    task = None if job.task == "auto" else job.task
    dataset = data_mod.load(
        job.data, test_fraction=job.test_fraction, seed=job.seed, task=task, targets=job.targets
    )
    if isinstance(dataset.x_train, dict):
        raise UsageError(
            "the command line trains models of one input array; named inputs need the Python API"
        )
    csr = isinstance(dataset.x_train, data_mod.CSR)
    if csr != (job.model == "logreg"):
        raise UsageError(
            f"the data is sparse rows (CSR); --model {job.model} takes dense arrays: use --model logreg"
            if csr
            else "--model logreg takes sparse rows (a CSR .npz or an svmlight file)"
        )
    ids = not csr and dataset.x_train.dtype.kind in "iu"  # token ids: the embedding models need their range
    tokens = int(max(dataset.x_train.max(), dataset.x_test.max())) + 1 if ids else 0
    model = build_model(
        job.backend, job.model, dataset.input_shape, dataset.outputs, job.hidden, tokens, dataset.task
    )
    banner = (
        f"paramserver: {dataset.describe()}; {job.backend} {job.model}; "
        f"{job.workers} workers, {job.policy}, {job.optimizer} lr {job.lr}"
    )
    said = False

    def announce(_figures: dict[str, Any]) -> None:
        # At the server's first progress call, once the run has started: an error found
        # on the way (a checkpoint that does not fit, an unwritable directory) stays the
        # only line.
        nonlocal said
        if not said:
            said = True
            print(banner, file=sys.stderr, flush=True)

    config = dataclasses.replace(job)  # a TrainJob is a TrainConfig
    with warnings.catch_warnings():  # the summary below says it, once
        warnings.simplefilter("ignore", CollapseWarning)
        result = train(model, dataset, config, callback=None if job.cluster else announce)
    if not job.cluster:
        announce({})  # a run too short for a progress call
    print(result.summary())
    return 1 if result.stop_reason == "diverged" else 0  # no usable model


def cmd_rl(args: argparse.Namespace) -> int:
    from .rl import RLConfig, evaluate, inspect_env, train_rl

    config = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    try:
        import gymnasium  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"paramserver rl needs PyTorch and gymnasium ({e}): pip install 'paramserver[torch,rl]'"
        ) from None
    if args.evaluate:
        # Without --env, the env it was trained on (the option's default is not a choice).
        given = any(a == "--env" or a.startswith("--env=") for a in args.argv)
        env = config.env if given or config.env != RLConfig.env else None
        print(evaluate(args.evaluate, config.eval_episodes, env=env, seed=config.seed).summary())
        return 0
    inspect_env(config.env, config.algo)  # a bad environment is one line, before any banner
    print(f"paramserver: {config.algo} on {config.env}; {config.workers} workers x "
          f"{config.envs_per_worker} envs, {config.policy}, {config.optimizer} lr {config.lr}",
          file=sys.stderr)  # fmt: skip
    result = train_rl(config)
    print(result.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .store import Counters, ShmStore, list_segments, status_name

    if not args.name:
        segs = list_segments()
        if not segs:
            print("no paramserver segments in /dev/shm")
        for name, pid, alive in segs:
            print(
                f"{name}  creator pid {pid}  {'running' if alive else 'DEAD (paramserver clean removes it)'}"
            )
        return 0
    store = ShmStore.attach(args.name, kind=None)
    try:
        meta = store.meta
        print(f"segment {store.name}: {meta.get('kind')}, {store.size:,} bytes")
        if meta.get("kind") != "params":
            print(store.layout.describe())
            return 0
        layout = store.model_layout
        print(f"model: {layout.num_params:,} parameters in {len(layout)} tensors, "
              f"fingerprint {layout.fingerprint[:16]}, backend {meta.get('backend')}")  # fmt: skip
        print(layout.describe())
        cfg = meta.get("config", {})
        print(f"\npolicy {cfg.get('policy')}, optimizer {cfg.get('optimizer')}, lr {cfg.get('lr')}, "
              f"state slots {store.state.shape[0]}; global version {store.version()}")  # fmt: skip
        columns = ("status", "steps", "samples", "epoch", "loss", "stale mean", "stale max", "lr",
                   "nonfinite", "restarts", "heartbeat", "pid")  # fmt: skip
        print("\nworker " + " ".join(f"{c:>11}" for c in columns))
        now = time.time()
        rows = Counters(store["counters"].copy(), store.base_version)
        stale = rows.mean_staleness()
        for rank, v in enumerate(rows.as_dicts()):
            cells = [
                status_name(v["status"]), f"{int(v['steps'])}", f"{int(v['samples'])}", f"{int(v['epoch'])}",
                f"{v['loss']:.4f}", f"{stale[rank]:.2f}",
                f"{int(v['staleness_max'])}", f"{v['lr']:.3g}", f"{int(v['nonfinite'])}",
                f"{int(v['restarts'])}", f"{max(0.0, now - v['heartbeat']):.1f}s" if v["heartbeat"] else "-",
                f"{int(v['pid'])}",
            ]  # fmt: skip
            print(f"{rank:>6} " + " ".join(f"{c:>11}" for c in cells))
        return 0
    finally:
        store.close()


def cmd_clean(args: argparse.Namespace) -> int:
    from .store import list_segments, sweep_stale

    removed = sweep_stale()
    for name in removed:
        print(f"removed {name}")
    live = [n for n, _, alive in list_segments() if alive]
    print(f"removed {len(removed)} stale item(s); {len(live)} segment(s) of live runs left alone")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report_command

    return report_command(args.run_dir, args.out_dir)


def cmd_bench(args: argparse.Namespace) -> int:
    from paramserver.benchmarks.common import BenchConfig
    from paramserver.benchmarks.runner import run

    run(BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}))
    return 0


COMMANDS = {
    "train": cmd_train, "rl": cmd_rl, "inspect": cmd_inspect, "clean": cmd_clean, "report": cmd_report,
    "bench": cmd_bench,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from .server import WorkerError
    from .store import SegmentError
    from .supervise import Terminated, install_early_signals

    parser = build_parser()
    try:
        # Until a server installs its own handlers (it stops cleanly on SIGTERM and
        # writes a checkpoint on SIGUSR1): SIGTERM ends like Ctrl-C, SIGUSR1 is ignored
        # rather than killing a run that is still loading its data.
        install_early_signals()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # which options were given
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("paramserver: interrupted", file=sys.stderr)
        # CPython (3.11-3.13) marks a KeyboardInterrupt that leaves exec() of a string
        # as unhandled (scipy's imports run such code), and then ends the process by
        # SIGINT although it was handled here; an exec of a string resets that mark.
        exec("")
        return 130
    except Terminated:
        print("paramserver: stopped at once by a repeated signal; no results written", file=sys.stderr)
        return 143
    except (UsageError, ValueError, TypeError, SegmentError) as e:
        print(f"paramserver: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        # Out of shared memory, a path the user named that cannot be written: the
        # message says what to do; a traceback would only hide it.
        print(f"paramserver: error: {e.strerror if e.filename is None else e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"paramserver: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
