"""COCO-format detection data: validate every record, then serve (image, target) pairs.

Legend: N images, A annotations of the whole set, M objects of one image, H/W image height and width.
Targets follow torchvision: `boxes` xyxy in pixels of the original image, `labels` contiguous in
[0, num_classes), sorted by COCO category id. Validation names every defect; nothing is skipped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from retinanet.data.images import MAX_IMAGE_PIXELS, read_image
from retinanet.data.validate import Problem, ValidationReport, Validator, read_json
from retinanet.layout import split_file

__all__ = ["CocoDataset", "Problem", "ValidationReport", "coco_subset", "load_coco", "read_image"]

logger = logging.getLogger(__name__)


def load_coco(
    annotations_path: str | Path,
    images_dir: str | Path,
    *,
    strict: bool = False,
    check_images: bool | Literal["exists"] = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    drop_image_ids: Collection[int] = (),
    listed: Collection[str] | None = None,
    source: str | None = None,
) -> tuple[dict[str, Any], ValidationReport]:
    """Validate a COCO detection file; return the cleaned COCO dict and the report.

    The cleaned dict keeps the original ids and only the kept images, annotations and categories; each
    annotation has `area` and `iscrowd` (filled when missing) and its bbox clipped to the image, so it can
    serve as pycocotools ground truth; `segmentation` is left out everywhere (read_json says why). With
    strict, any problem raises ValueError listing them; otherwise bad records are dropped, counted and
    logged as a warning. A file left with no images always raises. A file_name that leaves images_dir
    (absolute, or `..` out of it) is always a problem. check_images: True decodes every image file in
    full (images.py: orientation, size, max_image_pixels); "exists" only checks that each file exists,
    opening none (one listing per folder: fast at COCO scale, blind to a file's size, format and
    truncation); False looks at no file. drop_image_ids are dropped as they are, unchecked (those a check
    of the files found bad before). listed: with "exists", the names (relative to images_dir, '/'-separated)
    of the files that exist, for images not in a local folder (an S3 listing); images_dir then only names
    them in messages. source: how messages name the annotation file (default: its path), e.g. the s3:// URI
    of a cached copy.
    """
    if not 0 < max_image_pixels <= MAX_IMAGE_PIXELS:
        raise ValueError(f"max_image_pixels: expected 1 to {MAX_IMAGE_PIXELS}, got {max_image_pixels}")
    if check_images not in (True, False, "exists"):
        raise ValueError(f"check_images: expected True, False or 'exists', got {check_images!r}")
    report = ValidationReport(file=source or str(annotations_path))
    data = read_json(Path(annotations_path), report.file)
    checks = Validator(report)
    checks.check_categories(data["categories"])
    checks.check_images(data["images"])
    for iid in drop_image_ids:
        if checks.images.pop(iid, None) is not None:
            report.dropped_images["dropped as asked"] += 1
    if check_images == "exists":
        checks.check_image_files_exist(images_dir if listed is not None else Path(images_dir), listed=listed)
    elif check_images:
        checks.check_image_files(Path(images_dir), max_image_pixels)
    annotations = checks.check_annotations(data["annotations"])
    report.num_images, report.num_annotations = len(checks.images), len(annotations)
    if strict:
        report.raise_if_problems()
    if not checks.images or not checks.categories:
        what = "images" if not checks.images else "categories"
        raise ValueError(
            f"{report.file}: {what}: expected at least one usable entry, got none\n{report.summary()}"
        )
    if report.problems or report.num_dropped:
        logger.warning("%s", report.summary())
    cleaned = {
        **{k: v for k, v in data.items() if k not in ("images", "annotations", "categories")},
        "images": list(checks.images.values()),
        "annotations": annotations,
        "categories": list(checks.categories.values()),
    }
    return cleaned, report


def coco_subset(coco: dict[str, Any], keep: Callable[[int], bool]) -> dict[str, Any]:
    """The COCO dict with only the images whose id `keep` accepts, and their annotations."""
    return {
        **coco,
        "images": [im for im in coco["images"] if keep(im["id"])],
        "annotations": [a for a in coco.get("annotations") or [] if keep(a["image_id"])],
    }


class CocoDataset(torch.utils.data.Dataset):
    """COCO detection data as (image, target) pairs at the original image size; the model resizes.

    image: float32 (3, H, W) RGB in [0, 1]. target: `boxes` float32 (M, 4) xyxy pixels clipped to the image,
    `labels` int64 (M,) in [0, num_classes), `iscrowd` bool (M,), `image_id` int (the COCO id).
    Layout: `CocoDataset("annotations/instances_val2017.json", "val2017")`, or `from_dir` below.
    `transform(image, target) -> (image, target)` runs last. `coco` is the cleaned dict of load_coco,
    `report` its ValidationReport (None with `from_coco`); check_images as load_coco's. Images are decoded
    as images.py says: EXIF orientation applied to fit the recorded size, over max_image_pixels refused.
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        *,
        strict: bool = False,
        transform: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None,
        check_images: bool | Literal["exists"] = True,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        coco: dict[str, Any] | None = None,
    ) -> None:
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images)
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        self.report: ValidationReport | None = None  # None: built from a cleaned dict (from_coco)
        if coco is None:
            coco, self.report = load_coco(
                annotations,
                images,
                strict=strict,
                check_images=check_images,
                max_image_pixels=max_image_pixels,
            )
        self.coco = coco
        categories = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [c["name"] for c in categories]
        self.num_classes = len(categories)
        self.category_id_to_label = {cid: label for label, cid in enumerate(self.category_ids)}
        images_sorted = sorted(self.coco["images"], key=lambda img: img["id"])
        self.image_ids: list[int] = [img["id"] for img in images_sorted]
        self._file_names: list[str] = [img["file_name"] for img in images_sorted]  # Paths made when read
        self._sizes = [(img["height"], img["width"]) for img in images_sorted]
        # Flat arrays and offsets, not per-image tensors: cheap to copy into DataLoader workers. Built by
        # np.fromiter and one stable sort by image (file order within an image): ~1M annotations at COCO
        # scale, so no per-annotation lists or dicts in between.
        anns = self.coco["annotations"]
        position = {iid: i for i, iid in enumerate(self.image_ids)}
        image_idx = np.fromiter((position[a["image_id"]] for a in anns), np.int64, len(anns))  # (A,)
        order = np.argsort(image_idx, kind="stable")  # (A,)
        values = chain.from_iterable(a["bbox"] for a in anns)
        xywh = np.fromiter(values, np.float64, 4 * len(anns)).reshape(-1, 4)[order]  # (A, 4)
        self._boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        labels = (self.category_id_to_label[a["category_id"]] for a in anns)
        self._labels = np.fromiter(labels, np.int64, len(anns))[order]  # (A,)
        self._iscrowd = np.fromiter((a["iscrowd"] for a in anns), bool, len(anns))[order]  # (A,)
        counts = np.bincount(image_idx, minlength=len(self.image_ids))  # (N,)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])  # (N + 1,)

    @classmethod
    def from_coco(
        cls, coco: dict[str, Any], images: str | Path, *, source: str | Path, **kwargs: Any
    ) -> CocoDataset:
        """The dataset of a dict load_coco already cleaned (validated elsewhere, once): nothing is checked
        again. source names the annotation file it came from, in messages."""
        return cls(source, images, coco=coco, **kwargs)

    @classmethod
    def from_dir(cls, root: str | Path, split: str = "train", **kwargs: Any) -> CocoDataset:
        """`split_file(root, split)` with file_names relative to root (as make_synthetic_coco writes)."""
        return cls(split_file(root, split), root, **kwargs)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each image as the annotations record it, in dataset order."""
        return list(self._sizes)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.image_ids[index]
        (h, w), path = self._sizes[index], self.images_dir / self._file_names[index]
        image = read_image(
            path, image_id=image_id, size=(w, h), max_pixels=self.max_image_pixels
        )  # (3, H, W)
        if tuple(image.shape[-2:]) != self._sizes[index]:
            got_h, got_w = image.shape[-2:]
            raise ValueError(
                f"{path} (image {image_id}): recorded width x height {w}x{h} in "
                f"{self.annotations_path} differs from the decoded {got_w}x{got_h}"
            )
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        target = {
            "boxes": torch.from_numpy(self._boxes[lo:hi].copy()),  # (M, 4)
            "labels": torch.from_numpy(self._labels[lo:hi].copy()),  # (M,)
            "iscrowd": torch.from_numpy(self._iscrowd[lo:hi].copy()),  # (M,)
            "image_id": image_id,
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target
