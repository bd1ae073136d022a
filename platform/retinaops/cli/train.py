"""`retinaops` commands that run jobs: train, and replay of the MLflow writes a run kept."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="job spec (YAML), e.g. jobs/demo.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")


def _print_outcome(outcome, as_json: bool) -> None:
    from retinanet.layout import METRIC_NAMES
    from retinaops.job.settings import redact

    keys = (*METRIC_NAMES, "latency_ms", "images_per_s", "loss")
    metrics = {k: outcome.metrics[k] for k in keys if k in outcome.metrics}
    summary = {
        "run_id": outcome.run_id,
        "experiment": outcome.experiment,
        "tracking_uri": redact(outcome.tracking_uri),  # its password stays in MLFLOW_TRACKING_URI
        "checkpoint": outcome.checkpoint_uri,
        "model_uri": outcome.model_uri,
        "wall_s": round(outcome.wall_s, 1),
        "metrics": metrics,
        "mlflow_journal": outcome.mlflow_journal,
        "mlflow_refused": _refused(outcome),
    }
    if refused := summary["mlflow_refused"]:
        ops = ", ".join(f"{n} {op}" for op, n in refused["ops"].items())
        print(
            f"retinaops: MLflow refused {refused['writes']} writes of the run ({ops}), not in MLflow: "
            f"kept in {refused['kept_in']}; the first refusal: {refused['reason'][:200]}",
            file=sys.stderr,
        )
    if outcome.mlflow_journal:
        print(
            f"retinaops: MLflow was unreachable; the run's remaining metrics and artifacts are kept in "
            f"{outcome.mlflow_journal}: send them with `retinaops replay {outcome.mlflow_journal}`",
            file=sys.stderr,
        )
    if as_json:
        print(json.dumps(summary))
        return
    print(
        f"finished in {outcome.wall_s:.0f} s: MLflow run {outcome.run_id} in experiment {outcome.experiment!r}"
    )
    for key, value in metrics.items():
        print(f"  {key:<14} {value:.4f}")
    print(f"  checkpoint     {outcome.checkpoint_uri}")
    print(f"  model          {outcome.model_uri}")
    print(f"browse: mlflow ui --backend-store-uri {redact(outcome.tracking_uri)}")


def _refused(outcome) -> dict | None:
    """The run's MLflow writes the server refused, as its journal keeps them (`journal.refused_writes`)."""
    from retinaops.job.settings import Settings
    from retinaops.tracking.journal import refused_writes

    folder = outcome.mlflow_journal or Settings.from_env().journal_root / outcome.run_id
    return refused_writes(folder)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    add_spec_args(parser)
    parser.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the MLflow run RUN (id or name) whose driver died, from its latest checkpoint",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from retinaops.job.settings import Settings
    from retinaops.job.spec import load_spec

    spec = load_spec(args.spec, args.overrides)  # a bad spec fails here, before Ray starts
    from retinaops.run.trainer import run_training

    return _run(lambda: run_training(spec, Settings.from_env(), resume=args.resume), args.json)


def _run(job, as_json: bool) -> int:
    from ray.train import TrainingFailedError

    try:
        outcome = job()
    except TrainingFailedError as exc:
        print(f"retinaops: training failed: {exc}", file=sys.stderr)
        return 1
    _print_outcome(outcome, as_json)
    return 0


def add_replay_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "journal", type=Path, help="a run's journal folder, {RETINAOPS_HOME}/mlflow-journal/<run_id>"
    )
    parser.add_argument("--tracking-uri", help="MLflow to send them to (default: the one the run used)")


def cmd_replay(args: argparse.Namespace) -> int:
    """Send the MLflow writes a run kept while the tracking server was unreachable; 1 if some are still kept."""
    from retinaops.job.settings import redact
    from retinaops.tracking.tracker import replay

    uri, delivered, left = replay(args.journal, args.tracking_uri)
    print(f"sent {delivered} kept writes to {redact(uri)}; {left} still kept in {args.journal}")
    return 1 if left else 0
