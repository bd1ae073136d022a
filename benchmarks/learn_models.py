"""The two detectors of `benchmarks.learn` and the training process each of them runs.

`torchvision_retinanet(config)` is torchvision's own RetinaNet set up as close to a `RetinaNetConfig` as
its constructor allows; `remaining_differences` reads the settings back with `RetinaNet.from_torchvision`
and lists every field where the two still differ. `train_process` is what each fresh process runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet import RetinaNet, RetinaNetConfig
from retinanet.backbone import RESNETS
from retinanet.data import collate
from retinanet.evaluate import coco_ap, predict_dataset

logger = logging.getLogger("benchmarks.learn")
IMPLS = ("torchvision", "ours")
STAGES_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "conv1")


def torchvision_box_loss(config: RetinaNetConfig) -> str:
    """torchvision's smooth L1 has beta 1 and no way to change it: a smaller beta maps to L1, its limit."""
    if config.box_loss == "smooth_l1" and config.smooth_l1_beta != 1.0:
        return "l1"
    return config.box_loss


def torchvision_retinanet(config: RetinaNetConfig, *, skip_resize: bool = False) -> TorchvisionRetinaNet:
    """torchvision's RetinaNet with our config's depth, FPN, anchors, head, matcher, resize and inference.

    From scratch only (trainable BatchNorm, as our default without backbone_weights). skip_resize: train
    on images as they come (our `resize_in_training = False`), for a multi-scale augmentation.
    """
    if config.backbone_weights is not None or config.backbone_norm == "frozen":
        raise ValueError(
            "benchmarks.learn: model.backbone_weights / backbone_norm=frozen: expected a model trained from "
            f"scratch, got backbone_weights={config.backbone_weights!r}, backbone_norm={config.backbone_norm!r}"
        )
    body = RESNETS[config.backbone](weights=None, norm_layer=nn.BatchNorm2d)
    trainable = 5 if config.trainable_backbone_layers is None else config.trainable_backbone_layers
    train = [*STAGES_TOP_DOWN[:trainable], *(["bn1"] if trainable == 5 else [])]
    for name, param in body.named_parameters():  # the rule of ours and of torchvision's extractor
        param.requires_grad_(any(name.startswith(stage) for stage in train))
    c3 = body.inplanes // 4  # 128 for the basic-block ResNets, 512 for the bottleneck ones
    fpn = config.fpn_channels
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[c3, c3 * 2, c3 * 4],
        out_channels=fpn,
        # torchvision takes P6 from C5 when the channel counts differ, from P5 when they are equal.
        extra_blocks=LastLevelP6P7(fpn if config.p6_from == "p5" else c3 * 4, fpn),
    )
    # torchvision's convention (retinanet_resnet50_fpn): octave sizes truncated to integers.
    sizes = tuple(tuple(int(base * s) for s in config.anchor_scales) for base in config.anchor_sizes)
    anchors = AnchorGenerator(sizes, (config.anchor_aspect_ratios,) * len(sizes))
    norm = partial(nn.GroupNorm, 32) if config.head_norm == "group_norm" else None
    head = RetinaNetHead(fpn, anchors.num_anchors_per_location()[0], config.num_classes, norm_layer=norm)
    prior = config.prior_probability
    nn.init.constant_(head.classification_head.cls_logits.bias, -math.log((1 - prior) / prior))
    head.regression_head._loss_type = torchvision_box_loss(config)
    model = TorchvisionRetinaNet(
        backbone,
        config.num_classes,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        anchor_generator=anchors,
        head=head,
        score_thresh=config.score_thresh,
        nms_thresh=config.nms_thresh,
        detections_per_img=config.detections_per_img,
        fg_iou_thresh=config.fg_iou_thresh,
        bg_iou_thresh=config.bg_iou_thresh,
        topk_candidates=config.topk_candidates,
        size_divisible=config.size_divisible,
        _skip_resize=skip_resize,
    )
    model.proposal_matcher.allow_low_quality_matches = config.allow_low_quality_matches
    model.box_coder.weights = head.regression_head.box_coder.weights = config.box_weights
    return model


def remaining_differences(config: RetinaNetConfig) -> dict[str, tuple[Any, Any]]:
    """Field -> (ours, torchvision's) for every RetinaNetConfig field the torchvision model does not match."""
    tv = torchvision_retinanet(config)
    as_tv = RetinaNet.from_torchvision(tv, size_divisible=tv.transform.size_divisible).config.to_dict()
    # Ours as it resolves "auto" and None from scratch, so that equal settings compare equal.
    trainable = 5 if config.trainable_backbone_layers is None else config.trainable_backbone_layers
    ours = dataclasses.replace(config, backbone_norm="batch", trainable_backbone_layers=trainable).to_dict()
    moot = {"smooth_l1_beta"} if "smooth_l1" not in (ours["box_loss"], as_tv["box_loss"]) else set()
    return {k: (ours[k], as_tv[k]) for k in ours if k not in moot and not _same(ours[k], as_tv[k])}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)  # the prior comes back through a float32 bias
    return a == b


def build(impl: str, config: RetinaNetConfig, *, skip_resize: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if impl == "torchvision":
        return torchvision_retinanet(config, skip_resize=skip_resize)
    model = RetinaNet(config)
    model.resize_in_training = not skip_resize
    return model


def train_process(job: dict[str, Any], out_path: str) -> None:
    """One model, one fresh process: train on job["batches"] in order, evaluating after job["eval_steps"].

    Writes {"impl", "points": [{step, epoch, train_s, AP, AP50, AP_lo, AP_hi, loss, lr, eval_s}], "step_s",
    ...} as JSON to out_path. train_s counts the steps (data, forward, backward, optimiser) and not evaluation.
    """
    # Imported here: the parent never needs Ray, which retinaops.run.worker imports.
    from retinaops.job.resolved import Job
    from retinaops.run.worker import build_optimizer, load_datasets, lr_factor

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {job['impl']}: %(message)s", datefmt="%X")
    if job["cpus"] and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, job["cpus"])
    torch.set_num_threads(job["threads"])
    resolved = Job.from_dict(job["job"])  # as a platform worker starts
    spec, config = resolved.spec, resolved.model
    skip_resize = spec.data.augment.resize is not None  # multi-scale images come resized
    train_ds, val_ds = load_datasets(resolved)
    model = build(job["impl"], config, skip_resize=skip_resize, seed=spec.train.seed)
    if spec.train.channels_last == "on":  # as the platform's CPU workers ("auto" is off on the CPU)
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, spec)  # the platform's: the spec's LR scaled to the global batch
    ipe = job["iters_per_epoch"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, spec=spec, iters_per_epoch=ipe)
    )
    eval_steps, points, losses = set(job["eval_steps"]), [], []
    train_s = cpu_s = 0.0
    step_s: list[float] = []
    model.train()
    for step, batch in enumerate(job["batches"]):
        epoch = step // ipe
        if step % ipe == 0:
            train_ds.transform.set_epoch(epoch)
        cpu_start, start = time.process_time(), time.perf_counter()
        images, targets = collate([train_ds[i] for i in batch])
        loss_dict = model(images, targets)
        loss = loss_dict["classification"] + loss_dict["bbox_regression"]
        if not torch.isfinite(loss):
            raise ValueError(f"{job['impl']}: non-finite loss {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.train.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.train.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        step_s.append(time.perf_counter() - start)
        train_s += step_s[-1]
        cpu_s += time.process_time() - cpu_start
        losses.append(float(loss.detach()))
        if step + 1 in eval_steps:
            eval_start = time.perf_counter()
            metrics = coco_ap(val_ds.coco, predict_dataset(model, val_ds, batch_size=len(batch)))
            point = {
                "step": step + 1,
                "epoch": (step + 1) / ipe,
                "train_s": train_s,
                **{k: metrics[k] for k in ("AP", "AP50", "AP_lo", "AP_hi")},
                "loss": sum(losses) / len(losses),
                "lr": optimizer.param_groups[0]["lr"],
                "eval_s": time.perf_counter() - eval_start,
            }
            points.append(point)
            losses = []
            logger.info("step %d, %.0f s: AP %.3f [%.3f, %.3f]", step + 1, train_s, *(
                point[k] for k in ("AP", "AP_lo", "AP_hi")))  # fmt: skip
    result = {
        "impl": job["impl"],
        "steps": len(job["batches"]),
        "images": sum(len(b) for b in job["batches"]),
        "train_s": train_s,
        "cpu_s": cpu_s,
        "threads": torch.get_num_threads(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "params": sum(p.numel() for p in params),
        "points": points,
        "step_s": step_s,
    }
    Path(out_path).write_text(json.dumps(result))
