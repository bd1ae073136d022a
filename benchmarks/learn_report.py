"""LEARNING.md and learning.png from the report dict that `benchmarks.learn` builds (= learning.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

THRESHOLDS = (0.3, 0.5)
NAMES = {"torchvision": "torchvision's RetinaNet", "ours": "ours (retinanet.RetinaNet)"}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """First evaluation at or above each AP threshold ({"0.3": {"train_s", "step"} or None}), images/s,
    and the share of its cores the process got (CPU seconds / (training seconds x threads))."""
    reached = {
        str(t): next(
            ({"train_s": p["train_s"], "step": p["step"]} for p in result["points"] if p["AP"] >= t), None
        )
        for t in THRESHOLDS
    }
    return {
        "reached": reached,
        "images_per_s": result["images"] / result["train_s"],
        "cpu_share": result["cpu_s"] / (result["train_s"] * result["threads"]),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for impl, result in report["results"].items():
        points = result["points"]
        ap = [p["AP"] for p in points]
        lo, hi = [p["AP_lo"] for p in points], [p["AP_hi"] for p in points]
        for ax, key in ((by_time, "train_s"), (by_step, "step")):
            x = [p[key] for p in points]
            (line,) = ax.plot(x, ap, "o-", ms=3, label=NAMES[impl])
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    for ax in (by_time, by_step):
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    by_time.set_xlabel("training seconds (evaluation excluded)")
    by_step.set_xlabel(f"step (batch {report['batch_size']}, same batches for both)")
    by_time.set_ylabel("COCO AP@[.5:.95] on val (band: 95% bootstrap interval)")
    by_time.legend(loc="upper left", fontsize=8)
    how = "one after the other"
    if report["parallel"]:
        how = "both at once" + (" on their own cores" if report["pinned"] else "")
    fig.suptitle(f"Learning side by side: {report['threads']} thread(s) per model, {how}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _reached(hit: dict[str, Any] | None) -> str:
    return "not reached" if hit is None else f"{hit['train_s']:.0f} s (step {hit['step']})"


def table(report: dict[str, Any]) -> list[str]:
    rows = [
        "| model | steps | train s | images/s | first AP >= 0.3 | first AP >= 0.5 | final AP [95% interval] "
        "| final AP50 | CPU share |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for impl, r in report["results"].items():
        last = r["points"][-1]
        rows.append(
            f"| {NAMES[impl]} | {r['steps']} | {r['train_s']:.0f} | {r['images_per_s']:.2f} | "
            f"{_reached(r['reached']['0.3'])} | {_reached(r['reached']['0.5'])} | "
            f"{last['AP']:.3f} [{last['AP_lo']:.3f}, {last['AP_hi']:.3f}] | {last['AP50']:.3f} | "
            f"{r['cpu_share']:.0%} |"
        )
    return rows


def differences(report: dict[str, Any]) -> list[str]:
    """The config fields torchvision's model does not match (read back), then what no field shows."""
    spec, diff = report["spec"], report["differences"]
    rows = ["| RetinaNetConfig field | ours | torchvision's model |", "| --- | --- | --- |"]
    rows += [f"| `{k}` | `{ours}` | `{tv}` |" for k, (ours, tv) in diff.items()] or ["| (none) | | |"]
    workers, per_worker = spec["scaling"]["num_workers"], spec["train"]["batch_size"]
    normalizer = report["config"]["loss_normalizer"]
    notes = [
        "- Loss normaliser: torchvision divides each image's losses by that image's foreground anchors and "
        "averages over the images; ours divides the batch's losses by the foreground anchors of the whole "
        f"batch (`loss_normalizer: {normalizer}`)." * ("loss_normalizer" in diff),
        "- Box loss: torchvision's smooth L1 has beta 1 and no setting for it; our smooth L1 with a smaller "
        "beta is matched by torchvision's L1, its limit (the same gradient outside |x| < beta)."
        * ("box_loss" in diff),
        "- Anchors: torchvision truncates the octave sizes to integers and rounds the corners "
        "(`anchor_rounding: torchvision`); ours keeps them exact." * ("anchor_rounding" in diff),
        "- Focal loss alpha and gamma are fixed in torchvision (0.25, 2); other values would show above.",
        "- Initial weights: the same initialisers (torchvision's ResNet and FPN, N(0, 0.01) head convolutions, "
        "the prior bias) seeded with train.seed, but not the same values: the modules are built in another order.",
        "- Computation: torchvision matches anchors, computes the loss and post-processes image by image; ours "
        "does each for the whole batch. The speed differs, the definitions do not (beyond the rows above).",
        f"- Batch: each process trains the spec's global batch ({report['batch_size']} = {workers} workers x "
        f"{per_worker}) with its LR; in the platform each worker's BatchNorm normalises over {per_worker} images.",
        "- Optimiser: the platform's own (`retinaops.run.worker.build_optimizer`) for both.",
    ]
    notes = [n for n in notes if n]
    return [*rows, "", *notes]


def recipe(report: dict[str, Any]) -> list[str]:
    spec, t = report["spec"], report["spec"]["train"]
    d = spec["data"]
    synth = d.get("synth")
    data = (
        f"`make_synthetic_coco` from data.synth ({', '.join(f'{k} {v}' for k, v in synth.items())})"
        if synth
        else f"`{d['root'] or d['train']}`"
    )
    data += f", {report['num_train']} training images"
    augment = {k: v for k, v in (d.get("augment") or {}).items() if v is not None}
    lr_rule = f"train.lr {t['lr']} x {report['batch_size']} / {t['base_batch_size']}, JobSpec.effective_lr"
    clip = t["clip_grad_norm"] or "off"
    if report["seconds_budget"]:
        calib = ", ".join(f"{k} {v:.2f} s" for k, v in report["calibration_s_per_step"].items())
        budget = (
            f"{report['seconds_budget']:.0f} s over the slower model's seconds per step from a short timed "
            f"run ({calib}), rounded to whole epochs"
        )
    else:
        budget = "`--steps`, rounded up to whole epochs"
    overrides = ", ".join(f"`{o}`" for o in report["overrides"]) or "none"
    return [
        f"From `{report['spec_path']}` through `retinaops.job.spec.load_spec` (overrides: {overrides}):",
        "",
        f"- Data: {data}; data.hflip {d['hflip']}, data.augment {augment or 'off'}, built by "
        "`retinaops.run.worker.load_datasets` (seeded per image and epoch: both models see the same pixels).",
        f"- Model: `model` ({', '.join(f'{k} {v}' for k, v in spec['model'].items())}) as our `RetinaNetConfig`; torchvision's RetinaNet built to "
        "match it (`benchmarks/learn_models.py`).",
        f"- Train: {t['optimizer']}, lr {report['lr']:g} ({lr_rule}), weight decay {t['weight_decay']}, warm-up "
        f"{t['warmup_iters']} steps from {t['warmup_factor']} x lr, {t['schedule']} schedule "
        f"(`retinaops.run.worker.lr_factor`) over {report['steps']} steps = {report['epochs']} epochs x "
        f"{report['iters_per_epoch']}, gradient clipping {clip}, batch {report['batch_size']}, channels_last "
        f"{t['channels_last']}, seed {t['seed']}.",
        f"- Budget: {report['steps']} steps for each model, the same batches in the same order; from {budget}.",
        "- Evaluation: the val split after evenly spaced steps, the same path for both: `predict_dataset` -> "
        "COCO results -> `retinanet.evaluate.coco_ap` (pycocotools AP@[.5:.95]; the interval is a 95% bootstrap "
        "over the val images). Training seconds leave evaluation out; first-reach times are resolved to the "
        "evaluation interval.",
    ]


def render(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["results"]
    if report["parallel"]:
        cpus = " and ".join(f"{r[impl]['cpus']}" for impl in r)
        how = "both at the same time" + (f", pinned to cores {cpus}" if report["pinned"] else "")
    else:
        how = "one after the other (" + ", then ".join(report["order"]) + ")"
    tv_s, ours_s = r["torchvision"]["train_s"], r["ours"]["train_s"]
    return "\n".join(
        [
            "# Learning side by side: torchvision's RetinaNet and ours",
            "",
            f"Measured {report['date']} in {report['total_s'] / 60:.1f} min on {m['cpu_model']} "
            f"({report['cores']} usable cores; each model in its own fresh process with {report['threads']} "
            f"thread(s), {how}; torch {m['torch']}, torchvision {m['torchvision']}). Reproduce with",
            "",
            f"    .venv/bin/{report['command']}",
            "",
            "## Recipe",
            "",
            *recipe(report),
            "",
            "## Results",
            "",
            "![AP against training time](learning.png)",
            "",
            *table(report),
            "",
            f"Same steps, same batches: torchvision's model took {tv_s:.0f} s of training, ours {ours_s:.0f} s "
            f"(torchvision / ours = {tv_s / ours_s:.2f}x). CPU share: CPU seconds over training seconds x threads; "
            "below 100% the process waited for its cores. Every point is in learning.json.",
            "",
            "## Differences that remain",
            "",
            "The torchvision model's settings read back with `RetinaNet.from_torchvision`, against ours:",
            "",
            *differences(report),
            "",
        ]
    )
