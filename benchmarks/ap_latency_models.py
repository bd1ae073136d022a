"""The detectors of `benchmarks.ap_latency` and the one recipe that trains them all.

`Run` names one model of the chart; `build(run, num_classes)` makes it (torchvision's Faster R-CNN,
torchvision's RetinaNet, ours built from it, or ours) with anchors scaled to its resolution;
`train` runs the shared recipe: AdamW, linear warm-up, gradient clipping, batches that depend on
`run.seed` only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet import RetinaNet, RetinaNetConfig
from retinanet.backbone import RESNETS
from retinanet.data import collate

DEPTHS = ("resnet18", "resnet34", "resnet50", "resnet101")
IMAGE_SIZE = 128  # the synthetic images: 128 px square or 128 x 160
ANCHOR_BASE = 16  # smallest anchor at IMAGE_SIZE: shapes are 8-90 px, below torchvision's 32 px default


@dataclass(frozen=True)
class Run:
    name: str
    group: str  # "R50, same budget" | "parity" | "sweep"
    build: str  # frcnn | tv_retinanet | ours_from_tv | ours
    depth: str
    size: int
    steps: int
    seed: int = 0
    fpn_channels: int = 256


class ZeroBasedLabels(nn.Module):
    """torchvision's Faster R-CNN keeps label 0 for the background; the dataset's labels start at 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if targets is not None:
            return self.model(images, [{**t, "labels": t["labels"] + 1} for t in targets])
        return [{**d, "labels": d["labels"] - 1} for d in self.model(images)]


def anchor_sizes(size: int) -> list[int]:
    base = ANCHOR_BASE * size / IMAGE_SIZE
    return [round(base * 2**level) for level in range(5)]


def build(run: Run, num_classes: int) -> nn.Module:
    torch.manual_seed(1000 + run.seed)
    sizes = anchor_sizes(run.size)
    max_size = math.ceil(run.size * 1.25)
    if run.build == "frcnn":
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
        return ZeroBasedLabels(
            fasterrcnn_resnet50_fpn(
                weights=None,
                weights_backbone=None,
                num_classes=num_classes + 1,
                min_size=run.size,
                max_size=max_size,
                rpn_anchor_generator=anchors,
            )
        )
    if run.build in ("tv_retinanet", "ours_from_tv"):
        octaves = [(s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes]
        anchors = AnchorGenerator(tuple(octaves), ((0.5, 1.0, 2.0),) * 5)
        # torchvision's retinanet_resnet50_fpn, with the depth and FPN width of the run.
        body = RESNETS[run.depth](weights=None)
        c3 = body.inplanes // 4  # 128 for the basic-block ResNets, 512 for the bottleneck ones
        fpn = run.fpn_channels
        backbone = BackboneWithFPN(
            body,
            return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
            in_channels_list=[c3, c3 * 2, c3 * 4],
            out_channels=fpn,
            extra_blocks=LastLevelP6P7(fpn, fpn),
        )
        tv = TorchvisionRetinaNet(
            backbone, num_classes, min_size=run.size, max_size=max_size, anchor_generator=anchors
        )
        # torchvision pads batches to multiples of 32: the same padding keeps the pixels identical.
        return tv if run.build == "tv_retinanet" else RetinaNet.from_torchvision(tv, size_divisible=32)
    config = RetinaNetConfig(
        backbone=run.depth,
        num_classes=num_classes,
        min_size=run.size,
        max_size=max_size,
        anchor_sizes=tuple(float(s) for s in sizes),
        fpn_channels=run.fpn_channels,
        size_divisible=32,  # as torchvision pads: no model times padding the others skip
    )
    return RetinaNet(config)


def train(model: nn.Module, items: list, run: Run, *, batch_size: int, lr: float) -> float:
    """The shared recipe; returns seconds spent. Batches depend on run.seed only."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, run.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    order = torch.Generator().manual_seed(run.seed)
    queue: list[int] = []
    model.train()
    start = time.perf_counter()
    for step in range(run.steps):
        if len(queue) < batch_size:
            queue += torch.randperm(len(items), generator=order).tolist()
        batch, queue = queue[:batch_size], queue[batch_size:]
        images, targets = collate([items[i] for i in batch])
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise ValueError(f"{run.name}: non-finite loss {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
    return time.perf_counter() - start
