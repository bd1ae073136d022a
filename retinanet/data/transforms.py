"""Image transforms: resize, normalise, pad to a batch; horizontal flip; the dataloader collate; uint8 images
for loader worker processes.

Legend: N images, M objects of one image, H/W heights and widths in pixels.
Boxes are xyxy in pixels throughout.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor that brings the shorter side to min_size without the longer exceeding max_size."""
    short, long = min(height, width), max(height, width)
    return min(min_size / short, max_size / long)


def resize(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """Bilinear resize of a (3, H, W) image, computed exactly as torchvision's detection transform."""
    scale = resize_scale(image.shape[-2], image.shape[-1], min_size, max_size)
    if scale == 1.0:
        return image
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]  # (3, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device)[:, None, None]  # (3, 1, 1)
    return (image - mean_t) / std_t


def batch_images(images: Sequence[Tensor], size_divisible: int) -> Tensor:
    """Zero-pad images at the bottom/right to one (N, 3, H, W) tensor, H and W multiples of size_divisible."""
    max_h = max(img.shape[-2] for img in images)
    max_w = max(img.shape[-1] for img in images)
    pad_h = int(math.ceil(max_h / size_divisible) * size_divisible)
    pad_w = int(math.ceil(max_w / size_divisible) * size_divisible)
    batch = images[0].new_zeros((len(images), images[0].shape[0], pad_h, pad_w))  # (N, 3, H, W)
    for i, img in enumerate(images):  # ragged inputs: one copy per image
        batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch


def scale_boxes(boxes: Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Tensor:
    """Map xyxy boxes from an image of size from_hw to one of size to_hw."""
    ratio_h = to_hw[0] / from_hw[0]
    ratio_w = to_hw[1] / from_hw[1]
    ratios = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=boxes.dtype, device=boxes.device)
    return boxes * ratios


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror a (3, H, W) image and its target's xyxy boxes left to right."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()  # (M, 4)
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    return image.flip(-1), target


class RandomHorizontalFlip:
    """Training augmentation: flip image and boxes with probability p."""

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip.p: expected a probability in [0, 1], got {p!r}")
        self.p = p
        self._rng = random.Random(seed)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if self._rng.random() < self.p:
            return hflip(image, target)
        return image, target


def collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """DataLoader collate: images of different sizes stay a list; the model resizes and pads them."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def to_uint8(image: Tensor) -> Tensor:
    """A float image in [0, 1] as uint8 (rounded): exact for pixels decoded from 8-bit files and flipped,
    within half a grey level after resizing or colour jitter. A quarter of the bytes to send."""
    return image.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def to_float(image: Tensor) -> Tensor:
    """A uint8 image as float in [0, 1] (what the model takes); a float image as it is."""
    return image.float().div_(255) if image.dtype == torch.uint8 else image


class AsUint8(torch.utils.data.Dataset):
    """dataset[i] with its image as uint8 (`to_uint8`), for a DataLoader with worker processes: each
    image crosses from the worker as shared memory, and at 800 px a float32 one costs more to send than to
    decode (benchmarks/INPUT.md). The training loop turns it back with `to_float`."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, target = self.dataset[index]
        return to_uint8(image), target


def same_size_batches(
    sizes: Sequence[tuple[int, int]], batch_size: int, indices: Sequence[int] | None = None
) -> list[list[int]]:
    """Batches of `indices` (default: all) whose images share one (height, width), in first-seen order.

    For evaluation: a batch of mixed sizes is zero-padded to its largest image, and GroupNorm (in the
    head, or the body with backbone_norm=group_norm) then counts the padding in each image's statistics,
    so an image's detections would depend on the images batched with it. Same-size batches need no
    padding beyond size_divisible, and give every batch size the same detections.
    """
    if batch_size < 1:
        raise ValueError(f"same_size_batches: batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(sizes)) if indices is None else indices:
        groups.setdefault(tuple(sizes[i]), []).append(i)
    return [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
