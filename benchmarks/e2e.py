"""Where a `retinaops train` run's time goes, beside the bare train step of the same model (issue #17).

    .venv/bin/python -m benchmarks.e2e            (make bench-e2e: ~5 minutes on 2 quiet cores)

Runs the demo's job (jobs/demo.yaml, shortened to --epochs) once per worker layout (workers x threads) through
the real CLI, on embedded Ray and MLflow, and reads each epoch's spans back from its MLflow run (`time_*_s`:
README, "Train on Ray"). In this same process it times the bare train step of the same model, batch and
optimizer on batches already decoded in memory, with as many threads as the run had cores. Writes --out
(a markdown table), a stacked-bar plot and the raw numbers beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaops.run.spans import SPANS

if TYPE_CHECKING:
    import torch

    from retinaops.job.resolved import Job

REPO = Path(__file__).resolve().parents[1]
# What the stacked bars show, in order: the spans of the epochs, what the driver saw beyond them.
PARTS = (
    ("driver", "driver: data check, MLflow run, final model logging, Ray shutdown"),
    ("startup", "Ray and worker start-up (epoch 0's remainder)"),
    *((name, name) for name in SPANS),
    ("upload", "checkpoint upload and reporting (later epochs' remainder)"),
)
TINY = [  # a test-sized run: a few steps of a small set
    "data.synth={train: 16, val: 4, classes: 3, size: 128, seed: 0, object_sizes: [16, 80]}",
    "train.max_steps_per_epoch=2",
    "train.eval_max_images=4",
    "train.latency_iters=2",
    "train.warmup_iters=1",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.e2e", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--spec", default=str(REPO / "jobs" / "demo.yaml"), help="job spec (default: the demo's)"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument(
        "--layouts",
        default="1x2,2x1",
        help="workers x threads per worker, comma-separated (default: 1x2,2x1)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed bare steps (default: 20)")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny set: checks the script")
    parser.add_argument("--work", help="folder for the data and the runs (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "E2E.md"), help="the report (markdown)")
    args = parser.parse_args(argv)
    try:
        args.layouts = [tuple(int(n) for n in item.split("x")) for item in args.layouts.split(",")]
    except ValueError:
        parser.error(f"--layouts: expected WORKERSxTHREADS[,...] such as 1x2,2x1, got {args.layouts!r}")
    if args.tiny:
        args.steps = min(args.steps, 3)
    return args


def overrides(args: argparse.Namespace, work: Path) -> list[str]:
    return [f"data.root={work / 'data'}", f"train.epochs={args.epochs}", *(TINY if args.tiny else [])]


def train_run(spec: str, sets: list[str], env: dict[str, str], label: str) -> dict[str, Any]:
    """One `retinaops train --json` of spec with `--set`s, started with env exactly: the command's wall time,
    its MLflow run id and its epochs' `time_*_s` spans, `train_images` and `images_per_s`, read back from the
    tracking server the run used (Settings.from_env(env)'s)."""
    from mlflow import MlflowClient

    from retinaops.job.settings import Settings

    command = [sys.executable, "-m", "retinaops.cli", "train", spec, "--json"]
    command += [arg for value in sets for arg in ("--set", value)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"benchmarks: retinaops train ({label}) failed:\n{done.stderr[-3000:]}")
    outcome = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    client = MlflowClient(Settings.from_env(env, cwd=REPO).tracking_uri)
    keys = [f"time_{name}_s" for name in (*SPANS, "wall", "other")] + ["train_images", "images_per_s"]
    history = {key: client.get_metric_history(outcome["run_id"], key) for key in keys}
    epochs = sorted({m.step for m in history["time_wall_s"]})
    per_epoch = [{key: next(m.value for m in history[key] if m.step == e) for key in keys} for e in epochs]
    return {"command_wall_s": wall, "run_id": outcome["run_id"], "epochs": per_epoch}


def run_layout(args: argparse.Namespace, work: Path, workers: int, threads: int) -> dict[str, Any]:
    """One `retinaops train` with that layout on embedded Ray and MLflow: the command's wall time and its run's epochs."""
    home = work / f"home-{workers}x{threads}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"RETINAOPS_HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    sets = [*overrides(args, work), f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={threads}"]
    run = train_run(args.spec, sets, env, f"{workers}x{threads}")
    return {"workers": workers, "threads": threads, **run}


def breakdown(run: dict[str, Any]) -> dict[str, float]:
    """The run's seconds by part (PARTS), its images and its images/s end to end and in the train loop."""
    epochs = run["epochs"]
    total = {name: sum(e[f"time_{name}_s"] for e in epochs) for name in SPANS}
    parts = {
        "driver": run["command_wall_s"] - sum(e["time_wall_s"] for e in epochs),
        "startup": epochs[0]["time_other_s"],
        **total,
        "upload": sum(e["time_other_s"] for e in epochs[1:]),
    }
    images = sum(e["train_images"] for e in epochs)
    loop = total["data"] + total["step"] + total["sync"]
    return {
        **parts,
        "wall": run["command_wall_s"],
        "images": images,
        "e2e_images_per_s": images / run["command_wall_s"],
        "loop_images_per_s": images / loop,
    }


def bare_step(args: argparse.Namespace, work: Path, threads: int) -> dict[str, Any]:
    """time_step of the run's job on the CPU, with `threads` torch threads."""
    import torch

    from retinaops.job.resolved import resolve_job
    from retinaops.job.settings import Settings
    from retinaops.job.spec import load_spec

    settings = Settings.from_env({"RETINAOPS_HOME": str(work / "bare-home")})
    job, _ = resolve_job(load_spec(args.spec, overrides(args, work)), settings, cwd=REPO)
    return time_step(job, steps=args.steps, threads=threads, device=torch.device("cpu"))


def time_step(job: Job, *, steps: int, threads: int, device: torch.device) -> dict[str, Any]:
    """The train step of the job's model, batch, optimizer, precision and memory layout (worker.py's, without
    Ray, DDP or a data loader) on batches decoded beforehand and already on `device`, `threads` torch threads:
    images/s over `steps` steps after a warm-up pass; on a GPU also the peak of torch's allocated memory.
    fp16's grad scaler is left out: bf16 and fp32 steps are the worker's own."""
    import torch

    from retinanet.data import CocoDataset, collate
    from retinaops.run.worker import _amp_settings, build_model, build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(job, device).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, job.spec)
    amp_dtype, _ = _amp_settings(job.spec, device)
    data = CocoDataset.from_dir(job.spec.data.root, "train", check_images=False)
    batch = job.train.batch_size
    batches = []
    for k in range(min(4, len(data) // batch)):
        images, targets = collate([data[i] for i in range(k * batch, (k + 1) * batch)])
        targets = [{key: v.to(device) if torch.is_tensor(v) else v for key, v in t.items()} for t in targets]
        batches.append(([image.to(device) for image in images], targets))  # as the worker's loader gives them

    def step(images, targets) -> None:
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        (losses["classification"] + losses["bbox_regression"]).backward()
        if job.train.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, job.train.clip_grad_norm)
        optimizer.step()

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for images, targets in [*batches, batches[0]]:  # warm-up: every batch shape once (oneDNN's first calls)
        step(images, targets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = synced()
    for k in range(steps):
        step(*batches[k % len(batches)])
    seconds = synced() - started
    result = {"threads": threads, "batch": batch, "steps": steps, "images_per_s": batch * steps / seconds}
    if device.type == "cuda":
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(rows)))
    labels = [f"{r['workers']} x {r['threads']}" for r in rows]
    left = [0.0] * len(rows)
    for name, label in PARTS:
        widths = [r["parts"][name] for r in rows]
        ax.barh(labels, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("seconds of one `retinaops train` (workers x threads)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.1 * len(rows)), ncol=3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    rows, bare = report["rows"], report["bare"]
    first, last = bare["before_after"]
    spread = abs(last - first) / min(first, last)
    lines = [
        "# Where a training run's time goes (issue #17)",
        "",
        f"Measured {report['date']} in {report['minutes']:.0f} min on {report['cores']} cores (load average at "
        f"the start {report['load'][0]:.2f}, at the end {report['load'][1]:.2f}). Reproduce from the "
        "repository root with",
        "",
        f"    {report['command']}",
        "",
        f"Job: `{report['spec']}` with {' '.join(f'`--set {o}`' for o in report['overrides'])}. Each layout is one "
        "`retinaops train` on embedded Ray and MLflow; its spans are the `time_*_s` metrics of its MLflow run "
        f"(rank 0's), summed over its epochs. Bare step: the same model, batch ({bare['batch']}) and optimizer "
        f"in this process on batches decoded beforehand, {bare['threads']} threads, {bare['steps']} steps, "
        f"before the runs and after them: {first:.1f} and {last:.1f}, **{bare['images_per_s']:.1f} images/s** "
        f"on average. Plot: `{report['plot']}`; raw numbers: `{report['raw']}`.",
        "",
        *(
            [
                f"**The machine was not quiet**: the bare step's two measurements differ by {spread:.0%}, so "
                "the ratios below are uncertain by at least that much.",
                "",
            ]
            if spread > 0.1
            else []
        ),
        "| workers x threads | wall s | " + " | ".join(name for name, _ in PARTS) + " | images | "
        "end-to-end images/s | / bare | train loop images/s | / bare |",
        "| --- " * (len(PARTS) + 7) + "|",
    ]
    for r in rows:
        b = r["breakdown"]
        cells = [
            f"{r['workers']} x {r['threads']}",
            f"{b['wall']:.1f}",
            *(f"{b[name]:.1f}" for name, _ in PARTS),
        ]
        cells += [
            f"{b['images']:.0f}",
            f"{b['e2e_images_per_s']:.2f}",
            f"{b['e2e_images_per_s'] / bare['images_per_s']:.2f}",
        ]
        cells += [f"{b['loop_images_per_s']:.2f}", f"**{b['loop_images_per_s'] / bare['images_per_s']:.2f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns, in seconds:", ""]
    lines += [f"- **{name}**: {label}" for name, label in PARTS if name not in SPANS]
    lines += [
        '- **data** .. **save**: the worker\'s spans (README, "Train on Ray"): waiting for batches; forward, '
        "loss, backward and optimizer; waiting for the other workers; COCO evaluation; the latency "
        "measurement; writing the checkpoint",
        "- **train loop images/s**: images over data + step + sync, the loop the bare step is the core of; "
        "**end-to-end**: images over the command's whole wall time",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(args.work or tmp).resolve()
        cores = max(w * t for w, t in args.layouts)
        before = bare_step(args, work, cores)  # also generates the data set, before any run is timed
        print(f"bare step: {before['images_per_s']:.1f} images/s", file=sys.stderr)
        rows = []
        for workers, threads in args.layouts:
            run = run_layout(args, work, workers, threads)
            b = breakdown(run)
            rows.append({**run, "breakdown": b, "parts": {name: b[name] for name, _ in PARTS}})
            print(
                f"{workers}x{threads}: {b['wall']:.0f} s, {b['loop_images_per_s']:.1f} images/s",
                file=sys.stderr,
            )
        after = bare_step(args, work, cores)  # again: a machine that got busier shows as a difference
    rates = [before["images_per_s"], after["images_per_s"]]
    bare = {**before, "images_per_s": sum(rates) / 2, "before_after": rates}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_path, raw_path = out.with_suffix(".png"), out.with_suffix(".json")
    plot(rows, plot_path)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minutes": (time.time() - started) / 60,
        "cores": os.cpu_count(),
        "load": [load_start, os.getloadavg()[0]],
        "command": ".venv/bin/python -m benchmarks.e2e" + (" --tiny" if args.tiny else ""),
        "spec": os.path.relpath(args.spec, REPO),
        "overrides": [o for o in overrides(args, Path("WORK")) if not o.startswith("data.root")],
        "plot": plot_path.name,
        "raw": raw_path.name,
        "bare": bare,
        "rows": rows,
    }
    raw_path.write_text(json.dumps(report, indent=1))
    out.write_text(render(report))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
