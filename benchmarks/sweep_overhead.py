"""Sweep overhead (issue #17): a `retinaops sweep`'s wall time split into training and overhead.

    .venv/bin/python -m benchmarks.sweep_overhead --variants     (make bench-sweep)

Runs the demo's sweep (jobs/demo_sweep.yaml, shortened to --epochs, one trial at a time so that there is a
"one trial's end to the next trial's first step") through the real CLI on embedded Ray and MLflow, and reads
back from MLflow the parent and child runs' start and end times and each epoch's spans (`time_*_s`: README,
"Train on Ray"). Training is the trials' data + step + sync; everything else in the command's wall time is
overhead. With --variants the sweep runs twice: "before" evaluates every epoch
(sweep.scheduler.eval_at_rungs=false), "after" only at ASHA's rungs and the last epoch (the default).
Writes --out (markdown) and --raw (the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.e2e import TINY
from retinaops.run.spans import SPANS

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"before": "false", "after": "true"}  # sweep.scheduler.eval_at_rungs
# The overhead of a sweep, in order of time; with one trial at a time they and training add up to its wall.
OVERHEAD = (
    ("first", "to the first trial: imports, spec and data checks, parent run, Ray and Tune start"),
    ("setup", "trial set-up: child run, params, trainer (child run start to the TorchTrainer's start)"),
    ("startup", "start-up: Ray Train controller and worker, model, data (epoch 0's remainder)"),
    ("eval", "COCO evaluation and the latency measurement"),
    ("save", "writing checkpoints"),
    ("upload", "checkpoint upload and reporting (later epochs' remainder)"),
    ("wrapup", "trial wrap-up: model logging, evaluation plots, child run end"),
    ("between", "between trials: Tune ends one trial's actor and starts the next's"),
    ("last", "after the last trial: settling, leaderboard, Pareto plot, parent run end, Ray shutdown"),
)

# What the issue also named, and why it is not cut here (read in Ray 2.60's source).
NOT_CUT = [
    "What was not cut:",
    "",
    "- **Warm worker processes.** Each trial's `TorchTrainer.fit()` starts its own Train controller actor and "
    "worker group, and ends them: the workers are actors whose processes go with them "
    "(ray/train/v2/_internal/execution/worker_group/worker_group.py: `shutdown`, `ray.kill`). No Ray option "
    "hands one fit's workers to the next. Tune's `reuse_actors` (ray/tune/tune_config.py) reuses only the "
    "trial's own actor (here the zero-CPU trial function, `reset_config` in "
    "ray/tune/trainable/function_trainable.py), a part of **between**, not the start-up.",
    "- **Data cached once per node.** Already so: the driver writes each split's validated description once "
    "into the data cache under its digest (retinaops/job/data.py, `write_validated`), workers read it without "
    "checking again (`validated_coco`), and s3:// images are copied once per node under a lock "
    "(retinaops/s3data.py, `materialize`). A trial's worker still builds its dataset in a new process.",
    "",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.sweep_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=str(REPO / "jobs" / "demo_sweep.yaml"), help="sweep spec")
    parser.add_argument("--epochs", type=int, default=4, help="train.epochs of each trial (default: 4)")
    parser.add_argument(
        "--steps", type=int, help="train.max_steps_per_epoch of each trial (default: the spec's, all)"
    )
    parser.add_argument(
        "--variants", action="store_true", help="before (eval every epoch) and after (at rungs)"
    )
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny set: checks the script")
    parser.add_argument("--work", help="folder for the data and the sweeps (default: a temporary one)")
    parser.add_argument("--out", help="the report (default: benchmarks/SWEEP.md; --tiny: in --work)")
    parser.add_argument("--raw", help="the numbers (default: sweep_overhead.json beside --out)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs: expected a whole number >= 1, got {args.epochs}")
    return args


def overrides(args: argparse.Namespace, work: Path) -> list[str]:
    sets = [f"data.root={work / 'data'}", f"train.epochs={args.epochs}", "sweep.max_concurrent=1"]
    sets += [f"train.max_steps_per_epoch={args.steps}"] if args.steps else []
    return sets + (TINY if args.tiny else [])


def run_sweep(args: argparse.Namespace, work: Path, variant: str | None) -> dict[str, Any]:
    """One `retinaops sweep --json`: the command's start, end and wall time, its parent run and trials."""
    from mlflow import MlflowClient

    home = work / f"home-{variant or 'sweep'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"RETINAOPS_HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    sets = overrides(args, work) + ([f"sweep.scheduler.eval_at_rungs={VARIANTS[variant]}"] if variant else [])
    command = [sys.executable, "-m", "retinaops.cli", "sweep", args.spec, "--json"]
    command += [arg for value in sets for arg in ("--set", value)]
    start, started = time.time(), time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(
            f"benchmarks.sweep_overhead: retinaops sweep ({variant}) failed:\n{done.stderr[-3000:]}"
        )
    outcome = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    return {
        "variant": variant or "sweep",
        "command_start": start,
        "command_end": start + wall,
        "command_wall_s": wall,
        **read_sweep(client, outcome["parent_run_id"]),
    }


def read_sweep(client, parent_run_id: str) -> dict[str, Any]:
    """The parent run's and each child run's times (s since the epoch), and each trial's epochs."""
    from retinaops.tracking.tracker import PARENT_TAG

    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
    )
    keys = [f"time_{name}_s" for name in (*SPANS, "wall", "other")]
    trials = []
    for child in sorted(children, key=lambda r: r.info.start_time):
        run_id = child.info.run_id
        history = {key: client.get_metric_history(run_id, key) for key in keys}
        epochs = sorted({m.step for m in history["time_wall_s"]})
        trials.append(
            {
                "name": child.info.run_name,
                "status": "STOPPED" if child.data.tags.get("stopped_early") else child.info.status,
                "start": child.info.start_time / 1000,
                "end": child.info.end_time / 1000,
                "epochs": [
                    {key: next(m.value for m in history[key] if m.step == e) for key in keys}
                    | {"reported": next(m.timestamp for m in history["time_wall_s"] if m.step == e) / 1000}
                    for e in epochs
                ],
                "eval_epochs": sorted(m.step + 1 for m in client.get_metric_history(run_id, "AP")),
            }
        )
    return {
        "parent": {"start": parent.info.start_time / 1000, "end": parent.info.end_time / 1000},
        "trials": trials,
    }


def trial_parts(trial: dict[str, Any]) -> dict[str, float]:
    """A trial's seconds: its child run's wall, and its parts, which add up to it.

    The driver's epochs (`time_wall_s`, between its reports) and the worker's (its spans) are shifted against
    each other by the reporting's delay: an epoch's spans can exceed its wall, where `time_other_s` is 0. So
    the remainders here are taken over all the later epochs together (upload), not from `time_other_s`. The
    trainer started `sum(time_wall_s)` before the last report; the first report's time in MLflow is no clock
    for that: it comes after the driver's first MLflow client is made."""
    epochs = trial["epochs"]
    span = {name: sum(e[f"time_{name}_s"] for e in epochs) for name in SPANS}
    spans_of = [sum(e[f"time_{name}_s"] for name in SPANS) for e in epochs]  # per epoch
    walls = [e["time_wall_s"] for e in epochs]
    last_report = epochs[-1]["reported"]
    return {
        "wall": trial["end"] - trial["start"],
        "setup": last_report - sum(walls) - trial["start"],
        "startup": walls[0] - spans_of[0],
        "training": span["data"] + span["step"] + span["sync"],
        "eval": span["eval"] + span["latency"],
        "save": span["save"],
        "upload": sum(walls[1:]) - sum(spans_of[1:]),
        "wrapup": trial["end"] - last_report,
    }


def split(run: dict[str, Any]) -> dict[str, Any]:
    """The sweep's wall time as training + the OVERHEAD parts, each trial's parts, and the gaps between
    trials: from one trial's end (its child run's) to the next one's first step."""
    trials = run["trials"]
    parts = [trial_parts(t) for t in trials]
    between = [b["start"] - a["end"] for a, b in zip(trials, trials[1:], strict=False)]
    total = {
        "first": trials[0]["start"] - run["command_start"],
        **{
            name: sum(p[name] for p in parts)
            for name in ("setup", "startup", "eval", "save", "upload", "wrapup")
        },
        "between": sum(between),
        "last": run["command_end"] - trials[-1]["end"],
    }
    training = sum(p["training"] for p in parts)
    gaps = [
        {
            "to": t["name"],
            "between": seconds,
            "setup": p["setup"],
            "startup": p["startup"],
            "gap": seconds + p["setup"] + p["startup"],
        }
        for t, p, seconds in zip(trials[1:], parts[1:], between, strict=True)
    ]
    return {
        "wall": run["command_wall_s"],
        "training": training,
        "overhead": run["command_wall_s"] - training,
        "parts": total,
        "overlapped": any(s < 0 for s in between),
        "trials": parts,
        "gaps": gaps,
    }


def expected_eval_epochs(spec_path: str, sets: list[str], variant: str | None, done: int) -> list[int]:
    """The epochs a trial that did `done` epochs should have evaluated after, by the spec it ran."""
    from retinaops.job.spec import load_spec

    eval_at_rungs = [f"sweep.scheduler.eval_at_rungs={VARIANTS[variant]}"] if variant else []
    spec = load_spec(spec_path, sets + eval_at_rungs)
    epochs, every = spec.train.epochs, spec.train.eval_every
    at = spec.sweep.scheduler.eval_epochs(epochs, epochs)
    at = at if at is not None else [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]
    return [e for e in at if e <= done]


def short(run_name: str) -> str:
    """A trial's run name without its sweep's: demo-sweep-20261205-094434-82362_00001 -> 82362_00001."""
    return run_name.rsplit("-", 1)[-1]


def _s(seconds: float) -> str:
    return f"{seconds:.1f}"


def render(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [
        "# Sweep overhead (issue #17)",
        "",
        f"Measured {report['date']} in {report['minutes']:.0f} min on {report['cores']} cores (load average at "
        f"the start {report['load'][0]:.2f}, at the end {report['load'][1]:.2f}). Reproduce from the "
        "repository root with",
        "",
        f"    {report['command']}",
        "",
        f"Sweep: `{report['spec']}` with {' '.join(f'`--set {o}`' for o in report['overrides'])}, each variant "
        "one `retinaops sweep` on embedded Ray and MLflow (its own RETINAOPS_HOME). Times come from MLflow: the "
        "child runs' start and end, and each epoch's `time_*_s` (rank 0's spans; `time_wall_s` and "
        "`time_other_s` from the driver). **Training** is the trials' data + step + sync; **overhead** is the "
        f"rest of the command's wall time. Raw numbers: `{report['raw']}`.",
        "",
        "| variant | wall s | training s | overhead s | overhead share | "
        + " | ".join(name for name, _ in OVERHEAD)
        + " |",
        "| --- " * (5 + len(OVERHEAD)) + "|",
    ]
    for run in runs:
        s = run["split"]
        cells = [run["variant"], _s(s["wall"]), _s(s["training"]), f"**{_s(s['overhead'])}**"]
        cells += [f"{s['overhead'] / s['wall']:.0%}", *(_s(s["parts"][name]) for name, _ in OVERHEAD)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(runs) == 2:
        (a, b) = (r["split"] for r in runs)
        lines += [
            "",
            f"**After / before**: wall time {b['wall'] / a['wall']:.2f}, overhead {b['overhead'] / a['overhead']:.2f}, "
            f"evaluation {b['parts']['eval'] / a['parts']['eval']:.2f} ({b['wall'] - a['wall']:+.1f} s of wall "
            f"time, {b['overhead'] - a['overhead']:+.1f} s of overhead, {b['parts']['eval'] - a['parts']['eval']:+.1f} s "
            "of evaluation).",
        ]
    if any(r["split"]["overlapped"] for r in runs):
        lines += ["", "**Trials overlapped** (max_concurrent > 1): the parts do not add up to the wall time."]
    lines += [
        "",
        "Per trial, in seconds (its child run's wall = set-up + start-up + training + eval + save + upload + "
        "wrap-up):",
        "",
        "| variant | trial | status | epochs | evaluated after epochs | run wall | setup | startup | training "
        "| eval | save | upload | wrapup |",
        "| --- " * 13 + "|",
    ]
    for run in runs:
        for t, p in zip(run["trials"], run["split"]["trials"], strict=True):
            evaluated = ", ".join(str(e) for e in t["eval_epochs"])
            cells = [
                run["variant"],
                short(t["name"]),
                t["status"],
                str(len(t["epochs"])),
                evaluated,
                _s(p["wall"]),
            ]
            cells += [_s(p[k]) for k in ("setup", "startup", "training", "eval", "save", "upload", "wrapup")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "From one trial's end to the next trial's first step (**gap** = between + the next one's set-up + "
        "start-up), in seconds:",
        "",
        "| variant | to trial | between | setup | startup | gap |",
        "| --- " * 6 + "|",
    ]
    for run in runs:
        for g in run["split"]["gaps"]:
            cells = [
                run["variant"],
                short(g["to"]),
                *(_s(g[k]) for k in ("between", "setup", "startup")),
                f"**{_s(g['gap'])}**",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Overhead columns:", "", *(f"- **{name}**: {label}" for name, label in OVERHEAD), ""]
    return "\n".join(lines + NOT_CUT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from retinaops.job.resolved import resolve_job
    from retinaops.job.settings import Settings
    from retinaops.job.spec import load_spec

    started, load_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(args.work or tmp).resolve()
        sets = overrides(args, work)
        # The data set, generated before any sweep is timed (each sweep then checks it, as a sweep does).
        resolve_job(
            load_spec(args.spec, sets), Settings.from_env({"RETINAOPS_HOME": str(work / "prep")}), cwd=REPO
        )
        runs = []
        for variant in VARIANTS if args.variants else [None]:
            run = run_sweep(args, work, variant)
            for t in run["trials"]:
                expected = expected_eval_epochs(args.spec, sets, variant, len(t["epochs"]))
                if t["eval_epochs"] != expected:
                    raise SystemExit(
                        f"benchmarks.sweep_overhead: trial {t['name']} ({run['variant']}) evaluated after epochs "
                        f"{t['eval_epochs']}, expected {expected}"
                    )
            run["split"] = split(run)
            runs.append(run)
            s = run["split"]
            print(f"{run['variant']}: {s['wall']:.0f} s, overhead {s['overhead']:.0f} s", file=sys.stderr)
        out = Path(args.out) if args.out else (work if args.tiny else REPO / "benchmarks") / "SWEEP.md"
        raw = Path(args.raw) if args.raw else out.with_name("sweep_overhead.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "minutes": (time.time() - started) / 60,
            "cores": os.cpu_count(),
            "load": [load_start, os.getloadavg()[0]],
            "command": ".venv/bin/python -m benchmarks.sweep_overhead"
            + (" --variants" if args.variants else "")
            + (" --tiny" if args.tiny else "")
            + (f" --epochs {args.epochs}" if args.epochs != 4 else "")
            + (f" --steps {args.steps}" if args.steps else ""),
            "spec": os.path.relpath(args.spec, REPO),
            "overrides": [o for o in overrides(args, Path("WORK")) if not o.startswith("data.root")],
            "raw": raw.name,
            "runs": runs,
        }
        raw.write_text(json.dumps(report, indent=1))
        out.write_text(render(report))
        print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
