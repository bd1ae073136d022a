"""Deterministic synthetic inputs: images, COCO-like targets, head outputs with realistic scores.

Legend: N images, A anchors over all levels, C classes, M objects of one image.
Everything is drawn from a seeded `torch.Generator`, so every process and both implementations
see the same numbers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NUM_CLASSES = 91  # torchvision's COCO head: 80 categories spread over ids 1..90, plus id 0
# Objects per image: a fixed cycle with mean 7, close to COCO's 7.3 annotations per image.
OBJECTS_PER_IMAGE = (7, 3, 11, 5, 9, 6, 8, 7)
# COCO's size mix (at ~640 px): 41% small (< 32^2), 34% medium, 25% large (> 96^2 px area).
BIN_EDGES = torch.tensor([0.41, 0.75])
BIN_SIDES = torch.tensor([[8.0, 32.0], [32.0, 96.0], [96.0, 400.0]])  # square-root of the area, px


def images(batch: int, size: int, seed: int = 0) -> list[Tensor]:
    """`batch` (3, size, size) images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(batch)]


def coco_like_targets(batch: int, size: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """~7 boxes per image, xyxy pixels inside a size x size image, COCO's small/medium/large mix."""
    g = torch.Generator().manual_seed(seed + 1)
    scale = size / 640  # COCO images are ~640 px on the long side
    targets = []
    for i in range(batch):  # input generation, not a hot path
        m = OBJECTS_PER_IMAGE[i % len(OBJECTS_PER_IMAGE)]
        size_bin = torch.bucketize(torch.rand(m, generator=g), BIN_EDGES, right=True)  # (M,) in {0, 1, 2}
        lo, hi = BIN_SIDES[size_bin, 0], BIN_SIDES[size_bin, 1]  # (M,), (M,)
        # Side of a square of the same area, log-uniform within its bin; aspect ratio in [1/2, 2].
        t = torch.rand(m, generator=g)  # (M,)
        side = torch.exp(torch.log(lo) + t * (torch.log(hi) - torch.log(lo))) * scale  # (M,)
        ratio = torch.exp((torch.rand(m, generator=g) * 2 - 1) * math.log(2))  # (M,) height / width
        w = (side / ratio.sqrt()).clamp(2, size - 1)  # (M,)
        h = (side * ratio.sqrt()).clamp(2, size - 1)  # (M,)
        x1 = torch.rand(m, generator=g) * (size - w)  # (M,)
        y1 = torch.rand(m, generator=g) * (size - h)  # (M,)
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)  # (M, 4)
        labels = torch.randint(1, NUM_CLASSES, (m,), generator=g)  # (M,)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def head_outputs(
    batch: int, num_anchors: int, *, logit_mean: float, logit_std: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """cls_logits (N, A, C) ~ Normal(logit_mean, logit_std), bbox_regression (N, A, 4) ~ Normal(0, 0.1).

    Normal(-8, 1.5) puts ~0.04% of the scores above 0.05: ~4,000 candidates per 800 px image,
    most of them on P3, so torchvision's per-level top-1000 is full on the finest level, as with a
    trained detector on a busy image.
    """
    g = torch.Generator().manual_seed(seed + 2)
    cls_logits = torch.randn(batch, num_anchors, NUM_CLASSES, generator=g) * logit_std + logit_mean
    bbox_regression = torch.randn(batch, num_anchors, 4, generator=g) * 0.1  # (N, A, 4)
    return cls_logits, bbox_regression
