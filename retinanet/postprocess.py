"""Detections for a whole batch: per-level top-k over the score threshold, decode, one NMS call.

Legend: N images, A_l anchors of one level, C classes, K candidates per image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

from retinanet import boxes as box_ops


def batched_nms(boxes: Tensor, scores: Tensor, group_ids: Tensor, iou_threshold: float) -> Tensor:
    """NMS within groups in one call: boxes of different groups are moved apart so they never overlap.

    torchvision's `batched_nms` falls back to a Python loop over groups on the CPU for large inputs;
    offsetting by group keeps it a single kernel at any size.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = group_ids.to(boxes.dtype) * (boxes.max() + 1)  # (K,)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def postprocess(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    num_anchors_per_level: list[int],
    image_hw: Tensor,
    *,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    detections_per_img: int,
    box_weights: tuple[float, ...],
) -> list[dict[str, Tensor]]:
    """cls_logits (N, A, C), bbox_regression (N, A, 4), anchors (A, 4), image_hw (N, 2) of the
    resized images -> per image {"boxes" (K, 4) xyxy clipped to the image, "scores" (K,), "labels" (K,)}."""
    num_images, _, num_classes = cls_logits.shape
    all_boxes, all_scores, all_labels, all_keep = [], [], [], []
    start = 0
    for size in num_anchors_per_level:  # a loop over the 5 levels; images stay batched
        logits = cls_logits[:, start : start + size].flatten(1)  # (N, A_l * C)
        k = min(topk_candidates, logits.shape[1])
        top_logits, top_idx = logits.topk(k, dim=1)  # (N, k), (N, k)
        scores = torch.sigmoid(top_logits)  # (N, k)
        anchor_idx = top_idx // num_classes + start  # (N, k)
        labels = top_idx % num_classes  # (N, k)
        deltas = bbox_regression.gather(1, anchor_idx[..., None].expand(-1, -1, 4))  # (N, k, 4)
        boxes = box_ops.decode(deltas, anchors[anchor_idx], box_weights)  # (N, k, 4)
        all_boxes.append(box_ops.clip_to_image(boxes, image_hw))
        all_scores.append(scores)
        all_labels.append(labels)
        all_keep.append(scores > score_thresh)  # (N, k)
        start += size

    boxes = torch.cat(all_boxes, dim=1)  # (N, K, 4)
    scores = torch.cat(all_scores, dim=1)  # (N, K)
    labels = torch.cat(all_labels, dim=1)  # (N, K)
    keep_mask = torch.cat(all_keep, dim=1)  # (N, K)
    image_idx = torch.arange(num_images, device=boxes.device)[:, None].expand_as(labels)  # (N, K)

    boxes, scores, labels, image_idx = (
        boxes[keep_mask],
        scores[keep_mask],
        labels[keep_mask],
        image_idx[keep_mask],
    )
    keep = batched_nms(boxes, scores, image_idx * num_classes + labels, nms_thresh)  # sorted by score

    # The best detections_per_img of each image: a stable sort by image keeps score order within it.
    order = torch.sort(image_idx[keep], stable=True).indices
    keep = keep[order]
    counts = torch.bincount(image_idx[keep], minlength=num_images)  # (N,)
    first = torch.cumsum(counts, 0) - counts  # (N,)
    rank = torch.arange(keep.numel(), device=keep.device) - first[image_idx[keep]]
    keep = keep[rank < detections_per_img]
    counts = counts.clamp(max=detections_per_img).tolist()

    # Split the ragged result into images: the one loop over images, over outputs only.
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            boxes[keep].split(counts), scores[keep].split(counts), labels[keep].split(counts), strict=True
        )
    ]
