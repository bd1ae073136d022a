"""What each lever of the from-scratch recipe buys: the demo's trial, and the same with one lever reverted.

    python -m benchmarks.recipe                      # ~25 min on 2 cores -> benchmarks/RECIPE.md
    python -m benchmarks.recipe --tiny --out /tmp/r  # the smoke run of the tests

The recipe is a demo trial as `jobs/demo_sweep.yaml` sets it (its model, train and data.synth sections,
at the base of its sweep space). Each variant changes one setting with the spec's own `--set` syntax and
trains in a fresh process with one thread, two at a time, for the recipe's steps and LR schedule (its
epochs over its training set, whatever the variant's set), from train.seed, with the spec's flip; COCO AP
with its bootstrap 95% interval after every recipe epoch. Levers that only
change speed (the padding of a batch) are timed over a few steps instead of a whole run.

One seed per variant: a difference inside the intervals is not a finding.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from retinanet.ap_interval import overlaps

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "jobs" / "demo_sweep.yaml"

# name, overrides, what it reverts. The first row is the recipe itself.
VARIANTS: list[tuple[str, list[str], str]] = [
    ("recipe", [], "jobs/demo_sweep.yaml at min_size 128"),
    ("48 images", ["data.synth.train=48"], "the previous demo's training set size, seen ~21 times as often"),
    ("COCO size mix", ["data.synth.object_sizes=null"], "objects of 8-96 px, 71% below 32 px"),
    (
        "1 anchor",
        ["model.anchor_scales=[1.0]", "model.anchor_aspect_ratios=[1.0]"],
        "one square anchor per place, not the paper's 3 scales x 3 ratios",
    ),
    ("smooth L1", ["model.box_loss=smooth_l1"], "the paper's box loss instead of GIoU"),
    ("lr 0.008", ["train.lr=0.008"], "four times the LR"),
    ("GroupNorm backbone", ["model.backbone_norm=group_norm"], "GroupNorm in body and FPN, not BatchNorm"),
]
# Levers of speed only: timed over SPEED_STEPS steps on the recipe's data.
SPEED_VARIANTS: list[tuple[str, list[str], str]] = [
    ("recipe", [], "batches padded to multiples of 32, fused AdamW, channels-last"),
    ("pad to 128", ["model.size_divisible=128"], "pad to P7's stride: a 160 px side becomes 256"),
    ("channels-first", ['train.channels_last="off"'], "NCHW convolutions"),
]
SPEED_STEPS = 12


@dataclass
class Outcome:
    name: str
    overrides: list[str]
    what: str
    steps: int = 0
    train_s: float = 0.0
    per_epoch: list[dict[str, float]] = field(default_factory=list)  # AP, AP_lo, AP_hi, AP50, train_s

    @property
    def final(self) -> dict[str, float]:
        return self.per_epoch[-1] if self.per_epoch else {}


def _spec(overrides: list[str], base: list[str]):
    """The demo sweep's spec as one trial (no sweep section) with the overrides applied."""
    from retinaops.job.paths import read_yaml
    from retinaops.job.spec import JobSpec, apply_overrides, parse_overrides

    data = {k: v for k, v in read_yaml(SPEC).items() if k != "sweep"}
    data = apply_overrides(data, parse_overrides([*base, *overrides], "recipe"), "recipe")
    return JobSpec.from_dict(data, str(SPEC))


def _data_dir(spec, cache: Path) -> Path:
    """The spec's synthetic set under cache, generated once per distinct data.synth."""
    from retinanet.data import make_synthetic_coco, split_file

    s = spec.data.synth
    key = (
        f"n{s.train}-v{s.val}-c{s.classes}-s{s.size}-seed{s.seed}-o{'-'.join(map(str, s.object_sizes or []))}"
    )
    root = cache / key
    if not split_file(root, "val").is_file():
        make_synthetic_coco(root, **s.arguments())
    return root


def _build(spec, root: Path, steps_per_epoch: int | None = None):
    """Model, optimizer, LR schedule and data of a demo trial, built as the platform's worker builds them."""
    from torch.utils.data import DataLoader

    from retinanet import RetinaNet, RetinaNetConfig
    from retinanet.data import CocoDataset, collate
    from retinaops.job.augment import build_augment
    from retinaops.run.worker import build_optimizer, lr_factor

    t, d = spec.train, spec.data
    torch.manual_seed(t.seed)
    config = RetinaNetConfig.from_dict(spec.model)
    aug = build_augment(d.augment, hflip=d.hflip, max_size=config.max_size, seed=t.seed, rank=0)
    train = CocoDataset.from_dir(root, "train", transform=aug)
    val = CocoDataset.from_dir(root, "val")
    model = RetinaNet(config)
    if t.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
        model.backbone.channels_last = True
    model.resize_in_training = d.augment.resize is None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, spec)
    generator = torch.Generator().manual_seed(t.seed)  # the data order: one per variant, all the same
    loader = DataLoader(train, batch_size=t.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    steps = steps_per_epoch or len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, spec=spec, iters_per_epoch=steps)
    )
    return model, params, optimizer, schedule, loader, aug, val


def _batches(loader, aug):
    """The loader's batches pass after pass, each pass a new augmentation epoch."""
    epoch = 0
    while True:
        aug.set_epoch(epoch)
        yield from loader
        epoch += 1


def _step(model, params, optimizer, schedule, images, targets, clip) -> None:
    losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    schedule.step()


def train_variant(job: dict[str, Any]) -> dict[str, Any]:
    """One variant in this (fresh) process: the recipe's steps and LR schedule (epochs of the recipe's
    training set, whatever this variant's set), AP after each of those epochs."""
    from retinanet.evaluate import coco_ap, predict_dataset

    torch.set_num_threads(job["threads"])
    spec = _spec(job["overrides"], job["base"])
    per_epoch = job["steps_per_epoch"]
    model, params, optimizer, schedule, loader, aug, val = _build(spec, Path(job["data"]), per_epoch)
    batches = _batches(loader, aug)
    out = Outcome(job["name"], job["overrides"], job["what"])
    for epoch in range(spec.train.epochs):
        model.train()
        started = time.perf_counter()
        for _ in range(per_epoch):
            images, targets = next(batches)
            _step(model, params, optimizer, schedule, images, targets, spec.train.clip_grad_norm)
            out.steps += 1
        out.train_s += time.perf_counter() - started
        m = coco_ap(val.coco, predict_dataset(model, val, batch_size=spec.train.batch_size))
        keys = ("AP", "AP_lo", "AP_hi", "AP50")
        out.per_epoch.append({**{k: round(float(m[k]), 4) for k in keys}, "train_s": round(out.train_s, 1)})
        print(
            f"  {out.name}: epoch {epoch} AP {m['AP']:.3f} [{m['AP_lo']:.3f}, {m['AP_hi']:.3f}]", flush=True
        )
    return asdict(out)


def time_variant(job: dict[str, Any]) -> dict[str, Any]:
    """ms per image of SPEED_STEPS steps (after 2 warm-up steps) in this fresh process."""
    torch.set_num_threads(job["threads"])
    spec = _spec(job["overrides"], job["base"])
    model, params, optimizer, schedule, loader, _, _ = _build(spec, Path(job["data"]))
    model.train()
    times, images_seen = [], 0
    for i, (images, targets) in enumerate(loader):
        if i == job["steps"] + 2:
            break
        started = time.perf_counter()
        _step(model, params, optimizer, schedule, images, targets, spec.train.clip_grad_norm)
        if i >= 2:
            times.append(time.perf_counter() - started)
            images_seen += len(images)
    return {
        "name": job["name"],
        "what": job["what"],
        "ms_per_image": round(1000 * sum(times) / images_seen, 1),
    }


def _jobs(variants, base: list[str], cache: Path, threads: int, **extra) -> list[dict[str, Any]]:
    jobs = []
    for name, overrides, what in variants:
        data = _data_dir(_spec(overrides, base), cache)  # generated here, once, before the pool starts
        jobs.append({"name": name, "overrides": overrides, "what": what, "base": base, "data": str(data)})
        jobs[-1] |= {"threads": threads, **extra}
    return jobs


def report(results: dict[str, Any]) -> str:
    runs, speed = results["runs"], {r["name"]: r for r in results["speed"]}
    recipe = runs[0]["per_epoch"][-1]
    lines = [
        "# The from-scratch recipe, one lever at a time",
        "",
        f"`{results['command']}` on {results['machine']}: {results['parallel']} variants at a time, "
        f"{results['threads']} thread each, fresh processes. {results['wall_s'] / 60:.1f} min; load average "
        f"{results.get('load', ['-'])[0]} at the start, {results.get('load', ['-', '-'])[1]} at the end (above 2, other work shared the "
        "cores and the seconds are longer than on an idle machine; AP does not depend on it).",
        "",
        f"Each row is the recipe ({results['spec']}: a demo trial at min_size 128) with one setting changed, "
        "trained for the same steps (the recipe's epochs) with the same LR schedule from the same seed. AP is COCO AP on the "
        "validation split with its bootstrap 95% interval; one run per row, so rows whose intervals overlap "
        "the recipe's are not shown to differ.",
        "",
        "| variant | changed | what it reverts | AP [95% interval] | AP50 | vs recipe | train s | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        f = r["per_epoch"][-1]
        overlap = overlaps((f["AP_lo"], f["AP_hi"]), (recipe["AP_lo"], recipe["AP_hi"]))
        verdict = (
            "-"
            if r is runs[0]
            else ("tied" if overlap else ("better" if f["AP"] > recipe["AP"] else "worse"))
        )
        changed = ", ".join(f"`{o}`" for o in r["overrides"]) or "-"
        lines.append(
            f"| {r['name']} | {changed} | {r['what']} | {f['AP']:.3f} [{f['AP_lo']:.3f}, {f['AP_hi']:.3f}] | "
            f"{f['AP50']:.3f} | {verdict} | {r['train_s']:.0f} | {r['steps']} |"
        )
    lines += ["", "AP of the recipe after each epoch (the cosine schedule spans all of them):", ""]
    lines.append("| epoch | " + " | ".join(str(i + 1) for i in range(len(runs[0]["per_epoch"]))) + " |")
    lines.append("| --- |" + " --- |" * len(runs[0]["per_epoch"]))
    lines.append("| AP | " + " | ".join(f"{e['AP']:.3f}" for e in runs[0]["per_epoch"]) + " |")
    lines.append("| train s | " + " | ".join(f"{e['train_s']:.0f}" for e in runs[0]["per_epoch"]) + " |")
    base = speed["recipe"]["ms_per_image"]
    lines += [
        "",
        f"Levers of speed only, timed over {results['speed_steps']} training steps each, one after the "
        f"other, alone (ms per image, one thread; load average {results.get('speed_load', '-')}; above 1, "
        "the recipe is faster):",
        "",
        "| variant | what it reverts | ms / image | its time / recipe's |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in speed.items():
        lines.append(f"| {name} | {r['what']} | {r['ms_per_image']:.1f} | {r['ms_per_image'] / base:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="folder for RECIPE.md/.json")
    parser.add_argument("--cache", type=Path, default=ROOT / ".retinaops" / "bench-data")
    parser.add_argument("--parallel", type=int, default=2, help="variants at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant (default 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny data and one epoch: the smoke test")
    parser.add_argument("--only", nargs="*", help="train only these variants (names as in the table)")
    parser.add_argument(
        "--speed-only", action="store_true", help="time the speed levers again into the existing recipe.json"
    )
    args = parser.parse_args(argv)
    base = ["model.min_size=128"]
    variants, steps = VARIANTS, SPEED_STEPS
    if args.tiny:
        base += [
            "data.synth.train=8",
            "data.synth.val=4",
            "data.synth.size=64",
            "data.synth.object_sizes=[16,40]",
        ]
        base += ["model.min_size=64", "model.max_size=80", "train.epochs=1", "train.batch_size=2"]
        variants, steps = VARIANTS[:2], 1
    if args.only:
        variants = [v for v in VARIANTS if v[0] in {"recipe", *args.only}]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed_only:  # on a quiet machine, after a training run that shared the cores
        results = json.loads((args.out / "recipe.json").read_text())
        timed = _jobs(SPEED_VARIANTS, base, args.cache, args.threads, steps=steps)
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            results["speed"] = pool.map(time_variant, timed, chunksize=1)
        results["speed_load"] = round(os.getloadavg()[0], 1)
        (args.out / "recipe.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "RECIPE.md").write_text(report(results))
        print(f"timed the speed levers again into {args.out / 'RECIPE.md'}")
        return 0
    started, load_before = time.monotonic(), os.getloadavg()[0]
    recipe = _spec([], base)
    per_epoch = -(-recipe.data.synth.train // recipe.train.batch_size)  # the recipe's loader length
    runs = _jobs(variants, base, args.cache, args.threads, steps_per_epoch=per_epoch)
    timed = _jobs(SPEED_VARIANTS, base, args.cache, args.threads, steps=steps)
    with multiprocessing.get_context("spawn").Pool(args.parallel, maxtasksperchild=1) as pool:
        trained = pool.map(train_variant, runs, chunksize=1)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # alone: timings
        speed = pool.map(time_variant, timed, chunksize=1)
    speed_load = round(os.getloadavg()[0], 1)
    results = {
        "command": "python -m benchmarks.recipe" + (" --tiny" if args.tiny else ""),
        "machine": f"{multiprocessing.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}",
        "spec": str(SPEC.relative_to(ROOT)),
        "parallel": args.parallel,
        "threads": args.threads,
        "speed_steps": steps,
        "wall_s": round(time.monotonic() - started, 1),
        "load": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # 1-minute load, start and end
        "runs": trained,
        "speed": speed,
        "speed_load": speed_load,
    }
    (args.out / "recipe.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "RECIPE.md").write_text(report(results))
    print(f"wrote {args.out / 'RECIPE.md'} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
