"""Box coder and IoU: the one IoU arithmetic of the package (matcher, NMS, GIoU).

Legend: N images, G padded ground-truth boxes, A anchors. Boxes are xyxy in pixels unless a name
says otherwise. The coder follows torchvision's `BoxCoder` (same weights, same clamp), so weights
trained by either decode the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# exp() of a width/height delta larger than this would overflow: clamp as torchvision does.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _centers_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    widths = boxes[..., 2] - boxes[..., 0]  # (...)
    heights = boxes[..., 3] - boxes[..., 1]  # (...)
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(boxes: Tensor, anchors: Tensor, weights: tuple[float, ...]) -> Tensor:
    """Transforms (dx, dy, dw, dh) that take anchors to boxes; shapes broadcast, last dim 4."""
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centers_sizes(anchors)
    bx, by, bw, bh = _centers_sizes(boxes)
    deltas = (wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah))
    return torch.stack(deltas, dim=-1)  # (..., 4)


def decode(deltas: Tensor, anchors: Tensor, weights: tuple[float, ...]) -> Tensor:
    """Boxes from transforms relative to anchors; the inverse of `encode`. Shapes broadcast, last dim 4."""
    wx, wy, ww, wh = weights
    anchors = anchors.to(deltas.dtype)
    ax, ay, aw, ah = _centers_sizes(anchors)
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = torch.clamp(deltas[..., 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(deltas[..., 3] / wh, max=BBOX_XFORM_CLIP)
    cx, cy = dx * aw + ax, dy * ah + ay
    half_w, half_h = 0.5 * torch.exp(dw) * aw, 0.5 * torch.exp(dh) * ah
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)  # (..., 4)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def inter_union(
    boxes1: Tensor, boxes2: Tensor, area1: Tensor | None = None, area2: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of boxes1 (..., 4) and boxes2 (..., 4), shapes broadcast -> (...), (...).

    The one IoU arithmetic of the package: torchvision's `box_iou` (and `nms`), one coordinate at
    a time, so an IoU made from it equals theirs to the bit. area1, area2: the boxes' areas, shaped
    like their leading dims, when the caller has them (or needs other ones: the matcher gives
    padding rows an infinite area). Each coordinate is read as a strided view, so boxes laid out
    coordinate-major (a transposed (4, A) tensor) broadcast over contiguous memory.
    """
    area1 = box_area(boxes1) if area1 is None else area1
    area2 = box_area(boxes2) if area2 is None else area2
    # In place on fresh results only: autograd (GIoU) keeps what it needs.
    width = torch.minimum(boxes1[..., 2], boxes2[..., 2]).sub_(torch.maximum(boxes1[..., 0], boxes2[..., 0]))
    height = torch.minimum(boxes1[..., 3], boxes2[..., 3]).sub_(torch.maximum(boxes1[..., 1], boxes2[..., 1]))
    inter = width.clamp_(min=0).mul_(height.clamp_(min=0))  # (...)
    return inter, area1 + area2 - inter  # (...), (...)


def iou(boxes1: Tensor, boxes2: Tensor, area1: Tensor | None = None, area2: Tensor | None = None) -> Tensor:
    """Elementwise IoU of boxes1 (..., 4) and boxes2 (..., 4), shapes broadcast -> (...); see `inter_union`."""
    inter, union = inter_union(boxes1, boxes2, area1, area2)
    return inter / union


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every box in boxes1 (..., P, 4) with every box in boxes2 (..., Q, 4) -> (..., P, Q).

    Leading dimensions broadcast, so (N, G, 4) against (A, 4) gives (N, G, A) in one call.
    Equal to torchvision's `box_iou` to the bit.
    """
    return iou(boxes1[..., :, None, :], boxes2[..., None, :, :])  # (..., P, Q)


def giou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Elementwise generalised IoU loss (1 - GIoU) of matching boxes (..., 4), (..., 4) -> (...)."""
    inter, union = inter_union(boxes1, boxes2)  # (...), (...)
    iou_ = inter / (union + eps)
    hull_w = torch.maximum(boxes1[..., 2], boxes2[..., 2]) - torch.minimum(boxes1[..., 0], boxes2[..., 0])
    hull_h = torch.maximum(boxes1[..., 3], boxes2[..., 3]) - torch.minimum(boxes1[..., 1], boxes2[..., 1])
    hull = hull_w * hull_h  # (...)
    return 1 - iou_ + (hull - union) / (hull + eps)


def clip_to_image(boxes: Tensor, image_hw: Tensor) -> Tensor:
    """Clamp boxes (N, K, 4) into their image; image_hw (N, 2) holds each image's (height, width)."""
    height = image_hw[:, 0, None].to(boxes.dtype)  # (N, 1)
    width = image_hw[:, 1, None].to(boxes.dtype)  # (N, 1)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), width)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), height)
    x2 = torch.minimum(torch.maximum(boxes[..., 2], zero), width)
    y2 = torch.minimum(torch.maximum(boxes[..., 3], zero), height)
    return torch.stack((x1, y1, x2, y2), dim=-1)  # (N, K, 4)
