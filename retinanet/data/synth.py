"""A deterministic synthetic COCO-format dataset: coloured shapes on noisy gradients.

Objects span COCO's small (area < 32^2), medium and large (> 96^2) ranges so every FPN level gets work;
every tenth image is empty; about a third of the images are not square; category ids are odd on purpose
(1, 3, 5, ...) so that code assuming contiguous ids fails here first. Same arguments, same bytes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from retinanet.layout import split_file

logger = logging.getLogger(__name__)

SHAPES = ("rectangle", "ellipse", "triangle", "cross", "ring", "diamond", "star", "hexagon")
# Side lengths in pixels per COCO size range; the top of "large" is set by the image.
SIDES = {"small": (8, 28), "medium": (40, 88), "large": (110, None)}
SIZE_PROBS = (0.45, 0.35, 0.2)  # small, medium, large
MIN_IMAGE_SIZE = 64
MAX_OBJECTS = 5
PLACEMENT_TRIES = 30


def shape_mask(kind: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of shape `kind` drawn to fill a width x height box."""
    if kind not in SHAPES:
        raise ValueError(f"shape_mask: kind: expected one of {'|'.join(SHAPES)}, got {kind!r}")
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    w, h = width - 1, height - 1  # PIL's boxes include their last pixel
    if kind == "rectangle":
        draw.rectangle((0, 0, w, h), fill=255)
    elif kind == "ellipse":
        draw.ellipse((0, 0, w, h), fill=255)
    elif kind == "triangle":
        draw.polygon([(w / 2, 0), (w, h), (0, h)], fill=255)
    elif kind == "cross":
        draw.rectangle((0, h / 3, w, 2 * h / 3), fill=255)
        draw.rectangle((w / 3, 0, 2 * w / 3, h), fill=255)
    elif kind == "ring":
        thickness = max(2, min(width, height) // 5)
        draw.ellipse((0, 0, w, h), fill=255)
        draw.ellipse((thickness, thickness, w - thickness, h - thickness), fill=0)
    elif kind == "diamond":
        draw.polygon([(w / 2, 0), (w, h / 2), (w / 2, h), (0, h / 2)], fill=255)
    elif kind == "star":  # five points, stretched so that its tips touch all four sides of the box
        radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
        xs = [r * math.cos(-math.pi / 2 + k * math.pi / 5) for k, r in enumerate(radii)]
        ys = [r * math.sin(-math.pi / 2 + k * math.pi / 5) for k, r in enumerate(radii)]
        points = [
            (w * (x - min(xs)) / (max(xs) - min(xs)), h * (y - min(ys)) / (max(ys) - min(ys)))
            for x, y in zip(xs, ys, strict=True)
        ]
        draw.polygon(points, fill=255)
    else:  # hexagon
        draw.polygon(
            [(w / 4, 0), (3 * w / 4, 0), (w, h / 2), (3 * w / 4, h), (w / 4, h), (0, h / 2)], fill=255
        )
    return np.array(mask) > 0  # (height, width)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear gradient between two random colours in a random direction, as float (H, W, 3)."""
    c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)  # (3,), (3,)
    angle = rng.uniform(0.0, 2 * math.pi)
    ramp = (
        math.cos(angle) * np.arange(width, dtype=np.float32)[None, :]
        + math.sin(angle) * np.arange(height, dtype=np.float32)[:, None]
    )  # (H, W)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    return c0 + (c1 - c0) * ramp[..., None]  # (H, W, 3)


def _sample_size(
    rng: np.random.Generator, height: int, width: int, sides: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(box width, box height) of one object: from the small, medium or large range, or, with `sides`
    (low, high), log-uniformly from that range (capped by the image)."""
    room = int(0.75 * min(height, width))
    if sides is not None:
        low, high = sides[0], min(sides[1], room)
        side = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        other = int(np.clip(round(side * rng.uniform(0.7, 1.4)), low, high))
        return (side, other) if rng.random() < 0.5 else (other, side)
    kind = str(rng.choice(list(SIDES), p=SIZE_PROBS))
    low, high = SIDES[kind]
    high = room if high is None else min(high, room)
    if high < low:  # no room for this size in a small image
        low, high = SIDES["small"]
    side = int(rng.integers(low, high + 1))
    other = int(np.clip(round(side * rng.uniform(0.7, 1.4)), low, high))
    return (side, other) if rng.random() < 0.5 else (other, side)


def _place(
    rng: np.random.Generator, taken: list[tuple[int, int, int, int]], bw: int, bh: int, size: tuple[int, int]
) -> tuple[int, int] | None:
    """Top-left corner of a bw x bh box not touching any taken (x0, y0, x1, y1) box, or None."""
    height, width = size
    for _ in range(PLACEMENT_TRIES):
        x, y = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        # A 2-pixel gap keeps shapes unoccluded, so each box stays tight around what is visible.
        if all(x + bw + 2 <= a or c + 2 <= x or y + bh + 2 <= b or d + 2 <= y for a, b, c, d in taken):
            return x, y
    return None


def _make_image(
    rng: np.random.Generator,
    size: tuple[int, int],
    num_classes: int,
    empty: bool,
    sides: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image as uint8 (H, W, 3) and its objects as (label, tight xywh box) pairs."""
    height, width = size
    pixels = _background(rng, height, width)  # (H, W, 3)
    objects: list[tuple[int, list[float]]] = []
    taken: list[tuple[int, int, int, int]] = []
    num_objects = 0 if empty else int(rng.integers(1, MAX_OBJECTS + 1))
    sizes = [_sample_size(rng, height, width, sides) for _ in range(num_objects)]
    for bw, bh in sorted(sizes, key=lambda s: -s[0] * s[1]):  # big first: they are the hardest to fit
        corner = _place(rng, taken, bw, bh, size)
        if corner is None:
            continue
        x, y = corner
        label = int(rng.integers(num_classes))
        mask = shape_mask(SHAPES[label], bw, bh)  # (bh, bw)
        region = pixels[y : y + bh, x : x + bw]  # (bh, bw, 3), a view
        colour = rng.integers(0, 256, size=3).astype(np.float32)  # (3,)
        for _ in range(10):  # keep the shape visible against the background under it
            if np.abs(colour - region.mean(axis=(0, 1))).sum() > 150:
                break
            colour = rng.integers(0, 256, size=3).astype(np.float32)
        region[mask] = colour
        ys, xs = np.nonzero(mask)
        x0, y0 = x + int(xs.min()), y + int(ys.min())
        box = [float(x0), float(y0), float(x + int(xs.max()) + 1 - x0), float(y + int(ys.max()) + 1 - y0)]
        objects.append((label, box))
        taken.append((x, y, x + bw, y + bh))
    # Uniform noise in [-15, 15): as good a nuisance as Gaussian noise, and cheaper (benchmarks/TUNING.md).
    pixels += 30.0 * rng.random(size=pixels.shape, dtype=np.float32) - 15.0  # (H, W, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8), objects


def _write_split(
    out_dir: Path,
    split: str,
    num_images: int,
    num_classes: int,
    image_size: int,
    seed: int,
    sides: tuple[int, int] | None,
    params: dict[str, Any],
) -> None:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        long, draw = round(image_size * 1.25), rng.random()
        size = (image_size, image_size)  # (H, W): two thirds square, a sixth wide, a sixth tall
        if draw < 1 / 3:
            size = (image_size, long) if draw < 1 / 6 else (long, image_size)
        pixels, objects = _make_image(rng, size, num_classes, empty=i % 10 == 9, sides=sides)
        file_name = f"images/{split}_{i + 1:06d}.png"
        # Noise barely compresses: level 0, faster for slightly bigger files (benchmarks/TUNING.md).
        Image.fromarray(pixels).save(out_dir / file_name, format="PNG", compress_level=0)
        images.append({"id": i + 1, "file_name": file_name, "width": size[1], "height": size[0]})
        for label, box in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 2 * label + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 2 * k + 1, "name": SHAPES[k], "supercategory": "shape"} for k in range(num_classes)]
    coco = {
        "info": {"description": "retinanet synthetic shapes", "seed": seed, "split": split, "params": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    split_file(out_dir, split).write_text(json.dumps(coco) + "\n")


def synth_params(
    num_train: int,
    num_val: int,
    num_classes: int,
    image_size: int,
    seed: int,
    object_sizes: tuple[int, int] | list[int] | None,
) -> dict[str, Any]:
    """The arguments a set was made with, as its JSON files record them under info.params."""
    return {
        "num_train": num_train,
        "num_val": num_val,
        "num_classes": num_classes,
        "image_size": image_size,
        "seed": seed,
        "object_sizes": list(object_sizes) if object_sizes is not None else None,
    }


def recorded_params(out_dir: str | Path) -> dict[str, Any] | None:
    """The synth_params a set in out_dir was made with; None when its train.json records none."""
    try:
        info = json.loads(split_file(out_dir, "train").read_text()).get("info", {})
    except (OSError, ValueError, AttributeError):
        return None
    params = info.get("params") if isinstance(info, dict) else None
    return params if isinstance(params, dict) else None


def make_synthetic_coco(
    out_dir: str | Path,
    *,
    num_train: int = 64,
    num_val: int = 16,
    num_classes: int = 3,
    image_size: int = 256,
    seed: int = 0,
    object_sizes: tuple[int, int] | None = None,
) -> Path:
    """Write out_dir/train.json, out_dir/val.json and PNGs under out_dir/images/; return out_dir.

    file_names are relative to out_dir (load with `CocoDataset.from_dir(out_dir, "train")`). Images are
    image_size square, or image_size by 1.25 * image_size either way. Category k (label k) is SHAPES[k]
    with COCO id 2k + 1. Boxes are the tight xywh boxes of the drawn shapes, area = w * h, iscrowd 0.
    object_sizes (low, high): draw object sides log-uniformly from low..high pixels (capped at 3/4 of
    the image) instead of COCO's small/medium/large mix, e.g. to match the anchors of a small model.
    """
    for name, value, low, high in (
        ("num_train", num_train, 1, None),
        ("num_val", num_val, 1, None),
        ("num_classes", num_classes, 1, len(SHAPES)),  # one class per shape
        ("image_size", image_size, MIN_IMAGE_SIZE, None),
        ("seed", seed, 0, None),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
            expected = f"an integer >= {low}" + (f" and <= {high} ({', '.join(SHAPES)})" if high else "")
            raise ValueError(f"make_synthetic_coco: {name}: expected {expected}, got {value!r}")
    sides = None
    if object_sizes is not None:
        ok = (
            isinstance(object_sizes, (tuple, list))
            and len(object_sizes) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in object_sizes)
            and 4 <= object_sizes[0] <= object_sizes[1] <= 0.75 * image_size
        )
        if not ok:
            raise ValueError(
                "make_synthetic_coco: object_sizes: expected two integers 4 <= low <= high <= "
                f"{int(0.75 * image_size)} (3/4 of image_size), got {object_sizes!r}"
            )
        sides = (int(object_sizes[0]), int(object_sizes[1]))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    params = synth_params(num_train, num_val, num_classes, image_size, seed, object_sizes)
    _write_split(out, "train", num_train, num_classes, image_size, seed, sides, params)
    _write_split(out, "val", num_val, num_classes, image_size, seed, sides, params)
    logger.info("wrote %d train and %d val synthetic images to %s", num_train, num_val, out)
    return out
