"""`retinaops` commands that run jobs: train, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_SPEC = Path("jobs/demo.yaml")


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
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "latency_ms", "images_per_s", "loss")
    metrics = {k: outcome.metrics[k] for k in keys if k in outcome.metrics}
    summary = {
        "run_id": outcome.run_id,
        "experiment": outcome.experiment,
        "tracking_uri": outcome.tracking_uri,
        "checkpoint": outcome.checkpoint_uri,
        "model_uri": outcome.model_uri,
        "wall_s": round(outcome.wall_s, 1),
        "metrics": metrics,
    }
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
    print(f"browse: mlflow ui --backend-store-uri {outcome.tracking_uri}")


def cmd_train(args: argparse.Namespace) -> int:
    from retinaops.settings import Settings
    from retinaops.spec import load_spec

    spec = load_spec(args.spec, args.overrides)  # a bad spec fails here, before Ray starts
    from retinaops.trainer import run_training

    return _run(lambda: run_training(spec, Settings.from_env()), args.json)


def _run(job, as_json: bool) -> int:
    from ray.train import TrainingFailedError

    try:
        outcome = job()
    except TrainingFailedError as exc:
        print(f"retinaops: training failed: {exc}", file=sys.stderr)
        return 1
    _print_outcome(outcome, as_json)
    return 0


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", type=Path, default=DEMO_SPEC, help=f"the demo's spec (default {DEMO_SPEC})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults: local Ray, MLflow on SQLite, local storage, generated data."""
    from retinaops.settings import Settings
    from retinaops.spec import load_spec

    if not args.spec.is_file():
        raise FileNotFoundError(f"{args.spec}: the demo spec is missing (run from the repository root)")
    spec = load_spec(args.spec, args.overrides)
    settings = Settings.from_env()
    print(f"demo: home {settings.home}; MLflow {settings.tracking_uri}; storage {settings.storage_path}")
    started = time.monotonic()
    from retinaops.trainer import run_training

    code = _run(lambda: run_training(spec, settings), args.json)
    logger.info("demo finished in %.0f s", time.monotonic() - started)
    return code
