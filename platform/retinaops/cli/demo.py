"""`retinaops demo`: the whole story on embedded defaults, each step said as the command that does it.

A sweep with ASHA, its leaderboard with the Pareto front, the champion promoted under a latency budget,
a prediction by the champion, and how to browse it all. The steps call the commands' functions.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from retinaops.cli.model import model_file, predict_images
from retinaops.cli.sweep import promote_trial, show_leaderboard
from retinaops.job.settings import redact

DEMO_SPEC = Path("jobs/demo_sweep.yaml")
DEMO_MODEL = "retinanet-demo"


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
    from retinaops.job.settings import Settings
    from retinaops.job.spec import load_spec
    from retinaops.tracking.registry import CHAMPION
    from retinaops.tracking.tracker import Tracker

    if not args.spec.is_file():
        raise FileNotFoundError(f"{args.spec}: the demo spec is missing (run from the repository root)")
    spec = load_spec(args.spec, args.overrides)  # a bad spec fails here, before Ray starts
    if spec.sweep is None:
        raise ValueError(f"{args.spec}: the demo runs a sweep: expected a sweep section, got none")
    settings = Settings.from_env()
    started = time.monotonic()
    where = f"MLflow {redact(settings.tracking_uri)}; storage {redact(settings.storage_path)}"
    print(f"demo: home {settings.home}; {where}")
    sets = [f"--set={o}" for o in args.overrides]
    _step("sweep", str(args.spec), *sets)
    from retinaops.run.sweep import run_sweep

    outcome = run_sweep(spec, settings)
    name, experiment = outcome.sweep_name, spec.tracking.experiment
    print(f"sweep {name}: {len(outcome.rows)} trials in {outcome.wall_s:.0f} s")
    tracker = Tracker(settings.tracking_uri, settings.artifact_root)
    _step("leaderboard", name, "--experiment", experiment)
    show_leaderboard(tracker, experiment, name)

    budget = args.latency_budget_ms if args.latency_budget_ms is not None else latency_budget(outcome.rows)
    rule = f"max AP where latency_ms <= {budget:g}"
    _step("promote", name, "--experiment", experiment, "--name", DEMO_MODEL, "--rule", rule)
    try:
        promote_trial(tracker, experiment, name, rule, DEMO_MODEL)
    except ValueError as exc:  # e.g. the champion of an earlier demo is better: it stays the champion
        print(f"retinaops: {exc}", file=sys.stderr)
        print(f"demo: {DEMO_MODEL}@{CHAMPION} stays as it was (retinaops promote ... --force replaces it)")
    champion = f"models:/{DEMO_MODEL}@{CHAMPION}"
    images, out = demo_images(spec, 4), settings.home / "demo-prediction"
    _step("predict", "--model", champion, *map(str, images), "--out", str(out), "--score-thresh", "0.3")
    predict_images(model_file(champion), images, out, 0.3, "auto", 4)

    figures = champion_figures(settings, DEMO_MODEL)
    figures |= {"sweep": name, "trials": len(outcome.rows), "sweep_s": round(outcome.wall_s, 1)}
    figures["demo_s"] = round(time.monotonic() - started, 1)
    print(
        f"\ndemo done in {figures['demo_s']:.0f} s: champion {champion} = version {figures['version']} "
        f"(AP {figures['AP']:.4f}, latency {figures['latency_ms']:.1f} ms/image, rule '{figures['rule']}')"
    )
    print(f"browse it all: {browse_command(settings.tracking_uri)}")
    experiment_id = tracker.experiment_id(experiment)
    # MLflow 3.17's UI opens experiments on its GenAI pages until "Model training" is chosen: link past it.
    print(f"then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    if args.json:
        print(json.dumps(figures))
    return 0


def browse_command(tracking_uri: str) -> str:
    """`mlflow ui` on the demo's store, a password in its URI shown as ***."""
    return shlex.join(["mlflow", "ui", "--backend-store-uri", redact(tracking_uri)])


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
    root, split = Path(spec.data.root), spec.data.split("val")
    val = json.loads(split.annotations_path().read_text())
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
