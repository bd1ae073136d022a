"""Detections for a whole batch: per-level top-k over the score threshold, decode, one NMS call.

Legend: N images, A anchors over all levels, A_l anchors of one level, L levels, C classes,
M candidates over the whole batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import nms

from retinanet import boxes as box_ops

# The sparse path sorts every logit above the threshold; past this many per (image, level) and
# top-k slot, one dense top-k per level is cheaper.
_SPARSE_MAX_PER_SLOT = 16
# Grouped NMS: all pairs within groups at once while they average at most this many per box
# (many small groups: a batch of images x classes); beyond, one `nms` kernel per group.
_NMS_PAIRS_PER_BOX = 32
# On a GPU, one offset `nms` kernel up to this many boxes (torchvision's own limit for it).
_OFFSET_NMS_MAX_BOXES = 5000


def _on_cpu(t: Tensor) -> bool:
    """(Tests replace it to run the GPU path on the CPU.)"""
    return t.device.type == "cpu"


def batched_nms(boxes: Tensor, scores: Tensor, group_ids: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within groups for all groups at once: indices kept (K',), best score first.

    A box is dropped when a kept box of its group with a higher score overlaps it with IoU above
    iou_threshold: torchvision's `nms` rule, on exactly its IoU formula.

    One `nms` kernel over all groups moved apart by offsets (torchvision's trick) compares every
    box with every other, of any group: on the CPU that costs ~(all boxes) x (kept boxes), so a
    batch of 8 images costs 64 times one image, and on a GPU its (K, K) overlap mask, copied to
    the host, grows with the square of the batch too. So the CPU always, and a GPU past
    _OFFSET_NMS_MAX_BOXES boxes, compares boxes within their group only: see `_grouped_nms`.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if _on_cpu(boxes) or boxes.shape[0] > _OFFSET_NMS_MAX_BOXES:
        return _grouped_nms(boxes, scores, group_ids, iou_threshold)
    offsets = group_ids.to(boxes.dtype) * (boxes.max() + 1)  # (K,)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _grouped_nms(boxes: Tensor, scores: Tensor, group_ids: Tensor, iou_threshold: float) -> Tensor:
    """batched_nms with the boxes sorted into groups: many small groups go through all their pairs
    at once (`_greedy_nms_over_pairs`), a few large ones through one `nms` kernel each."""
    # Score order (best first, stable), then grouped: within each group boxes stay best first.
    order = torch.sort(scores, descending=True, stable=True).indices  # (K,)
    order = order[torch.sort(group_ids[order], stable=True).indices]  # (K,)
    _, group_size = torch.unique_consecutive(group_ids[order], return_counts=True)  # (G',)
    num_pairs = int((group_size * (group_size - 1) // 2).sum())
    if num_pairs <= _NMS_PAIRS_PER_BOX * order.numel():
        keep = order[_greedy_nms_over_pairs(boxes[order], group_size, num_pairs, iou_threshold)]  # (K',)
    else:
        sizes = group_size.tolist()
        # A loop over groups, only when they are few and large: each iteration is one kernel.
        keep = torch.cat(
            [
                idx[nms(b, s, iou_threshold)]
                for b, s, idx in zip(
                    boxes[order].split(sizes), scores[order].split(sizes), order.split(sizes), strict=True
                )
            ]
        )  # (K',)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _greedy_nms_over_pairs(boxes: Tensor, group_size: Tensor, num_pairs: int, iou_threshold: float) -> Tensor:
    """Kept mask (K,) of boxes (K, 4) sorted into groups of group_size (G',), best first in each.

    Greedy NMS is the fixed point of "kept = no kept, better box of my group overlaps me": starting
    from all kept, each sweep settles at least one more box in score order, and on detections it
    settles in a handful of sweeps because overlap chains are short.
    """
    # Every (i, j), i before j in the same group: i repeated once per later box of its group.
    size = group_size.repeat_interleave(group_size)  # (K,) size of each box's group
    start = (torch.cumsum(group_size, 0) - group_size).repeat_interleave(group_size)  # (K,)
    position = torch.arange(boxes.shape[0], device=boxes.device)  # (K,)
    num_later = start + size - 1 - position  # (K,)
    first = position.repeat_interleave(num_later)  # (P,)
    pair_start = torch.cumsum(num_later, 0) - num_later  # (K,)
    second = first + 1 + torch.arange(num_pairs, device=boxes.device) - pair_start[first]  # (P,)

    area = box_ops.box_area(boxes)  # (K,)
    overlaps = box_ops.iou(boxes[first], boxes[second], area[first], area[second]) > iou_threshold  # (P,)
    first, second = first[overlaps], second[overlaps]  # (E,), (E,) edges: first suppresses second

    kept = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)  # (K,)
    while True:  # converges in at most K sweeps; detections need a few
        hits = torch.zeros(boxes.shape[0], device=boxes.device).index_add_(0, second, kept[first].float())
        now_kept = hits == 0  # (K,)
        if torch.equal(now_kept, kept):
            return kept
        kept = now_kept


def _top_candidates_dense(
    cls_logits: Tensor, anchor_max: Tensor, num_anchors_per_level: list[int], topk_candidates: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k logits of every (image, level): image_idx (M,), flat index a * C + c (M,), logit (M,).

    anchor_max (N, A) is each anchor's best logit. The k best logits of a level lie in the k anchors
    with the best maxima (an anchor holding one has a maximum at least the k-th best logit, and at
    most k anchors do, ties aside), so a top-k over (N, A_l) anchors and then over their (N, k * C)
    logits replaces a top-k over all (N, A_l * C), which costs several times the one read of them.
    """
    num_images, num_anchors, num_classes = cls_logits.shape
    rows = cls_logits.reshape(num_images * num_anchors, num_classes)  # (N * A, C)
    first_row = torch.arange(num_images, device=cls_logits.device)[:, None] * num_anchors  # (N, 1)
    image_idx, flat_idx, values = [], [], []
    start = 0
    for size in num_anchors_per_level:  # a loop over the 5 levels; images stay batched
        k = min(topk_candidates, size * num_classes)
        _, top_anchor = anchor_max[:, start : start + size].topk(min(k, size), dim=1)  # (N, k_a)
        top_anchor += start
        logits = rows.index_select(0, (first_row + top_anchor).flatten()).view(num_images, -1)  # (N, k_a * C)
        top_logits, top_pos = logits.topk(k, dim=1)  # (N, k), (N, k)
        anchor_idx = top_anchor.gather(1, top_pos // num_classes)  # (N, k)
        image_idx.append(torch.arange(num_images, device=logits.device)[:, None].expand_as(top_pos).flatten())
        flat_idx.append((anchor_idx * num_classes + top_pos % num_classes).flatten())
        values.append(top_logits.flatten())
        start += size
    return torch.cat(image_idx), torch.cat(flat_idx), torch.cat(values)


def _top_candidates_sparse(
    cls_logits: Tensor,
    anchor_max: Tensor,
    num_anchors_per_level: list[int],
    topk_candidates: int,
    min_logit: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """As `_top_candidates_dense`, among the logits above min_logit only; None when too many are.

    A trained detector scores a few thousand of ~10^7 logits per image above the threshold:
    selecting them first and ranking only those avoids a top-k over every logit of the level.
    """
    num_images, num_anchors, num_classes = cls_logits.shape
    num_levels = len(num_anchors_per_level)
    limit = _SPARSE_MAX_PER_SLOT * topk_candidates * num_images * num_levels
    # A logit above min_logit needs its anchor's best one (anchor_max) above it: the anchors come
    # from (N, A) maxima, where a comparison of every logit would write, page in and scan an
    # (N, A, C) mask.
    image_idx, anchor_idx = (anchor_max > min_logit).nonzero().unbind(1)  # (K,), (K,)
    if image_idx.numel() > limit:
        return None
    rows = cls_logits.reshape(-1, num_classes).index_select(0, image_idx * num_anchors + anchor_idx)  # (K, C)
    row_idx, class_idx = (rows > min_logit).nonzero().unbind(1)  # (M,), (M,) in (image, anchor, class) order
    if row_idx.numel() > limit:
        return None
    values = rows[row_idx, class_idx]  # (M,)
    image_idx = image_idx[row_idx]  # (M,)
    flat_idx = anchor_idx[row_idx] * num_classes + class_idx  # (M,)
    level_ends = torch.tensor(num_anchors_per_level, device=cls_logits.device).cumsum(0) * num_classes  # (L,)
    slot = image_idx * num_levels + torch.bucketize(flat_idx, level_ends, right=True)  # (M,)
    # Best first within each (image, level) slot: sort by logit, then stably by slot.
    order = torch.sort(values, descending=True, stable=True).indices  # (M,)
    order = order[torch.sort(slot[order], stable=True).indices]  # (M,)
    counts = torch.bincount(slot, minlength=num_images * num_levels)  # (N * L,)
    first = torch.cumsum(counts, 0) - counts  # (N * L,)
    rank = torch.arange(order.numel(), device=order.device) - first[slot[order]]  # (M,)
    order = order[rank < topk_candidates]
    return image_idx[order], flat_idx[order], values[order]


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
    resized images -> per image {"boxes" (K, 4) xyxy clipped to the image, "scores" (K,), "labels" (K,)}.

    Per image and level, the topk_candidates best scores above score_thresh are decoded, then
    NMS runs per image and class and the detections_per_img best are kept: torchvision's rules.
    """
    num_images, _, num_classes = cls_logits.shape
    # Each anchor's best logit: one read of all (N, A, C) logits, the one pass over all of them.
    anchor_max = cls_logits.amax(dim=2)  # (N, A)
    top = None
    if score_thresh > 0:
        # Slightly below the threshold's logit, so that rounding never drops a score above it;
        # the exact test on the sigmoid follows.
        min_logit = math.log(score_thresh / (1 - score_thresh)) - 1e-3 if score_thresh < 1 else math.inf
        top = _top_candidates_sparse(
            cls_logits, anchor_max, num_anchors_per_level, topk_candidates, min_logit
        )
    if top is None:
        top = _top_candidates_dense(cls_logits, anchor_max, num_anchors_per_level, topk_candidates)
    image_idx, flat_idx, logits = top  # (M,), (M,), (M,)
    scores = torch.sigmoid(logits)  # (M,)
    keep = scores > score_thresh  # (M,)
    image_idx, flat_idx, scores = image_idx[keep], flat_idx[keep], scores[keep]
    anchor_idx = flat_idx // num_classes  # (M,)
    labels = flat_idx % num_classes  # (M,)
    boxes = box_ops.decode(bbox_regression[image_idx, anchor_idx], anchors[anchor_idx], box_weights)  # (M, 4)
    boxes = box_ops.clip_to_image(boxes[:, None], image_hw[image_idx])[:, 0]  # (M, 4), each in its image

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
