"""The `retinaops` command line: thin commands over `retinanet` and the platform modules.

Each command is one `cmd_*` function taking the parsed arguments and returning an exit code, plus one
`add_*_args` function declaring its flags; `COMMANDS` at the bottom is the whole table. Heavy imports
(torch, the model) happen inside the commands so that `retinaops --help` stays fast.

Exit codes: 0 success, 1 the command ran and found problems (e.g. `data check --strict`, a sweep
with failed trials) or failed unexpectedly, 2 a usage or input error, or a service (MLflow) that did not
answer or refused. Every error is one `retinaops: error: ...` line; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

PROG = "retinaops"

from retinaops.cli import bench as b  # noqa: E402
from retinaops.cli import demo as d  # noqa: E402
from retinaops.cli import jobs as j  # noqa: E402
from retinaops.cli import model as m  # noqa: E402
from retinaops.cli import sweep as s  # noqa: E402
from retinaops.cli import train as t  # noqa: E402


@dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# A group (a dict) holds subcommands: `retinaops data synth`. Add a command here and nowhere else.
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "data": {
        "synth": Command(
            "write a synthetic COCO-format shapes dataset", m.add_data_synth_args, m.cmd_data_synth
        ),
        "check": Command(
            "validate a COCO-format dataset and report problems", m.add_data_check_args, m.cmd_data_check
        ),
    },
    "evaluate": Command("COCO box AP of a checkpoint on a dataset", m.add_evaluate_args, m.cmd_evaluate),
    "predict": Command("draw a checkpoint's detections on images", m.add_predict_args, m.cmd_predict),
    "latency": Command("time a checkpoint's forward pass per image", m.add_latency_args, m.cmd_latency),
    "train": Command(
        "train a detector on Ray from a job spec, tracked in MLflow", t.add_train_args, t.cmd_train
    ),
    "demo": Command(
        "the main job on embedded defaults (local Ray, MLflow, storage, data)", d.add_demo_args, d.cmd_demo
    ),
    "replay": Command(
        "send MLflow writes a run kept while the server was down", t.add_replay_args, t.cmd_replay
    ),
    "sweep": Command(
        "a Ray Tune sweep of a job spec, every trial an MLflow run", s.add_sweep_args, s.cmd_sweep
    ),
    "leaderboard": Command(
        "a sweep's trials by AP with latency, Pareto front marked", s.add_leaderboard_args, s.cmd_leaderboard
    ),
    "promote": Command(
        "register a sweep's best trial by a rule and make it the champion", s.add_promote_args, s.cmd_promote
    ),
    "models": Command(
        "versions of a registered model with aliases and metrics", s.add_models_args, s.cmd_models
    ),
    "rollback": Command(
        "move the champion alias back to the previous champion", s.add_rollback_args, s.cmd_rollback
    ),
    "bench": Command(
        "the side-by-side benchmarks against torchvision (as make bench)", b.add_bench_args, b.cmd_bench
    ),
    "export": Command(
        "export a model to ONNX, checked against PyTorch with onnxruntime", s.add_export_args, s.cmd_export
    ),
    "submit": Command(
        "submit a job spec to a Ray cluster through its Jobs API", j.add_submit_args, j.cmd_submit
    ),
    "jobs": {
        "list": Command("jobs on a Ray cluster, newest first", j.add_jobs_list_args, j.cmd_jobs_list),
        "status": Command("a job's status, times and entrypoint", j.add_jobs_status_args, j.cmd_jobs_status),
        "logs": Command("a job's log (--follow: until it ends)", j.add_jobs_logs_args, j.cmd_jobs_logs),
        "stop": Command("stop a running job", j.add_job_args, j.cmd_jobs_stop),
    },
    "stack": {
        "up": Command(
            "start the local stack: S3, MLflow, a two-node Ray cluster", j.add_stack_up_args, j.cmd_stack_up
        ),
        "down": Command("stop what `stack up` started", j.add_stack_dir_args, j.cmd_stack_down),
        "env": Command("print the local stack's export lines", j.add_stack_dir_args, j.cmd_stack_env),
    },
}

GROUP_HELP = {
    "data": "make and check datasets",
    "jobs": "jobs on a Ray cluster (Jobs API)",
    "stack": "the local service stack on 127.0.0.1",
}


def build_parser() -> argparse.ArgumentParser:
    from retinaops import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Train, evaluate and ship RetinaNet detectors.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            _add_command(commands, name, entry)
            continue
        group = commands.add_parser(name, help=GROUP_HELP.get(name), description=GROUP_HELP.get(name))
        subcommands = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        for sub_name, command in entry.items():
            _add_command(subcommands, sub_name, command)
    return parser


def _add_command(subparsers: Any, name: str, command: Command) -> None:
    parser = subparsers.add_parser(name, help=command.help, description=command.help)
    command.add_args(parser)
    parser.set_defaults(run=command.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `retinaops` command; returns the exit code instead of exiting (the console script exits)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from retinaops.job.settings import RedactingFilter, redact

    for handler in logging.getLogger().handlers:  # no password of a URI in a log line, whoever logs it
        handler.addFilter(RedactingFilter())
    if not os.environ.get("RAY_ADDRESS"):
        # An embedded Ray binds 127.0.0.1 only with this set before ray is first imported (it is read
        # into ray_constants then; no ray.init argument replaces it). The entry point of the process sets
        # it, before any command imports ray; library modules never touch the environment.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:  # MLflow's errors name the URL they failed on, a password in it included
            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        expected = isinstance(exc, (ValueError, OSError)) or _mlflow_error(exc) is not None
        text = _describe(exc) if expected else f"unexpected {type(exc).__name__}: {exc} (-v shows where)"
        print(f"{PROG}: error: {redact(_one_line(text))}", file=sys.stderr)
        return 2 if expected else 1


def _describe(exc: BaseException) -> str:
    mlflow_error = _mlflow_error(exc)
    if mlflow_error is not None:
        status = mlflow_error.get_http_status_code()
        from mlflow.exceptions import RestException

        hint = ""
        if status in (401, 403):
            hint = (
                " (the server refused the credentials: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
                "or MLFLOW_TRACKING_TOKEN)"
            )
        elif status == 404 and not isinstance(mlflow_error, RestException):  # not an answer of MLflow's API
            hint = " (no MLflow API there: is MLFLOW_TRACKING_URI right?)"
        return f"MLflow answered {status}: {mlflow_error.message}{hint}"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _mlflow_error(exc: BaseException):
    """exc as an MlflowException (RestException included), or None; mlflow is imported only if it was."""
    if "mlflow" not in sys.modules:
        return None
    from mlflow.exceptions import MlflowException

    return exc if isinstance(exc, MlflowException) else None


def _one_line(text: str, limit: int = 1000) -> str:
    """Whitespace (newlines of a server's HTML page, say) folded to single spaces, and cut at limit."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
