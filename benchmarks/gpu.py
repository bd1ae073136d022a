"""The side-by-side benchmarks on a CUDA GPU: train step under AMP, loss, postprocess, inference, host syncs.

    python -m benchmarks.gpu --out-dir benchmarks     # writes GPU_RESULTS.md and gpu_results.json

Same models and inputs as `benchmarks.run` (torchvision's RetinaNet R50-FPN and ours from its
weights), moved to the GPU; implementations timed interleaved in one process, each call ended by
`torch.cuda.synchronize()`, warm-up rounds (cuDNN autotuning included) discarded. Peak memory is
`torch.cuda.max_memory_allocated` over train steps of one implementation at a time. Host syncs are
counted with `torch.cuda.set_sync_debug_mode("warn")` over one train step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks import inputs
from benchmarks.cases import Case, anchors_for, build_pair, spread_scores
from benchmarks.coco_scale import carry_section
from benchmarks.gpu_e2e import MARKERS
from benchmarks.timing import geomean, machine, paired_ratios, summarize, time_interleaved
from retinanet.fuse import fuse_frozen_bn
from retinanet.model import pad_targets
from retinanet.postprocess import postprocess

OUT_DIR = Path(__file__).resolve().parent
DEVICE = torch.device("cuda")


def _synced(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def _to(targets: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def _step(model: nn.Module, images: list[Tensor], targets: list[dict], amp: torch.dtype | None) -> Callable:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()

    return step


def _pair(case: Case, prepare: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, nn.Module]:
    tv, ours = build_pair(case, "baseline-first", None, prepare)
    return tv.to(DEVICE), ours.to(DEVICE)


def _timed(impls: dict[str, Callable], warmup: int, repeats: int) -> dict:
    impls = {name: _synced(fn) for name, fn in impls.items()}
    times, _ = time_interleaved(impls, warmup=warmup, repeats=repeats)
    return {
        "stats": {name: summarize(t) for name, t in times.items()},
        "ratios": {name: geomean(paired_ratios(times["tv"], t)) for name, t in times.items() if name != "tv"},
    }


def train_case(batch: int, size: int, amp: torch.dtype | None, repeats: int) -> dict:
    case = Case(f"train_b{batch}_{size}", "train", batch, size, False, repeats)
    tv, ours = _pair(case)
    nhwc = build_pair(case, "baseline-first", None)[1].to(DEVICE)
    nhwc.backbone.channels_last = True
    images = [img.to(DEVICE) for img in inputs.images(batch, size)]
    # torchvision needs its targets on the images' device; ours takes them on the CPU, as a
    # DataLoader gives them, checks them there and copies them without waiting (in its timed step).
    targets = inputs.coco_like_targets(batch, size)
    models = {"tv": tv, "ours": ours, "ours_nhwc": nhwc}
    steps = {
        name: _step(m, images, _to(targets, DEVICE) if name == "tv" else targets, amp)
        for name, m in models.items()
    }
    result = _timed(steps, warmup=3, repeats=repeats)
    memory = {}
    for name, step in steps.items():  # one implementation at a time: its own high-water mark
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        torch.cuda.synchronize()
        memory[name] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_memory_mib"] = memory
    result["images_per_s"] = {n: batch / (s["median_ms"] / 1e3) for n, s in result["stats"].items()}
    result["syncs_per_step"] = {name: _count_syncs(step) for name, step in steps.items()}
    return result


def _count_syncs(step: Callable[[], None]) -> int:
    """Host syncs in one step: torch warns once per synchronising call in "warn" mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def loss_case(batch: int, size: int, repeats: int) -> dict:
    case = Case(f"loss_b{batch}_{size}", "loss", batch, size, False, repeats)
    tv, ours = _pair(case)
    targets = _to(inputs.coco_like_targets(batch, size), DEVICE)
    tv_anchors, anchors = anchors_for(tv, ours, batch, size)
    tv_anchors, anchors = [a.to(DEVICE) for a in tv_anchors], anchors.to(DEVICE)
    cls_logits, bbox_regression = (
        t.to(DEVICE).requires_grad_()
        for t in inputs.head_outputs(batch, anchors.shape[0], logit_mean=-math.log(99.0), logit_std=1.0)
    )

    def finish(losses: dict[str, Tensor]) -> None:
        sum(losses.values()).backward()
        cls_logits.grad = bbox_regression.grad = None

    def tv_loss() -> None:
        finish(
            tv.compute_loss(
                targets, {"cls_logits": cls_logits, "bbox_regression": bbox_regression}, tv_anchors
            )
        )

    def ours_loss() -> None:
        gt_boxes, gt_labels, gt_valid, gt_crowd = pad_targets(targets, DEVICE)
        matches = ours.matcher(gt_boxes, gt_valid, gt_crowd, anchors)
        finish(ours.loss(cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_labels))

    return _timed({"tv": tv_loss, "ours": ours_loss}, warmup=3, repeats=repeats)


def post_case(batch: int, size: int, score_thresh: float | None, repeats: int) -> dict:
    case = Case(f"post_b{batch}_{size}", "post", batch, size, False, repeats)
    tv, ours = _pair(case)
    tv.eval()
    cfg = ours.config
    thresh = cfg.score_thresh if score_thresh is None else score_thresh
    tv.score_thresh = thresh
    tv_anchors, anchors = anchors_for(tv, ours, batch, size)
    tv_anchors, anchors = [a.to(DEVICE) for a in tv_anchors], anchors.to(DEVICE)
    per_level = ours.anchor_generator.num_anchors_per_level(
        [(math.ceil(size / 2**lvl), math.ceil(size / 2**lvl)) for lvl in range(3, 8)]
    )
    cls_logits, bbox_regression = (
        t.to(DEVICE) for t in inputs.head_outputs(batch, anchors.shape[0], logit_mean=-8.0, logit_std=1.5)
    )
    sizes = [(size, size)] * batch
    image_hw = torch.tensor(sizes, device=DEVICE)

    @torch.no_grad()
    def tv_post() -> None:
        split = {
            "cls_logits": list(cls_logits.split(per_level, dim=1)),
            "bbox_regression": list(bbox_regression.split(per_level, dim=1)),
        }
        tv.postprocess_detections(split, [list(a.split(per_level)) for a in tv_anchors], sizes)

    @torch.no_grad()
    def ours_post() -> None:
        postprocess(
            cls_logits, bbox_regression, anchors, per_level, image_hw, score_thresh=thresh,
            topk_candidates=cfg.topk_candidates, nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img, box_weights=cfg.box_weights,
        )  # fmt: skip

    return _timed({"tv": tv_post, "ours": ours_post}, warmup=3, repeats=repeats)


def infer_case(batch: int, size: int, repeats: int) -> dict:
    case = Case(f"infer_b{batch}_{size}", "infer", batch, size, False, repeats)
    tv, ours = _pair(case, spread_scores)
    tv.eval()
    ours.eval()
    fused = fuse_frozen_bn(ours)
    images = [img.to(DEVICE) for img in inputs.images(batch, size)]

    def call(model: nn.Module, mode: Callable) -> Callable:
        def run() -> None:
            with mode():
                model(images)

        return run

    impls = {
        "tv": call(tv, torch.no_grad),
        "ours": call(ours, torch.no_grad),
        "ours_fused": call(fused, torch.inference_mode),
    }
    return _timed(impls, warmup=3, repeats=repeats)


def render(report: dict) -> str:
    lines = [
        "# Benchmarks on a GPU: our RetinaNet vs torchvision's",
        "",
        f"Measured {report['date']} on {report['gpu']} (torch {report['machine']['torch']}, torchvision "
        f"{report['machine']['torchvision']}) in {report['total_s']:.0f} s. Reproduce with",
        "",
        f"    python -m benchmarks.gpu {' '.join(report['argv'])}",
        "",
        "Median ms per call over interleaved rounds; **tv / ours**: geometric mean of per-round ratios (above 1: "
        "ours is faster). `ours_nhwc`: `backbone.channels_last = True`; `ours_fused`: `fuse_frozen_bn()` under "
        "`inference_mode`. Train steps: SGD with momentum; torchvision's targets on the GPU (it needs them "
        "there), ours on the CPU (copied inside the timed step). Host syncs: warnings of "
        "`torch.cuda.set_sync_debug_mode('warn')` during one step.",
        "",
        "| case | implementation | median ms | **tv / ours** | images/s | peak GPU MiB | host syncs per step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in report["cases"].items():
        for impl, stats in res["stats"].items():
            ratio = "–" if impl == "tv" else f"**{res['ratios'][impl]:.2f}**"
            ips = res.get("images_per_s", {}).get(impl)
            mem = res.get("peak_memory_mib", {}).get(impl)
            syncs = res.get("syncs_per_step", {}).get(impl)
            lines.append(
                f"| `{name}` | {impl} | {stats['median_ms']:.1f} | {ratio} | "
                f"{'' if ips is None else f'{ips:.1f}'} | {'' if mem is None else f'{mem:.0f}'} | "
                f"{'' if syncs is None else syncs} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="2 rounds per case: checks the script")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark needs a GPU (the CPU one is benchmarks.run)")
    repeats = 2 if args.quick else args.repeats
    torch.backends.cudnn.benchmark = True
    started = time.time()
    bf16 = torch.bfloat16
    cases: dict[str, Callable[[], dict]] = {
        "train_b16_800_bf16": lambda: train_case(16, 800, bf16, repeats),
        "train_b2_512_bf16": lambda: train_case(2, 512, bf16, repeats),
        "train_b2_512_fp32": lambda: train_case(2, 512, None, repeats),
        "loss_b8_800": lambda: loss_case(8, 800, repeats),
        "post_b8_800": lambda: post_case(8, 800, None, repeats),
        "post_all_b8_800": lambda: post_case(8, 800, 0.0, repeats),
        "infer_b8_512": lambda: infer_case(8, 512, repeats),
    }
    report = {
        "argv": sys.argv[1:] if argv is None else argv,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "gpu": torch.cuda.get_device_name(),
        "cases": {},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, run in cases.items():
        start = time.time()
        report["cases"][name] = run()
        report["cases"][name]["wall_s"] = time.time() - start
        report["total_s"] = time.time() - started
        torch.cuda.empty_cache()
        (args.out_dir / "gpu_results.json").write_text(json.dumps(report, indent=1))
        results = args.out_dir / "GPU_RESULTS.md"  # benchmarks.gpu_e2e's section in it is kept
        results.write_text(carry_section(results, render(report), MARKERS))
        print(
            f"{name}: {json.dumps(report['cases'][name].get('ratios'))} in {report['cases'][name]['wall_s']:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
