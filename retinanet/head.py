"""Class and box subnets, shared across FPN levels (Lin et al. 2017, fig. 3).

Legend: N images, A anchors over all levels, K anchors per location, C classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _subnet(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers = []
    for _ in range(num_convs):
        block = [nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none")]
        if norm == "group_norm":
            block.append(nn.GroupNorm(32, channels))
        block.append(nn.ReLU(inplace=True))
        layers.append(nn.Sequential(*block))
    return nn.Sequential(*layers)


def _flatten(x: Tensor, width: int) -> Tensor:
    """(N, K * width, H, W) -> (N, H * W * K, width): the anchor order of `AnchorGenerator`."""
    n, _, h, w = x.shape
    return x.view(n, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, width)


class RetinaNetHead(nn.Module):
    """Returns cls_logits (N, A, C), one sigmoid logit per class (background is implicit), and
    bbox_regression (N, A, 4), box transforms relative to each anchor."""

    def __init__(
        self, channels: int, num_anchors: int, num_classes: int, *, num_convs: int, norm: str, prior: float
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_subnet = _subnet(channels, num_convs, norm)
        self.bbox_subnet = _subnet(channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Every class starts at probability `prior`, so the many easy negatives do not swamp the
        # first iterations (the paper's section 4.1).
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        cls_logits, bbox_regression = [], []
        for x in features:  # the 5 levels share weights
            cls_logits.append(_flatten(self.cls_logits(self.cls_subnet(x)), self.num_classes))  # (N, A_l, C)
            bbox_regression.append(_flatten(self.bbox_pred(self.bbox_subnet(x)), 4))  # (N, A_l, 4)
        return torch.cat(cls_logits, dim=1), torch.cat(bbox_regression, dim=1)  # (N, A, C), (N, A, 4)
