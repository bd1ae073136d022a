"""A `retinaops train` run on the GPU beside the bare train step of the same model (issue #17), in one go.

    python -m benchmarks.gpu_e2e --out-dir $OUT               (make bench-gpu-e2e: ~3 minutes on an H100)
    python -m benchmarks.gpu_e2e --device cpu --tiny --out-dir /tmp/g    (the script's check: R18, 128 px)

Generates a shapes set re-encoded as JPEG files (400 training images of 800 px; --tiny: 8 of 128 px), trains
R50-FPN on it for --epochs epochs through the real CLI (`retinaops train --json`: embedded Ray and MLflow, or
the cluster and tracking server RAY_ADDRESS and MLFLOW_TRACKING_URI name) with bf16, channels-last, batch 16
and one Ray Train worker with the machine's cores for its loader, and reads each epoch's spans back from its
MLflow run (benchmarks.e2e.train_run). Then it times the bare step of the same model, batch, optimizer,
precision and layout in this process on batches already on the device (benchmarks.e2e.time_step). Meanwhile
nvidia-smi samples GPU utilisation and memory every 200 ms. Writes gpu_e2e.md (the report), gpu_e2e.json
and the samples under --out-dir; a full GPU run also replaces its section of benchmarks/GPU_RESULTS.md
(copied into --out-dir). Whole run within 8 minutes on an H100 or H200; each phase's seconds are printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.coco_scale import with_section
from benchmarks.e2e import breakdown, time_step, train_run

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "GPU_RESULTS.md"
MARKERS = ("<!-- gpu-e2e:start -->", "<!-- gpu-e2e:end -->")
GOAL = 0.85  # the train loop's images/s over the bare step's (issue #17)
SMI = ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.gpu_e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default: cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="R18, 128 px, 8 images, 2 steps: checks the script"
    )
    parser.add_argument("--images", type=int, help="generated training images (default: 400; --tiny: 8)")
    parser.add_argument(
        "--epochs", type=int, default=2, help="epochs of the run; the last one is the steady state"
    )
    parser.add_argument("--steps", type=int, help="timed bare steps (default: 20; --tiny: 2)")
    parser.add_argument(
        "--out-dir", type=Path, help="the report, raw numbers and samples (default: a temp folder)"
    )
    parser.add_argument("--work", type=Path, help="the data and the run's home (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.images = (8 if args.tiny else 400) if args.images is None else args.images
    args.steps = (2 if args.tiny else 20) if args.steps is None else args.steps
    for name in ("images", "epochs", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                "--device cuda: no CUDA device here (the script's check on a CPU: --device cpu --tiny)"
            )
    return args


def jpeg_set(root: Path, *, train: int, val: int, size: int) -> Path:
    """make_synthetic_coco's shapes (3 classes) in root, every image re-encoded as a JPEG of quality 90, as
    photos come: train.json and val.json name the .jpg files; the PNGs are removed."""
    from PIL import Image

    from retinanet.data import make_synthetic_coco
    from retinanet.layout import split_file

    make_synthetic_coco(root, num_train=train, num_val=val, num_classes=3, image_size=size, seed=0)

    def to_jpeg(png: Path) -> None:
        with Image.open(png) as image:
            image.save(png.with_suffix(".jpg"), quality=90)
        png.unlink()

    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL lets go of the GIL while it encodes
        list(pool.map(to_jpeg, sorted((root / "images").glob("*.png"))))
    for split in ("train", "val"):
        path = split_file(root, split)
        coco = json.loads(path.read_text())
        for image in coco["images"]:
            image["file_name"] = str(Path(image["file_name"]).with_suffix(".jpg"))
        path.write_text(json.dumps(coco))
    return root


def job_spec(args: argparse.Namespace, data: Path, cores: int) -> dict[str, Any]:
    """The run's spec: R50 at 800 px, batch 16, bf16 on the GPU; --tiny: R18 at 128 px, batch 2, 2 steps."""
    gpu = args.device == "cuda"
    if args.tiny:
        model = {"backbone": "resnet18", "min_size": 128, "max_size": 160, "size_divisible": 32}
        train = {"batch_size": 2, "max_steps_per_epoch": 2, "eval_max_images": 4, "latency_iters": 2}
        cpus, loader_workers = 1, 1  # one loader process, as on the GPU: its uint8 images, made float
    else:
        model = {"backbone": "resnet50", "min_size": 800, "max_size": 1333}
        train = {"batch_size": 16, "eval_max_images": 16, "latency_iters": 5}
        cpus = loader_workers = max(1, cores - 2)  # the worker's loader processes get the cores
    return {
        "name": "gpu-e2e",
        "data": {"root": str(data), "loader_workers": loader_workers},
        "model": {**model, "num_classes": 3},
        "train": {
            **train,
            "epochs": args.epochs,
            "optimizer": "adamw",  # from scratch in bf16: AdamW, warm-up and clipping keep the loss finite
            "lr": 0.0005,
            "schedule": "constant",
            "warmup_iters": 10,
            "clip_grad_norm": 10.0,
            "amp": "bf16" if gpu else "off",
            "channels_last": "on",
        },
        "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": cpus},
        "tracking": {"experiment": "gpu-e2e"},
    }


def parse_samples(text: str) -> list[tuple[float, float]]:
    """(utilisation %, memory used MiB) per line of nvidia-smi's csv; lines that are not two numbers (a line
    cut off when the sampler stopped, "[N/A]") are skipped."""
    samples = []
    for line in text.splitlines():
        try:
            util, used = (float(cell) for cell in line.split(","))
        except ValueError:
            continue
        samples.append((util, used))
    return samples


def gpu_figures(samples: list[tuple[float, float]]) -> dict[str, float] | None:
    """Mean utilisation over all samples and while busy (from the first sample above 0 % to the last: the
    phase's start-up and teardown left out), and the peak memory in use; None without samples."""
    if not samples:
        return None
    busy = [k for k, (util, _) in enumerate(samples) if util > 0]
    window = samples[busy[0] : busy[-1] + 1] if busy else samples
    return {
        "samples": len(samples),
        "mean_util_pct": sum(u for u, _ in samples) / len(samples),
        "busy_util_pct": sum(u for u, _ in window) / len(window),
        "peak_used_mib": max(m for _, m in samples),
    }


class GpuSampler:
    """nvidia-smi's utilisation and memory every 200 ms over a `with` block, in a background process writing
    to path; nothing on a CPU run or where nvidia-smi is missing (figures() is then None)."""

    def __init__(self, device: str, path: Path) -> None:
        self.path = path
        self.on = device == "cuda" and shutil.which("nvidia-smi") is not None
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        if self.on:
            with self.path.open("w") as out:  # the child keeps its own copy of the descriptor
                self.process = subprocess.Popen([*SMI, "-lms", "200"], stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def figures(self) -> dict[str, float] | None:
        return gpu_figures(parse_samples(self.path.read_text())) if self.on else None


def summary(run: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """The run's images/s per epoch in its train loop (train_images over data + step + sync), over all epochs
    and over the whole command, each as a ratio to the bare step's."""
    b = breakdown(run)
    per_epoch = [
        e["train_images"] / (e["time_data_s"] + e["time_step_s"] + e["time_sync_s"]) for e in run["epochs"]
    ]
    rates = {
        "last_epoch": per_epoch[-1],
        "all_epochs": b["loop_images_per_s"],
        "command": b["e2e_images_per_s"],
    }
    return {
        "images_per_s": rates,
        "ratios": {name: rate / bare["images_per_s"] for name, rate in rates.items()},
        "epoch_images_per_s": per_epoch,
        "breakdown": b,
    }


def _gpu_cells(figures: dict[str, float] | None) -> list[str]:
    if figures is None:
        return ["n/a", "n/a"]
    return [
        f"{figures['mean_util_pct']:.0f} ({figures['busy_util_pct']:.0f})",
        f"{figures['peak_used_mib']:.0f}",
    ]


def render(report: dict[str, Any]) -> str:
    """The report as a section of GPU_RESULTS.md, between MARKERS."""
    s, bare, spec = report["summary"], report["bare"], report["spec"]
    rates, ratios = s["images_per_s"], s["ratios"]
    model, train, scaling = spec["model"], spec["train"], spec["scaling"]
    met = "met" if ratios["last_epoch"] >= GOAL else "**not met**"
    allocated = bare.get("peak_allocated_mib")
    lines = [
        MARKERS[0],
        "## A `retinaops train` run on the GPU beside the bare step (issue #17)",
        "",
        f"Measured {report['date']} on {report['device']} (torch {report['torch']}, {report['cores']} CPU cores, "
        f"/dev/shm {report['shm_gib']:.0f} GiB) "
        f"in {report['minutes']:.1f} min. Reproduce from the repository root with",
        "",
        f"    {report['command']}",
        "",
        f"Job: {model['backbone']} at {model['min_size']} px (max {model['max_size']}), batch {train['batch_size']}, "
        f"amp {train['amp']}, channels-last {train['channels_last']}, {train['optimizer']} with gradient clipping, "
        "one Ray Train worker with "
        f"{scaling['cpus_per_worker']} CPUs and {spec['data']['loader_workers']} loader processes, "
        f"{train['epochs']} epochs of {report['images']} generated JPEGs of {report['size']} px (shapes), "
        f"evaluated on {train['eval_max_images']} val images. The run's spans are the `time_*_s` metrics of its "
        "MLflow run; the **train loop** is an epoch's `train_images` over its data + step + sync seconds (the "
        "worker waits for the GPU once a step, at its finite-loss check after the forward pass, so the last "
        "step's backward may still run after the loop's clock stops: with N steps an epoch the rate can read "
        "up to 1/N high). The first epoch also holds cuDNN's first calls and the loader's start-up, so the last "
        f"one is the steady state. Bare step: the same model, batch, optimizer, precision and layout in this process on "
        f"{bare['batch']}-image batches already on the device, {bare['steps']} steps after a warm-up pass.",
        "",
        "| what | images/s | / bare step |",
        "| --- | --- | --- |",
        f"| train loop, last epoch | {rates['last_epoch']:.1f} | **{ratios['last_epoch']:.2f}** "
        f"(goal {GOAL}: {met}) |",
        f"| train loop, all epochs | {rates['all_epochs']:.1f} | {ratios['all_epochs']:.2f} |",
        f"| whole command ({s['breakdown']['wall']:.0f} s: start-up, driver, eval, checkpoints included) | "
        f"{rates['command']:.1f} | {ratios['command']:.2f} |",
        f"| bare step | {bare['images_per_s']:.1f} | 1.00 |",
        "",
        "| phase | seconds | GPU utilisation %: mean (while busy) | peak GPU memory in use MiB (nvidia-smi) |",
        "| --- | --- | --- | --- |",
        f"| data generation | {report['phases']['data']:.0f} | | |",
        f"| `retinaops train` | {report['phases']['train']:.0f} | "
        + " | ".join(_gpu_cells(report["gpu"]["train"]))
        + " |",
        f"| bare step | {report['phases']['bare']:.0f} | "
        + " | ".join(_gpu_cells(report["gpu"]["bare"]))
        + " |",
        "",
        "Bare step's peak of torch's allocated memory: "
        + ("n/a (CPU)" if allocated is None else f"{allocated:.0f} MiB")
        + ". Utilisation is nvidia-smi's, sampled every 200 ms; *while busy* leaves out the samples before the "
        "first and after the last above 0 %.",
        "",
        "| epoch | images | data s | step s | sync s | eval s | other s | train loop images/s | / bare |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, (e, rate) in enumerate(zip(report["epochs"], s["epoch_images_per_s"], strict=True)):
        cells = [k + 1, f"{e['train_images']:.0f}"]
        cells += [f"{e[f'time_{name}_s']:.1f}" for name in ("data", "step", "sync", "eval", "other")]
        cells += [f"{rate:.1f}", f"{rate / bare['images_per_s']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join([*lines, MARKERS[1]])


def _device_name(device: str) -> str:
    import torch

    from benchmarks.timing import cpu_model

    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({cpu_model()})"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    started = time.time()
    cores = len(os.sched_getaffinity(0))
    out_dir = (args.out_dir or Path(tempfile.mkdtemp(prefix="gpu-e2e-"))).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    size = 128 if args.tiny else 800
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-e2e-work-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        clock = time.perf_counter()
        data = jpeg_set(work / "data", train=args.images, val=4 if args.tiny else 16, size=size)
        phases["data"] = time.perf_counter() - clock
        say(f"data: {args.images} JPEGs of {size} px in {phases['data']:.0f} s")

        spec = job_spec(args, data, cores)
        spec_path = work / "gpu_e2e.yaml"
        spec_path.write_text(json.dumps(spec))  # JSON is YAML
        # The caller's environment as it is (RAY_ADDRESS, MLFLOW_TRACKING_URI, tokens): a cluster when it names one.
        env = {"RETINAOPS_HOME": str(work / "home"), **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        clock = time.perf_counter()
        with GpuSampler(args.device, out_dir / "nvidia-smi-train.csv") as sampler:
            run = train_run(str(spec_path), [], env, "gpu-e2e")
        phases["train"], gpu_train = time.perf_counter() - clock, sampler.figures()
        say(f"retinaops train: {phases['train']:.0f} s")

        from retinaops.job.resolved import resolve_job
        from retinaops.job.settings import Settings
        from retinaops.job.spec import load_spec

        clock = time.perf_counter()  # after the run: this process holds no GPU memory while it goes
        with GpuSampler(args.device, out_dir / "nvidia-smi-bare.csv") as sampler:
            settings = Settings.from_env({"RETINAOPS_HOME": str(work / "bare-home")})
            job, _ = resolve_job(load_spec(spec_path, []), settings, cwd=REPO)
            threads = spec["scaling"]["cpus_per_worker"]
            bare = time_step(job, steps=args.steps, threads=threads, device=torch.device(args.device))
        phases["bare"], gpu_bare = time.perf_counter() - clock, sampler.figures()
        say(f"bare step: {bare['images_per_s']:.1f} images/s, {phases['bare']:.0f} s")

    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": _device_name(args.device),
        "torch": torch.__version__,
        "cores": cores,
        "shm_gib": shutil.disk_usage("/dev/shm").total / 2**30,  # the loader's batches pass through it
        "minutes": (time.time() - started) / 60,
        "command": shlex.join(
            [".venv/bin/python", "-m", "benchmarks.gpu_e2e", *(sys.argv[1:] if argv is None else argv)]
        ),
        "images": args.images,
        "size": size,
        "spec": {**spec, "data": {**spec["data"], "root": "WORK/data"}},
        "phases": phases,
        "gpu": {"train": gpu_train, "bare": gpu_bare},
        "bare": bare,
        "run_id": run["run_id"],
        "epochs": run["epochs"],
        "summary": summary(run, bare),
    }
    text = render(report)
    (out_dir / "gpu_e2e.json").write_text(json.dumps(report, indent=1))
    (out_dir / "gpu_e2e.md").write_text(text + "\n")
    if args.device == "cuda" and not args.tiny:  # only a full GPU run goes into the results file
        RESULTS.write_text(with_section(RESULTS.read_text() if RESULTS.is_file() else "", text, MARKERS))
        shutil.copy(RESULTS, out_dir / "GPU_RESULTS.md")
    print(text)
    say(f"written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
