"""`retinaops` commands that run jobs: train, demo (a sweep, its leaderboard, promotion and a prediction)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_SPEC = Path("jobs/demo_sweep.yaml")
DEMO_MODEL = "retinanet-demo"


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
        "mlflow_journal": outcome.mlflow_journal,
    }
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
    print(f"browse: mlflow ui --backend-store-uri {outcome.tracking_uri}")


def cmd_train(args: argparse.Namespace) -> int:
    from retinaops.job.settings import Settings
    from retinaops.job.spec import load_spec

    spec = load_spec(args.spec, args.overrides)  # a bad spec fails here, before Ray starts
    from retinaops.run.trainer import run_training

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
    parser.add_argument(
        "--spec", type=Path, default=DEMO_SPEC, help=f"the demo's sweep (default {DEMO_SPEC})"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--latency-budget-ms",
        type=float,
        help="promote the best AP under this latency (default: the median trial's latency)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object at the end")


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole story on embedded defaults (local Ray, MLflow on SQLite, local storage, generated data):
    a sweep with ASHA, its leaderboard with the Pareto front, the champion promoted under a latency
    budget, a prediction by the champion, and how to browse it all. Each step shows its command."""
    from retinaops.cli import main
    from retinaops.job.settings import Settings
    from retinaops.job.spec import load_spec
    from retinaops.tracking.registry import CHAMPION

    if not args.spec.is_file():
        raise FileNotFoundError(f"{args.spec}: the demo spec is missing (run from the repository root)")
    spec = load_spec(args.spec, args.overrides)  # a bad spec fails here, before Ray starts
    if spec.sweep is None:
        raise ValueError(f"{args.spec}: the demo runs a sweep: expected a sweep section, got none")
    settings = Settings.from_env()
    started = time.monotonic()
    print(f"demo: home {settings.home}; MLflow {settings.tracking_uri}; storage {settings.storage_path}")
    sets = [f"--set={o}" for o in args.overrides]
    _step("sweep", str(args.spec), *sets)
    from retinaops.run.sweep import run_sweep

    outcome = run_sweep(spec, settings)
    name, experiment = outcome.sweep_name, spec.tracking.experiment
    print(f"sweep {name}: {len(outcome.rows)} trials in {outcome.wall_s:.0f} s")
    _step("leaderboard", name, "--experiment", experiment)
    main(["leaderboard", name, "--experiment", experiment])

    budget = args.latency_budget_ms if args.latency_budget_ms is not None else latency_budget(outcome.rows)
    promote = ["promote", name, "--experiment", experiment, "--name", DEMO_MODEL]
    promote += ["--rule", f"max AP where latency_ms <= {budget:g}"]
    _step(*promote)
    if main(promote) != 0:  # e.g. the champion of an earlier demo is better: it stays the champion
        print(f"demo: {DEMO_MODEL}@{CHAMPION} stays as it was (retinaops promote ... --force replaces it)")
    champion = f"models:/{DEMO_MODEL}@{CHAMPION}"
    images = [str(p) for p in demo_images(spec, 4)]
    predict = ["predict", "--model", champion, *images, "--out", str(settings.home / "demo-prediction")]
    predict += ["--score-thresh", "0.3"]
    _step(*predict)
    code = main(predict)

    figures = champion_figures(settings, DEMO_MODEL)
    figures |= {"sweep": name, "trials": len(outcome.rows), "sweep_s": round(outcome.wall_s, 1)}
    figures["demo_s"] = round(time.monotonic() - started, 1)
    print(
        f"\ndemo done in {figures['demo_s']:.0f} s: champion {champion} = version {figures['version']} "
        f"(AP {figures['AP']:.4f}, latency {figures['latency_ms']:.1f} ms/image, rule '{figures['rule']}')"
    )
    print(f"browse it all: {shlex.join(['mlflow', 'ui', '--backend-store-uri', settings.tracking_uri])}")
    if args.json:
        print(json.dumps(figures))
    return code


def _step(*command: str) -> None:
    print(f"\n$ {shlex.join(['retinaops', *command])}", flush=True)


def latency_budget(rows: list[dict]) -> float:
    """The upper median of the trials' latencies (ms, rounded up to 0.1): at least half of the trials
    with a model fall within it (both of two, three of four), so the rule trades latency for AP."""
    latencies = sorted(
        r["latency_ms"] for r in rows if r["status"] == "FINISHED" and r.get("model_uri") and r["latency_ms"]
    )
    if not latencies:
        raise ValueError("no trial of the sweep finished with a model and a latency: nothing to promote")
    return math.ceil(latencies[len(latencies) // 2] * 10) / 10


def demo_images(spec, count: int) -> list[Path]:
    """The first `count` validation images of the demo's data that hold objects."""
    root = Path(spec.data.root)
    val = json.loads((root / "val.json").read_text())
    with_objects = {a["image_id"] for a in val["annotations"]}
    return [root / im["file_name"] for im in val["images"] if im["id"] in with_objects][:count]


def champion_figures(settings, name: str) -> dict:
    """Version, AP, latency and rule of the model's champion, as the registry holds them."""
    from retinaops.tracking.registry import CHAMPION
    from retinaops.tracking.tracker import Tracker

    version = Tracker(settings.tracking_uri).model_version_by_alias(name, CHAMPION)
    if version is None:
        raise ValueError(f"{name}: no version holds the {CHAMPION!r} alias")
    tags = version.tags
    return {
        "model": f"models:/{name}@{CHAMPION}",
        "version": version.version,
        "AP": float(tags.get("AP", "nan")),
        "latency_ms": float(tags.get("latency_ms", "nan")),
        "rule": tags.get("rule", ""),
    }


def add_replay_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "journal", type=Path, help="a run's journal folder, {RETINAOPS_HOME}/mlflow-journal/<run_id>"
    )
    parser.add_argument("--tracking-uri", help="MLflow to send them to (default: the one the run used)")


def cmd_replay(args: argparse.Namespace) -> int:
    """Send the MLflow writes a run kept while the tracking server was unreachable; 1 if some are still kept."""
    from retinaops.tracking.tracker import replay

    uri, delivered, left = replay(args.journal, args.tracking_uri)
    print(f"sent {delivered} kept writes to {uri}; {left} still kept in {args.journal}")
    return 1 if left else 0
