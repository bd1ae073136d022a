"""Anchor-to-object assignment for a whole batch at once.

Legend: N images, G padded ground-truth boxes, A anchors.
Result per anchor: the index of its object in [0, G), BACKGROUND (-1) or IGNORE (-2).
Same rules as torchvision's `Matcher(0.5, 0.4, allow_low_quality_matches=True)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retinanet.boxes import box_area, pairwise_intersection

BACKGROUND = -1
IGNORE = -2


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
        inter = pairwise_intersection(gt_boxes, anchors)  # (N, G, A)
        anchor_area = box_area(anchors)  # (A,)
        union = box_area(gt_boxes)[..., None] + anchor_area - inter  # (N, G, A)
        object_mask = gt_valid & ~gt_crowd  # (N, G)
        # Padding and crowd rows can never win: IoU -1 is below every threshold.
        iou = torch.where(object_mask[..., None], inter / union, -1.0)  # (N, G, A)
        best_iou, best_gt = iou.max(dim=1)  # (N, A), (N, A)

        matches = torch.where(best_iou >= self.fg_iou_thresh, best_gt, IGNORE)  # (N, A)
        matches = torch.where(best_iou < self.bg_iou_thresh, BACKGROUND, matches)  # (N, A)

        if self.allow_low_quality_matches:
            highest = iou.max(dim=2, keepdim=True).values  # (N, G, 1)
            # An object that overlaps no anchor at all elects none (torchvision would elect every anchor).
            elected = (iou == highest) & object_mask[..., None] & (highest > 0)  # (N, G, A)
            matches = torch.where(elected.any(dim=1), best_gt, matches)  # (N, A)

        crowd_mask = gt_valid & gt_crowd  # (N, G)
        ioa = torch.where(crowd_mask[..., None], inter / anchor_area, 0.0).amax(dim=1)  # (N, A)
        return torch.where((matches == BACKGROUND) & (ioa >= self.fg_iou_thresh), IGNORE, matches)  # (N, A)
