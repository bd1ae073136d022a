"""`retinaops` commands for sweeps and the model registry: sweep, leaderboard, promote, models, rollback, export."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retinaops.cli.train import add_spec_args


def _tracker(one_deadline: bool = True):
    """The tracker of an interactive command: all its MLflow calls end within RETINAOPS_MLFLOW_TIMEOUT."""
    from retinaops.job.settings import Settings
    from retinaops.tracking.tracker import Tracker

    settings = Settings.from_env()
    return Tracker(settings.tracking_uri, str(settings.artifact_root), one_deadline=one_deadline)


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    add_spec_args(parser)
    parser.add_argument(
        "--resume", metavar="NAME", help="resume the sweep of that name: finished trials are not run again"
    )
    parser.add_argument(
        "--allow-failed-trials",
        action="store_true",
        help="exit 0 when some trials failed but not all (default: exit 1 when any failed)",
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from retinaops.job.settings import Settings
    from retinaops.job.spec import load_spec

    spec = load_spec(args.spec, args.overrides)  # a bad spec fails here, before Ray starts
    from retinaops.run.sweep import run_sweep

    outcome = run_sweep(spec, Settings.from_env(), resume=args.resume)
    summary = {
        "sweep": outcome.sweep_name,
        "parent_run_id": outcome.parent_run_id,
        "experiment": outcome.experiment,
        "wall_s": round(outcome.wall_s, 1),
        "num_failed": outcome.num_failed,
        "trials": outcome.rows,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"sweep {outcome.sweep_name} finished in {outcome.wall_s:.0f} s (MLflow run {outcome.parent_run_id})"
        )
        _print_leaderboard(outcome.rows)
    return sweep_exit_code(outcome, allow_failed_trials=args.allow_failed_trials)


def sweep_exit_code(outcome, *, allow_failed_trials: bool = False) -> int:
    """1 when any trial failed (all of them, with allow_failed_trials), saying how many; else 0."""
    failed, total = outcome.num_failed, len(outcome.rows)
    if not failed or (allow_failed_trials and failed < total):
        return 0
    names = ", ".join(r["name"] for r in outcome.rows if r["status"] == "FAILED")
    allowed = "" if allow_failed_trials else "; --allow-failed-trials exits 0 unless all fail"
    print(
        f"retinaops: {failed} of {total} trials of sweep {outcome.sweep_name} failed ({names}){allowed}",
        file=sys.stderr,
    )
    return 1


def _add_experiment_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default="retinanet", help="MLflow experiment (default: retinanet)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_leaderboard_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", nargs="?", help="sweep name or parent run id (default: the latest sweep)")
    _add_experiment_arg(parser)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    return show_leaderboard(_tracker(), args.experiment, args.sweep, as_json=args.json)


def show_leaderboard(tracker, experiment: str, sweep: str | None, *, as_json: bool = False) -> int:
    """Print the leaderboard of a sweep (name or parent run id; None: the latest) of the experiment."""
    from retinaops.tracking.leaderboard import leaderboard
    from retinaops.tracking.registry import find_sweep, sweep_trials

    parent = find_sweep(tracker, experiment, sweep)
    rows = leaderboard(sweep_trials(tracker, parent))
    if as_json:
        print(
            json.dumps({"sweep": parent.info.run_name, "parent_run_id": parent.info.run_id, "trials": rows})
        )
    else:
        print(
            f"sweep {parent.info.run_name} ({parent.info.run_id}), * = Pareto-optimal (max AP, min latency), "
            "AP [95% interval]; tied = interval overlaps the leader's"
        )
        _print_leaderboard(rows)
    return 0


def _print_leaderboard(rows: list[dict]) -> None:
    """One line per trial; a trial stopped by ASHA shows as STOPPED, a failed one with its reason below."""
    from retinanet.ap_interval import interval_text

    def number(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "-"

    def ap(r: dict) -> str:
        if not isinstance(r["AP"], float):
            return "-"
        has_interval = isinstance(r.get("AP_lo"), float) and isinstance(r.get("AP_hi"), float)
        return interval_text(r["AP"], (r["AP_lo"], r["AP_hi"]) if has_interval else None)

    width = max([34, *(len(r["name"]) for r in rows)])
    print(
        f"{'':2}{'trial':<{width}} {'status':<9} {'AP [lo, hi]':<24} {'vs best':<7} {'latency_ms':>10}  params"
    )
    for r in rows:
        params = " ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        mark = "* " if r["pareto"] else "  "
        status = "STOPPED" if r.get("stopped_early") else r["status"]
        versus = "leader" if r.get("leader") else "tied" if r.get("tied") else ""
        print(
            f"{mark}{r['name']:<{width}} {status:<9} {ap(r):<24} {versus:<7} {number(r['latency_ms']):>10}  {params}"
        )
        if r["status"] != "FINISHED" and r.get("error"):
            print(f"{'':4}{r['error'][:160]}")


def add_promote_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", nargs="?", help="sweep name or parent run id (or --run)")
    parser.add_argument(
        "--run", dest="run_id", metavar="RUN_ID", help="promote this one run (e.g. a `retinaops train` run)"
    )
    parser.add_argument(
        "--rule",
        default="max AP",
        help="which trial: 'max|min METRIC [where METRIC <=|<|>=|> NUMBER [and ...]]' (default: 'max AP'); "
        "with --run, what it is held to the champion by",
    )
    parser.add_argument("--name", help="registered model name (default: retinanet-<experiment>)")
    parser.add_argument("--force", action="store_true", help="promote even if the champion is better")
    _add_experiment_arg(parser)


def cmd_promote(args: argparse.Namespace) -> int:
    if (args.sweep is None) == (args.run_id is None):
        raise ValueError("promote: expected a SWEEP or --run RUN_ID, not both and not neither")
    name = args.name or f"retinanet-{args.experiment}"
    return promote_trial(
        _tracker(),
        args.experiment,
        args.sweep,
        args.rule,
        name,
        force=args.force,
        as_json=args.json,
        run=args.run_id,
    )


def promote_trial(
    tracker,
    experiment: str,
    sweep: str | None,
    rule_text: str,
    name: str,
    *,
    force: bool = False,
    as_json: bool = False,
    run: str | None = None,
) -> int:
    """Promote the trial of the sweep that the rule picks (or the one `run`) to `name`@champion and say
    so; ValueError when the rule is bad, no trial qualifies, or the champion is better (unless force)."""
    from retinaops.tracking.registry import CHAMPION, Rule, promote, promote_run

    rule = Rule.parse(rule_text)  # a bad rule fails before anything is read
    if run is not None:
        done = promote_run(tracker, run, name, rule=rule, force=force)
    else:
        done = promote(tracker, experiment, sweep, rule, name, force=force)
    summary = {
        "name": done.name,
        "version": done.version,
        "alias": CHAMPION,
        "trial_run_id": done.trial.run_id,
        "trial": done.trial.name,
        "epoch": done.trial.tags.get("model_epoch"),
        "AP": done.trial.metrics.get("AP"),
        "latency_ms": done.trial.metrics.get("latency_ms"),
        "previous_champion": done.previous,
        "model_uri": f"models:/{done.name}@{CHAMPION}",
    }
    if as_json:
        print(json.dumps(summary))
    else:
        print(f"{done.name} version {done.version} is {CHAMPION} (trial {done.trial.name}, rule '{rule}')")
        if done.previous:
            print(f"  previous champion: version {done.previous} (retinaops rollback {done.name})")
        print(f"  serve: models:/{done.name}@{CHAMPION}")
    return 0


def add_models_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="registered model (default: retinanet-<experiment>)")
    _add_experiment_arg(parser)


def cmd_models(args: argparse.Namespace) -> int:
    from retinaops.tracking.registry import model_versions

    name = args.name or f"retinanet-{args.experiment}"
    versions = model_versions(_tracker(), name)
    if args.json:
        print(json.dumps({"name": name, "versions": versions}))
        return 0
    from retinanet.ap_interval import interval_text

    print(f"{name}")
    print(f"  {'version':>7} {'aliases':<12} {'AP [lo, hi]':<24} {'latency_ms':>10}  trial_run_id")
    for v in versions:
        interval = (v["AP_lo"], v["AP_hi"]) if v["AP_lo"] is not None and v["AP_hi"] is not None else None
        ap = interval_text(v["AP"], interval) if v["AP"] is not None else "-"
        latency = f"{v['latency_ms']:.2f}" if v["latency_ms"] is not None else "-"
        aliases = ",".join(v["aliases"]) or "-"
        print(f"  {v['version']:>7} {aliases:<12} {ap:<24} {latency:>10}  {v['trial_run_id'] or '-'}")
    return 0


def add_rollback_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name")
    parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_rollback(args: argparse.Namespace) -> int:
    from retinaops.tracking.registry import CHAMPION, rollback

    was, now = rollback(_tracker(), args.name)
    if args.json:
        print(json.dumps({"name": args.name, "from": was, "to": now}))
    else:
        print(f"{args.name}@{CHAMPION}: version {was} -> version {now}", file=sys.stdout)
    return 0


def resolve_model(uri: str, dst: str | Path) -> Path:
    """A local model file for `--model`: a path as it is, a models:/ or runs:/ URI downloaded into dst."""
    from retinaops.tracking.registry import local_model_file

    return local_model_file(_tracker(), uri, dst)


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model or a model file",
    )
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="only onnx (default)")
    parser.add_argument(
        "--out", type=Path, help="file to write (default: NAME-vVERSION.onnx, or the model file's name)"
    )
    parser.add_argument(
        "--with-postprocess",
        action="store_true",
        help="include the post-processing (anchors, decoding, score threshold, NMS): the graph gives detections",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_export(args: argparse.Namespace) -> int:
    """Export, check against PyTorch with onnxruntime, and log on the model version when there is one."""
    import tempfile
    import time

    from retinanet import RetinaNet
    from retinaops.tracking.export import RTOL, check_detections, check_onnx, export_onnx, log_export
    from retinaops.tracking.registry import local_model_file, model_version_of

    # A file needs no MLflow; a models:/ or runs:/ URI is downloaded, a registry version logged on.
    tracker = _tracker(one_deadline=False) if args.model.startswith(("models:/", "runs:/")) else None
    version = model_version_of(tracker, args.model) if tracker is not None else None
    if args.out is not None:
        out = args.out
    elif version is not None:
        out = Path(f"{version.name}-v{version.version}.onnx")
    else:
        out = Path(Path(args.model.rstrip("/")).name).with_suffix(".onnx")
    with tempfile.TemporaryDirectory() as tmp:
        model = RetinaNet.load(local_model_file(tracker, args.model, tmp)).eval()
    started = time.perf_counter()
    export_onnx(model, out, postprocess=args.with_postprocess)
    export_s = time.perf_counter() - started
    if args.with_postprocess:
        check = check_detections(model, out)
        inputs = {
            "images": "(N, 3, H, W) float32, preprocessed",
            "image_sizes": "(N, 2) int64, resized (height, width)",
            "original_sizes": "(N, 2) int64, original (height, width)",
        }
        outputs = {"boxes": "(K, 4)", "scores": "(K,)", "labels": "(K,)", "batch_index": "(K,)"}
    else:
        check = check_onnx(model, out)
        inputs = {"images": "(N, 3, H, W) float32, preprocessed"}
        outputs = {"cls_logits": "(N, A, C)", "bbox_regression": "(N, A, 4)"}
    summary = {
        "model": args.model,
        "onnx": str(out),
        "postprocess": args.with_postprocess,
        "inputs": inputs,
        "outputs": outputs,
        "export_s": round(export_s, 1),
        "max_abs_diff": check.max_abs_diff,
        "rel_diff": check.rel_diff,
        "tolerance": RTOL,
        "checked_shapes": check.shapes,
        "detections": check.detections or None,
        "logged": None,
        "onnx_model": None,
    }
    if not check.ok:
        why = check.mismatch or (
            f"ONNX outputs differ from PyTorch's by {check.max_abs_diff:.3g} "
            f"({check.rel_diff:.3g} of the largest output, expected <= {RTOL:g})"
        )
        print(f"retinaops: {out}: {why}; not logged", file=sys.stderr)
        return 1
    if version is not None:
        tags = {"export.onnx.max_abs_diff": f"{check.max_abs_diff:.3g}"}
        summary["logged"], summary["onnx_model"] = log_export(tracker, version, out, tags)
    if args.json:
        print(json.dumps(summary))
        return 0
    signature = ", ".join(f"{k} {v}" for k, v in outputs.items())
    print(f"wrote {out} in {export_s:.0f} s: {', '.join(inputs)} -> {signature}")
    print(
        f"  onnxruntime vs PyTorch on {check.shapes}: max abs diff {check.max_abs_diff:.3g} ({check.rel_diff:.2g} relative)"
        + (f", detections {check.detections} alike" if check.detections else "")
    )
    if summary["logged"]:
        print(f"  logged on {version.name} version {version.version}: {summary['logged']}")
        print(f"  mlflow.onnx.load_model({summary['onnx_model']!r})")
    return 0
