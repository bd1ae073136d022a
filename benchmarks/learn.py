"""Learning side by side: torchvision's RetinaNet and ours, one recipe, one data order, AP against time.

    python -m benchmarks.learn             # the demo's recipe, ~420 s of training each (make bench-learn)
    python -m benchmarks.learn --tiny      # a few images and steps: checks the pipeline in < 1 min

The recipe and the data come from a job spec (`--spec`, default jobs/demo.yaml) read with the platform's
`load_spec`: data.synth is generated into a temporary folder, model is our RetinaNetConfig (torchvision's
model is built to match it, `benchmarks.learn_models`), train gives the optimiser, the LR scaled to the
global batch (JobSpec.effective_lr), warm-up and schedule (`retinaops.run.worker.lr_factor`), weight decay and
clipping; data.hflip and data.augment build the same seeded augmentation (`retinaops.run.worker.load_datasets`).
Each model trains in its own fresh process on one shared list of batches, both at once on their own
cores (`--parallel`) or one after the other, and is scored on the val split every few steps by our COCO
path (AP with its bootstrap interval). Writes LEARNING.md, learning.json and learning.png to --out-dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.learn_models import IMPLS, remaining_differences, train_process
from benchmarks.learn_report import plot, render, summarize
from benchmarks.timing import machine
from retinaops.job.resolved import resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import JobSpec, apply_overrides, load_spec

logger = logging.getLogger("benchmarks.learn")
OUT_DIR = Path(__file__).resolve().parent
REPO = OUT_DIR.parent
TINY = {  # a few 64 px images, batch 2 in one worker: the whole pipeline in well under a minute
    "data.synth.train": 6,
    "data.synth.val": 3,
    "data.synth.size": 64,
    "model.min_size": 64,
    "model.max_size": 80,
    "train.batch_size": 2,
    "train.warmup_iters": 1,
    "scaling.num_workers": 1,
}


def batch_plan(num_images: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Dataset indices of every step: a seeded shuffle per epoch, the short last batch dropped (as the
    platform's loader does when there is a full batch)."""
    order = torch.Generator().manual_seed(seed)
    per_epoch = num_images // batch_size if num_images >= batch_size else 1
    plan = []
    for _ in range(epochs):
        perm = torch.randperm(num_images, generator=order).tolist()
        plan += [perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
    return plan


def eval_steps(steps: int, evals: int) -> list[int]:
    every = max(1, round(steps / evals))
    return sorted({*range(every, steps + 1, every), steps})


def run_both(jobs: list[dict[str, Any]], parallel: bool, tmp: Path) -> dict[str, dict[str, Any]]:
    """Each job in a fresh spawned process, both at once or one after the other; impl -> its result."""
    ctx = mp.get_context("spawn")
    outs = {job["impl"]: tmp / f"{job['impl']}-{time.monotonic_ns()}.json" for job in jobs}
    procs = [ctx.Process(target=train_process, args=(job, str(outs[job["impl"]]))) for job in jobs]
    waves = [procs] if parallel else [[p] for p in procs]
    for wave in waves:
        for p in wave:
            p.start()
        for p in wave:
            p.join()
    for job, p in zip(jobs, procs, strict=True):
        if p.exitcode != 0:
            raise RuntimeError(f"benchmarks.learn: the {job['impl']} process exited with {p.exitcode}")
    return {impl: json.loads(path.read_text()) for impl, path in outs.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="python -m benchmarks.learn", description=__doc__.split("\n")[0])
    p.add_argument(
        "--spec", type=Path, default=REPO / "jobs" / "demo.yaml", help="the job spec of the recipe"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override (repeat)")
    p.add_argument("--seconds", type=float, default=420.0, help="training budget per model (sets the steps)")
    p.add_argument("--steps", type=int, help="train steps instead of --seconds (rounded up to whole epochs)")
    p.add_argument(
        "--evals", type=int, default=14, help="AP evaluations over the run, evenly spaced in steps"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of each model's process")
    p.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train both at once, each on its own cores (default: when there are cores for both)",
    )
    p.add_argument(
        "--calibration-steps", type=int, default=3, help="timed steps per model that set --seconds' steps"
    )
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where LEARNING.md, the JSON and the PNG go")
    p.add_argument("--tiny", action="store_true", help="6 images of 64 px, 3 steps, 2 evaluations")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.evals = args.steps or 3, 2
    for name in ("steps", "evals", "threads", "calibration_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    if args.seconds <= 0:
        p.error(f"--seconds: expected a positive number, got {args.seconds}")
    if args.parallel is None:
        args.parallel = cores >= 2 * args.threads
    args.cores = cores
    return args


def load_recipe(args: argparse.Namespace) -> tuple[JobSpec, list[str]]:
    """The spec with --tiny's and --set's overrides (--set last: it wins), and those overrides."""
    overrides = list(args.set)
    if args.tiny:
        synth = load_spec(args.spec, args.set).data.synth
        small = [f"{k}={v}" for k, v in TINY.items()]
        if synth is not None and synth.model_dump().get("object_sizes"):  # sized for the full images
            small.append("data.synth.object_sizes=null")
        overrides = small + overrides
    return load_spec(args.spec, overrides), overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    started = time.time()
    spec, overrides = load_recipe(args)
    with tempfile.TemporaryDirectory(prefix="bench-learn-") as tmp_name:
        tmp = Path(tmp_name)
        if spec.data.synth is not None:  # generated by resolve_job
            spec = JobSpec.from_dict(
                apply_overrides(spec.to_dict(), {"data.root": str(tmp / "data")}), spec.source
            )
        settings = Settings.from_env({"RETINAOPS_HOME": str(tmp / "home")})
        job, summary = resolve_job(spec, settings)  # the platform's own resolution: what a run trains
        config = job.model
        differences = remaining_differences(config)
        num_train = summary["train"]["images"]
        batch_size = spec.global_batch_size  # one process does the global batch of the spec's workers
        ipe = len(batch_plan(num_train, batch_size, 1, 0))
        base = {"threads": args.threads, "iters_per_epoch": ipe}

        def resolved(spec: JobSpec) -> dict[str, Any]:
            return resolve_job(spec, settings)[0].to_dict()

        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pinned = args.parallel and len(cpus) >= 2 * args.threads

        def jobs(job_dict: dict, batches: list[list[int]], evals: list[int]) -> list[dict[str, Any]]:
            return [
                {
                    **base,
                    "impl": impl,
                    "job": job_dict,
                    "batches": batches,
                    "eval_steps": evals,
                    "cpus": cpus[k * args.threads : (k + 1) * args.threads] if pinned else None,
                }
                for k, impl in enumerate(IMPLS)
            ]

        calibration: dict[str, float] = {}
        if args.steps is None:
            # Timed under the same conditions as the run (parallel or not); the first step warms up.
            plan = batch_plan(
                num_train, batch_size, math.ceil((args.calibration_steps + 1) / ipe), spec.train.seed
            )
            calib = run_both(jobs(resolved(spec), plan[: args.calibration_steps + 1], []), args.parallel, tmp)
            calibration = {impl: statistics.median(r["step_s"][1:]) for impl, r in calib.items()}
            slowest = max(calibration.values())
            epochs = max(1, round(args.seconds / slowest / ipe))
            logger.info("calibration: %s s/step -> %d epochs of %d steps", calibration, epochs, ipe)
        else:
            epochs = math.ceil(args.steps / ipe)
        run_spec = JobSpec.from_dict(apply_overrides(spec.to_dict(), {"train.epochs": epochs}), spec.source)
        plan = batch_plan(num_train, batch_size, epochs, spec.train.seed)
        results = run_both(
            jobs(resolved(run_spec), plan, eval_steps(len(plan), args.evals)), args.parallel, tmp
        )
    report = {
        "command": " ".join(["python", "-m", "benchmarks.learn", *(sys.argv[1:] if argv is None else argv)]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "cores": args.cores,
        "threads": args.threads,
        "parallel": args.parallel,
        "pinned": pinned,
        "spec_path": str(
            args.spec.resolve().relative_to(REPO) if args.spec.resolve().is_relative_to(REPO) else args.spec
        ),
        "overrides": overrides,
        "order": list(IMPLS),
        "spec": run_spec.to_dict(),
        "config": config.to_dict(),
        "lr": run_spec.effective_lr,
        "batch_size": batch_size,
        "num_train": num_train,
        "iters_per_epoch": ipe,
        "epochs": epochs,
        "steps": len(plan),
        "seconds_budget": None if args.steps else args.seconds,
        "calibration_s_per_step": calibration,
        "differences": {k: list(v) for k, v in differences.items()},
        "results": {impl: {**results[impl], **summarize(results[impl])} for impl in IMPLS},
        "total_s": time.time() - started,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "learning.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out_dir / "learning.png")
    (args.out_dir / "LEARNING.md").write_text(render(report))
    logger.info("wrote %s in %.0f s", args.out_dir / "LEARNING.md", report["total_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
