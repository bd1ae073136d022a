"""Anchor-to-object assignment for a whole batch at once.

Legend: N images, G padded ground-truth boxes, A anchors, S anchors of one block.
Result per anchor: the index of its object in [0, G), BACKGROUND (-1) or IGNORE (-2).
Same rules as torchvision's `Matcher(0.5, 0.4, allow_low_quality_matches=True)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retinanet import boxes as box_ops

BACKGROUND = -1
IGNORE = -2
# CPU blocks of anchors for the (N, G, A) IoU (a GPU takes one); measurements: benchmarks/TUNING.md.
_BLOCK = 1 << 19  # CPU: (N, G, S) elements per block (2 MiB of float32)
_MAX_BLOCKS = 32  # CPU: most blocks per call


def _on_cpu(t: Tensor) -> bool:
    """Blocks and host checks pay on the CPU; elsewhere one block and no host sync.
    (Tests replace it to run the GPU path on the CPU.)"""
    return t.device.type == "cpu"


class Matcher:
    """IoU >= fg_iou_thresh: object; < bg_iou_thresh: background; in between: ignored.

    With allow_low_quality_matches, every anchor that has an object's highest IoU (ties included)
    is also matched, to the object it overlaps most, as in the paper's implementation.
    Crowd regions are not objects: anchors mostly inside one (intersection over anchor area >=
    fg_iou_thresh) that would otherwise be background are ignored instead.
    """

    def __init__(self, fg_iou_thresh: float, bg_iou_thresh: float, allow_low_quality_matches: bool) -> None:
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor, anchors: Tensor) -> Tensor:
        """gt_boxes (N, G, 4), gt_valid (N, G), gt_crowd (N, G), anchors (A, 4) -> matches (N, A) int64."""
        num_images, num_gt, _ = gt_boxes.shape
        object_mask = gt_valid & ~gt_crowd  # (N, G)
        crowd_mask = gt_valid & gt_crowd  # (N, G)
        # One host check on the CPU (free there) skips the crowd pass when, as usual, there is none.
        has_crowd = bool(crowd_mask.any()) if _on_cpu(gt_boxes) else True
        # Padding and crowd rows get an infinite area, so their IoU is 0: they never reach a
        # threshold, and they lose every tie to a real object with a positive IoU.
        gt_area = torch.where(object_mask, box_ops.box_area(gt_boxes), torch.inf)[..., None]  # (N, G, 1)
        gt = gt_boxes[:, :, None, :]  # (N, G, 1, 4)
        crowd_weight = crowd_mask[..., None].to(gt_boxes.dtype)  # (N, G, 1)

        num_anchors = anchors.shape[0]
        block = num_anchors
        if _on_cpu(anchors):
            block = max(_BLOCK // max(1, num_images * num_gt), -(-num_anchors // _MAX_BLOCKS), 1)
        coords = anchors.t().contiguous()  # (4, A): each coordinate contiguous, so broadcasts vectorise
        ious, best, ioas = [], [], []
        for start in range(0, num_anchors, block):  # blocks of memory, not a loop over anchors
            a = coords[:, start : start + block].t()  # (S, 4), a coordinate-major view
            anchor_area = box_ops.box_area(a)  # (S,)
            inter, union = box_ops.inter_union(gt, a, gt_area, anchor_area)  # (N, G, S) each
            iou = torch.div(inter, union, out=union)  # (N, G, S): `boxes.iou`, in the union's memory
            ious.append(iou)
            best.append(iou.max(dim=1))  # (N, S), (N, S)
            if has_crowd:
                ioas.append(inter.mul_(crowd_weight).amax(dim=1).div_(anchor_area))  # (N, S)
        best_iou = torch.cat([b.values for b in best], dim=1)  # (N, A)
        best_gt = torch.cat([b.indices for b in best], dim=1)  # (N, A)

        matches = torch.where(best_iou >= self.fg_iou_thresh, best_gt, IGNORE)  # (N, A)
        matches = torch.where(best_iou < self.bg_iou_thresh, BACKGROUND, matches)  # (N, A)

        if self.allow_low_quality_matches:
            highest = torch.stack([iou.amax(dim=2) for iou in ious]).amax(dim=0)  # (N, G)
            # An object that overlaps no anchor at all elects none (torchvision would elect every
            # anchor); padding and crowd rows elect none either. 2 is above every IoU.
            highest = torch.where(object_mask & (highest > 0), highest, 2.0)[..., None]  # (N, G, 1)
            elected = torch.cat([(iou == highest).any(dim=1) for iou in ious], dim=1)  # (N, A)
            matches = torch.where(elected, best_gt, matches)  # (N, A)

        if not has_crowd:
            return matches
        ioa = torch.cat(ioas, dim=1)  # (N, A) intersection over anchor area, largest over crowd rows
        return torch.where((matches == BACKGROUND) & (ioa >= self.fg_iou_thresh), IGNORE, matches)  # (N, A)
