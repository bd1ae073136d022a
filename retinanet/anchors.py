"""Anchor grid over the FPN levels, cached by feature shape, dtype and device.

Legend: A anchors over all levels, K anchors per location (scales x aspect ratios).
Order matches torchvision's `AnchorGenerator`, so head outputs line up with either:
level-major, then row, column, then aspect ratio, then scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(
    size: float, scales: Sequence[float], aspect_ratios: Sequence[float], rounding: str
) -> Tensor:
    """The K anchors centred on (0, 0) for one level, xyxy. Aspect ratio is height / width."""
    if rounding == "torchvision":
        # torchvision builds sizes as int(size * scale) and rounds the corners.
        sizes = torch.tensor([float(int(size * s)) for s in scales])  # (S,)
    else:
        sizes = torch.tensor([size * s for s in scales], dtype=torch.float64)  # (S,)
    ratios = torch.as_tensor(aspect_ratios, dtype=sizes.dtype)  # (R,)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)  # (K,)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)  # (K,)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # (K, 4)
    return base.round() if rounding == "torchvision" else base.float()


class AnchorGenerator(nn.Module):
    """Anchors for a padded batch: one (A, 4) grid shared by every image of it."""

    def __init__(
        self,
        sizes: Sequence[float],
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        *,
        rounding: str = "none",
    ) -> None:
        super().__init__()
        self.cells = [cell_anchors(s, scales, aspect_ratios, rounding) for s in sizes]
        self.num_anchors_per_location = len(scales) * len(aspect_ratios)
        self._cache: dict[tuple, Tensor] = {}

    def forward(
        self, image_hw: tuple[int, int], feature_hw: Sequence[tuple[int, int]], like: Tensor
    ) -> Tensor:
        """All anchors (A, 4) for a padded batch of size image_hw with features of sizes feature_hw."""
        key = (tuple(image_hw), tuple(map(tuple, feature_hw)), like.dtype, like.device)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._grid(image_hw, feature_hw, like.dtype, like.device)
            if len(self._cache) > 32:  # many distinct sizes (eval on raw images): keep memory bounded
                self._cache.clear()
            self._cache[key] = cached
        return cached

    def num_anchors_per_level(self, feature_hw: Sequence[tuple[int, int]]) -> list[int]:
        return [h * w * self.num_anchors_per_location for h, w in feature_hw]

    def _grid(self, image_hw, feature_hw, dtype, device) -> Tensor:
        levels = []
        for (h, w), cell in zip(feature_hw, self.cells, strict=True):
            # Integer strides as torchvision computes them (padded size // feature size).
            stride_h, stride_w = image_hw[0] // h, image_hw[1] // w
            shift_x = torch.arange(w, dtype=torch.int32, device=device) * stride_w  # (W,)
            shift_y = torch.arange(h, dtype=torch.int32, device=device) * stride_h  # (H,)
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # (H, W)
            shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4).to(dtype)  # (H*W, 1, 4)
            levels.append((shifts + cell.to(device=device, dtype=dtype)[None]).reshape(-1, 4))  # (H*W*K, 4)
        return torch.cat(levels)  # (A, 4)
