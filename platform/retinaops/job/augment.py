"""The `data.augment:` section of a job spec: training-split augmentation, each transform off unless given.

    augment:
      resize: {min_size: [96, 112, 128], max_size: 213}   # or min_size: [96, 160] with sample: range
      crop: {p: 0.5, min_scale: 0.5, min_visible: 0.25}
      color: {brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.02}

`build_augment` turns it (with data.hflip) into the `retinanet.data.augment.Augment` of one worker.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from retinanet.data.augment import Augment, ColorJitter, RandomCrop, RandomFlip, ResizeShortestEdge, Transform
from retinaops.job.paths import Issue, Section, raise_issues


class ResizeSpec(Section):
    min_size: list[int] = Field(
        description="Shorter sides of training images: one per image from the list (sample: choice), "
        "or [lo, hi] for any integer in lo..hi (sample: range)."
    )
    sample: Literal["choice", "range"] = Field("choice", description="How min_size is drawn.")
    max_size: int | None = Field(None, ge=32, description="Cap on the longer side; None: model.max_size.")

    @model_validator(mode="after")
    def _sizes(self) -> ResizeSpec:
        sizes, issues = self.min_size, []
        if not sizes:
            issues.append(Issue(("min_size",), "expected at least one size, got []"))
        elif any(s < 32 for s in sizes):
            issues.append(Issue(("min_size",), f"expected sizes >= 32 (as model.min_size), got {sizes}"))
        elif self.sample == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
            issues.append(
                Issue(("min_size",), f"expected [lo, hi] with lo <= hi for sample: range, got {sizes}")
            )
        elif self.max_size is not None and self.max_size < max(sizes):
            issues.append(
                Issue(("max_size",), f"must be >= the largest min_size ({max(sizes)}), got {self.max_size}")
            )
        raise_issues(issues)
        return self


class CropSpec(Section):
    p: float = Field(0.5, ge=0, le=1, description="Probability of cropping an image.")
    min_scale: float = Field(
        0.5, gt=0, le=1, description="Crop height and width: fractions in [min_scale, 1]."
    )
    min_visible: float = Field(0.25, ge=0, le=1, description="Drop a box with less of its area in the crop.")


class ColorSpec(Section):
    brightness: float = Field(0.0, ge=0, le=1, description="Brightness factor drawn from [1 - x, 1 + x].")
    contrast: float = Field(0.0, ge=0, le=1, description="Contrast factor drawn from [1 - x, 1 + x].")
    saturation: float = Field(0.0, ge=0, le=1, description="Saturation factor drawn from [1 - x, 1 + x].")
    hue: float = Field(0.0, ge=0, le=0.5, description="Hue shift drawn from [-x, x], in turns.")


class AugmentSpec(Section):
    resize: ResizeSpec | None = Field(None, description="Multi-scale training; None: the model's min_size.")
    crop: CropSpec | None = Field(None, description="Random crop; boxes clipped, mostly-cut ones dropped.")
    color: ColorSpec | None = Field(None, description="Photometric jitter of the image only.")


def build_augment(augment: AugmentSpec, *, hflip: float, max_size: int, seed: int, rank: int) -> Augment:
    """The training transform of worker `rank`: crop, resize, flip, colour (those configured), in that order.

    max_size caps resize when the spec leaves it out (the model's max_size). Crop comes before resize, so
    the network sees the drawn shorter side; a model fed these images needs `resize_in_training = False`
    exactly when `augment.resize` is set.
    """
    transforms: list[Transform] = []
    if augment.crop is not None:
        c = augment.crop
        transforms.append(RandomCrop(c.p, c.min_scale, c.min_visible))
    if augment.resize is not None:
        r = augment.resize
        transforms.append(ResizeShortestEdge(r.min_size, r.max_size or max_size, r.sample))
    if hflip > 0:
        transforms.append(RandomFlip(hflip))
    if augment.color is not None:
        c = augment.color
        transforms.append(ColorJitter(c.brightness, c.contrast, c.saturation, c.hue))
    return Augment(transforms, seed=seed, rank=rank)
