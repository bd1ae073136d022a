"""Training augmentation with reproducible draws: multi-scale resize, random crop, flip, colour jitter.

Legend: M objects of one image, C channels, H/W heights and widths in pixels. Boxes are xyxy in pixels.

Each transform is called as `transform(image, target, generator)` on an image (C, H, W) float in [0, 1] and
a CocoDataset target, and draws its random numbers from `generator` only. The geometric ones move `boxes`
with the pixels and keep the per-object fields (`OBJECT_FIELDS`) aligned with them; they work for any C.
`Augment` chains them as a CocoDataset transform and seeds one generator per transform and image from
(seed, rank, epoch, image_id), so an image's augmentation does not depend on the DataLoader worker that
loads it, on the number of workers or on the order images come in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from retinanet.data.transforms import hflip, resize, scale_boxes

OBJECT_FIELDS = ("boxes", "labels", "iscrowd", "area")
"""Target fields with one row per object: a crop drops their rows together."""


class Transform(Protocol):
    def __call__(self, image: Tensor, target: dict, generator: torch.Generator) -> tuple[Tensor, dict]: ...


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi], both inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


class ResizeShortestEdge:
    """Multi-scale training, as detectron2's ResizeShortestEdge: the shorter side becomes a size drawn from
    min_sizes ("choice": one of them; "range": an integer in [min_sizes[0], min_sizes[1]]), the longer side
    at most max_size. The image is resized and the boxes scaled exactly as `RetinaNet.preprocess` does, so
    a model with `resize_in_training = False` trains at the drawn scale; `area` scales with the image.
    """

    def __init__(
        self, min_sizes: Sequence[int], max_size: int, sample: Literal["choice", "range"] = "choice"
    ) -> None:
        sizes = list(min_sizes)
        if sample not in ("choice", "range"):
            raise ValueError(f"ResizeShortestEdge.sample: expected 'choice' or 'range', got {sample!r}")
        if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
            raise ValueError(f"ResizeShortestEdge.min_sizes: expected positive integers, got {sizes!r}")
        if sample == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
            raise ValueError(f"ResizeShortestEdge.min_sizes: expected [lo, hi] with lo <= hi, got {sizes!r}")
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"ResizeShortestEdge.max_size: expected a positive integer, got {max_size!r}")
        self.min_sizes, self.max_size, self.sample = sizes, max_size, sample

    def draw(self, generator: torch.Generator) -> int:
        if self.sample == "range":
            return _randint(generator, self.min_sizes[0], self.min_sizes[1])
        return self.min_sizes[_randint(generator, 0, len(self.min_sizes) - 1)]

    def __call__(self, image: Tensor, target: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        before = (image.shape[-2], image.shape[-1])
        image = resize(image, self.draw(generator), self.max_size)  # (C, H', W')
        after = (image.shape[-2], image.shape[-1])
        target = dict(target)
        target["boxes"] = scale_boxes(target["boxes"], before, after)  # (M, 4)
        if "area" in target:
            target["area"] = target["area"] * (after[0] * after[1] / (before[0] * before[1]))  # (M,)
        return image, target


class RandomCrop:
    """With probability p, a window whose height and width are fractions in [min_scale, 1] of the image's,
    anywhere inside it. Boxes are shifted into the window and clipped to it; a box under 1 px wide or high
    after clipping, or with less than min_visible of its area inside, is dropped with its row of every
    per-object field. `area` shrinks with the visible part of the box. An image may end with no objects.
    """

    def __init__(self, p: float = 0.5, min_scale: float = 0.5, min_visible: float = 0.25) -> None:
        for name, value, low_ok in (
            ("p", p, True),
            ("min_scale", min_scale, False),
            ("min_visible", min_visible, True),
        ):
            if not isinstance(value, (int, float)) or not (0 <= value <= 1 if low_ok else 0 < value <= 1):
                expected = "[0, 1]" if low_ok else "(0, 1]"
                raise ValueError(f"RandomCrop.{name}: expected a number in {expected}, got {value!r}")
        self.p, self.min_scale, self.min_visible = float(p), float(min_scale), float(min_visible)

    def window(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int] | None:
        """(x0, y0, crop_w, crop_h) in pixels, or None for no crop."""
        if _uniform(generator, 0.0, 1.0) >= self.p:
            return None
        crop_h = max(1, round(height * _uniform(generator, self.min_scale, 1.0)))
        crop_w = max(1, round(width * _uniform(generator, self.min_scale, 1.0)))
        y0, x0 = _randint(generator, 0, height - crop_h), _randint(generator, 0, width - crop_w)
        return x0, y0, crop_w, crop_h

    def __call__(self, image: Tensor, target: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        window = self.window(image.shape[-2], image.shape[-1], generator)
        if window is None:
            return image, target
        x0, y0, crop_w, crop_h = window
        image = image[:, y0 : y0 + crop_h, x0 : x0 + crop_w]  # (C, crop_h, crop_w)
        boxes = target["boxes"]  # (M, 4)
        offset = boxes.new_tensor([x0, y0, x0, y0])  # (4,)
        limit = boxes.new_tensor([crop_w, crop_h, crop_w, crop_h])  # (4,)
        clipped = (boxes - offset).clamp(min=0).minimum(limit)  # (M, 4)
        wh = clipped[:, 2:] - clipped[:, :2]  # (M, 2)
        visible = wh.prod(-1)  # (M,)
        whole = (boxes[:, 2:] - boxes[:, :2]).prod(-1)  # (M,)
        keep_mask = (wh >= 1).all(-1) & (visible >= self.min_visible * whole)  # (M,)
        target = {**target, "boxes": clipped}
        if "area" in target:
            target["area"] = target["area"] * (visible / whole.clamp(min=1e-12))  # (M,)
        for key in OBJECT_FIELDS:
            if key in target:
                target[key] = target[key][keep_mask]  # (M', ...)
        return image.contiguous(), target


class RandomFlip:
    """With probability p, mirror the image and its boxes left to right."""

    def __init__(self, p: float = 0.5) -> None:
        if not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"RandomFlip.p: expected a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image: Tensor, target: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        if _uniform(generator, 0.0, 1.0) < self.p:
            return hflip(image, target)
        return image, target


class ColorJitter:
    """Photometric jitter of an RGB image (3, H, W), boxes untouched: brightness, contrast and saturation
    factors drawn from [1 - x, 1 + x], a hue shift from [-hue, hue] (in turns of the colour wheel), applied
    in that order as torchvision's functional adjust_* do; 0 leaves that property alone."""

    def __init__(
        self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0
    ) -> None:
        ranges = {
            "brightness": (brightness, 1.0),
            "contrast": (contrast, 1.0),
            "saturation": (saturation, 1.0),
        }
        for name, (value, hi) in (ranges | {"hue": (hue, 0.5)}).items():
            if not isinstance(value, (int, float)) or not 0 <= value <= hi:
                raise ValueError(f"ColorJitter.{name}: expected a number in [0, {hi}], got {value!r}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image: Tensor, target: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        if image.shape[0] != 3:
            raise ValueError(f"ColorJitter: expected an RGB image (3, H, W), got {tuple(image.shape)}")
        for amount, adjust in (
            (self.brightness, TF.adjust_brightness),
            (self.contrast, TF.adjust_contrast),
            (self.saturation, TF.adjust_saturation),
        ):
            if amount > 0:
                image = adjust(image, _uniform(generator, 1 - amount, 1 + amount))  # (3, H, W)
        if self.hue > 0:
            image = TF.adjust_hue(image, _uniform(generator, -self.hue, self.hue))  # (3, H, W)
        return image, target


class Augment:
    """A CocoDataset transform for the training split: `transforms` in order, each with its own generator.

    The generator of a transform for an image is seeded from (seed, rank, epoch, target["image_id"], the
    transform's class name and how many of that class came before it): the same four give the same output,
    and switching one transform on or off leaves the draws of the others as they were. `set_epoch` writes
    the epoch into shared memory, so DataLoader workers (persistent ones included) see it; call it before
    iterating the loader for that epoch.
    """

    def __init__(self, transforms: Sequence[Transform], *, seed: int = 0, rank: int = 0) -> None:
        self.transforms = list(transforms)
        self.seed, self.rank = int(seed), int(rank)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # read by every loader worker
        names = [type(t).__name__ for t in self.transforms]
        self._streams = [f"{name}{names[:i].count(name)}" for i, name in enumerate(names)]

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def generator(self, image_id: Any, stream: str) -> torch.Generator:
        key = repr((self.seed, self.rank, self.epoch, image_id, stream)).encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator().manual_seed(seed)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if "image_id" not in target:
            raise ValueError("Augment: the target has no 'image_id', which keys the image's random draws")
        for transform, stream in zip(self.transforms, self._streams, strict=True):
            image, target = transform(image, target, self.generator(target["image_id"], stream))
        return image, target
