"""COCO records checked one by one: every problem named by file, id and field, the bad ones dropped and
counted by reason. `load_coco` (coco.py) runs these checks; nothing here opens an image but through
`image_file_error`, and `check_image_files_exist` opens none.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinanet.data.images import FILE_REASONS, MAX_IMAGE_PIXELS, escapes_root, image_file_error

MAX_LISTED_PROBLEMS = 20
TINY_BOX = "w or h < 1 pixel after clipping"
IMAGE_DROPPED = "its image was dropped"
CATEGORY_DROPPED = "its category was dropped"


@dataclass
class Problem:
    """One defect of a COCO file, located by file, image and/or annotation id, and field."""

    file: str
    field: str
    message: str
    image_id: int | None = None
    annotation_id: int | None = None

    def __str__(self) -> str:
        image = f"image {self.image_id}" if self.image_id is not None else ""
        if self.annotation_id is not None:
            image = f"annotation {self.annotation_id}" + (f" ({image})" if image else "")
        return f"{self.file}: {image + ': ' if image else ''}{self.field}: {self.message}"


@dataclass
class ValidationReport:
    """What load_coco found: every problem, what was kept, and what was dropped, counted by reason."""

    file: str
    problems: list[Problem] = field(default_factory=list)
    num_images: int = 0  # kept
    num_annotations: int = 0  # kept
    num_clipped: int = 0  # kept boxes that stuck out of their image and were clipped to it
    dropped_images: Counter[str] = field(default_factory=Counter)
    dropped_annotations: Counter[str] = field(default_factory=Counter)
    dropped_categories: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_unreadable_images(self) -> int:
        """Images dropped because their file is missing, unreadable or of another size than recorded."""
        return sum(self.dropped_images[reason] for reason in FILE_REASONS)

    @property
    def num_dropped(self) -> int:
        counters = (self.dropped_images, self.dropped_annotations, self.dropped_categories)
        return sum(sum(c.values()) for c in counters)

    def summary(self) -> str:
        lines = [
            f"{self.file}: {len(self.problems)} problem(s); kept {self.num_images} images and "
            f"{self.num_annotations} annotations ({self.num_clipped} boxes clipped to their image)"
        ]
        for what in ("images", "annotations", "categories"):
            if counter := getattr(self, f"dropped_{what}"):
                counts = ", ".join(f"{n} {reason}" for reason, n in sorted(counter.items()))
                lines.append(f"dropped {sum(counter.values())} {what}: {counts}")
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more problem(s)")
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ValueError(self.summary())


_NO_SIZE = {"width": None, "height": None}  # an annotation whose image is unknown: no size to check


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _without_segmentation(obj: dict[str, Any]) -> dict[str, Any]:
    obj.pop("segmentation", None)
    return obj


def read_json(path: Path, name: str) -> dict[str, Any]:
    """The parsed top-level object, without the `segmentation` of any object in it: masks, which neither
    the detector nor box AP reads, are most of a COCO file's bytes (its polygons) and, as Python floats,
    most of its memory once parsed; each is let go as soon as its object is parsed. Structural defects
    (nothing usable to load) always raise."""
    if not path.is_file():
        raise ValueError(f"{name}: file not found (expected a COCO annotation JSON file)")
    try:
        raw = path.read_bytes()
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads(raw) does
        del raw  # the file's bytes go before parsing: only its text is held alongside the parsed objects
        data = json.loads(text, object_hook=_without_segmentation)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a JSON object at the top level, got {type(data).__name__}")
    errors = []
    for key in ("images", "annotations", "categories"):
        if key not in data:
            errors.append(str(Problem(name, key, "missing (a COCO file needs all three lists)")))
        elif not isinstance(data[key], list):
            errors.append(str(Problem(name, key, f"expected a list, got {type(data[key]).__name__}")))
    if errors:
        raise ValueError("\n".join(errors))
    return data


class Validator:
    """Checks categories, then images, then image files, then annotations, filling one report."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        self.image_ids: set[int] = set()  # every well-formed id, kept or dropped
        self.category_ids: set[int] = set()
        self.images: dict[int, dict] = {}  # kept
        self.categories: dict[int, dict] = {}  # kept

    def problem(self, field: str, message: str, image_id: Any = None, annotation_id: Any = None) -> None:
        self.report.problems.append(Problem(self.report.file, field, message, image_id, annotation_id))

    def records(self, records: list[Any], what: str, dropped: Counter[str]) -> Iterator[tuple[int, dict]]:
        """(id, record) of each object with a unique integer id; the others are reported and counted."""
        first: dict[int, int] = {}  # id -> position of its first record
        for pos, rec in enumerate(records):
            rid = rec.get("id") if isinstance(rec, dict) else None
            if not _is_int(rid):
                got = f"id {rid!r}" if isinstance(rec, dict) else repr(rec)
                self.problem(f"{what}[{pos}].id", f"expected an object with an integer id, got {got}")
                dropped["id not an integer"] += 1
            elif rid in first:
                msg = f"duplicate id {rid} (first at {what}[{first[rid]}]); this one is dropped"
                self.problem(f"{what}[{pos}].id", msg)
                dropped["duplicate id"] += 1
            else:
                first[rid] = pos
                yield rid, rec

    def check_categories(self, records: list[Any]) -> None:
        for cid, cat in self.records(records, "categories", self.report.dropped_categories):
            self.category_ids.add(cid)
            if isinstance(cat.get("name"), str):
                self.categories[cid] = cat
            else:
                self.problem(f"category {cid}: name", f"expected a string, got {cat.get('name')!r}")
                self.report.dropped_categories["name not a string"] += 1

    def check_images(self, records: list[Any]) -> None:
        for iid, img in self.records(records, "images", self.report.dropped_images):
            self.image_ids.add(iid)
            errors = []
            name = img.get("file_name")
            if not isinstance(name, str) or not name:
                errors.append(("file_name", f"expected a non-empty string, got {name!r}"))
            elif escapes_root(name):
                msg = f"expected a path inside the image folder (relative, no '..' out of it), got {name!r}"
                errors.append(("file_name", msg))
            for key in ("width", "height"):
                if not _is_int(img.get(key)) or img[key] <= 0:
                    errors.append((key, f"expected a positive integer, got {img.get(key)!r}"))
            for key, msg in errors:
                self.problem(key, msg, image_id=iid)
            if errors:
                self.report.dropped_images[f"bad {errors[0][0]}"] += 1
            else:
                self.images[iid] = img

    def check_image_files(self, images_dir: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        """Decodes each kept image in full (images.py says how orientation and size are checked)."""
        for iid, img in list(self.images.items()):
            path = images_dir / img["file_name"]
            error = image_file_error(path, img["width"], img["height"], max_pixels=max_pixels)
            if error is not None:
                self.problem("file_name", error[1], image_id=iid)
                self.report.dropped_images[error[0]] += 1
                del self.images[iid]

    def check_image_files_exist(self, images_dir: Path | str, listed: Collection[str] | None = None) -> None:
        """Checks that each kept image's file exists and is a regular file (or a link to one), opening
        none: one listing per folder (os.scandir), not a stat per file; a name missing from its folder's
        listing is looked up once more by itself, so the answer is `Path.is_file`'s on any file system.
        Size, format and truncation are not checked. With listed (the names of the files that exist,
        relative to images_dir: an object store's listing) no file system is asked."""
        listings: dict[str, set[str] | None] = {}  # folder -> names of its regular files
        exists = set(listed) if listed is not None else None
        for iid, img in list(self.images.items()):
            if exists is not None:
                if posixpath.normpath(img["file_name"]) in exists:
                    continue
                where = f"{str(images_dir).rstrip('/')}/{img['file_name']}"
            else:
                path = Path(images_dir) / img["file_name"]
                folder = str(path.parent)
                if folder not in listings:
                    listings[folder] = _regular_files(folder)
                if path.name in (listings[folder] or ()) or path.is_file():
                    continue
                where = f"{path}{' (a folder of that name)' if path.is_dir() else ''}"
            self.problem("file_name", f"image file not found: {where}", image_id=iid)
            self.report.dropped_images[FILE_REASONS[0]] += 1
            del self.images[iid]

    def check_annotations(self, records: list[Any]) -> list[dict]:
        kept = []
        for aid, ann in self.records(records, "annotations", self.report.dropped_annotations):
            xywh = self.plain_box(ann)
            if xywh is None:  # anything else: the full check, which names every problem
                errors, silent_reason, xywh = self.annotation_errors(ann)
                for _, key, msg in errors:
                    iid = ann.get("image_id")
                    self.problem(key, msg, image_id=iid if _is_int(iid) else None, annotation_id=aid)
                if errors or silent_reason is not None:
                    self.report.dropped_annotations[errors[0][0] if errors else silent_reason] += 1
                    continue
                self.report.num_clipped += xywh != [float(v) for v in ann["bbox"]]
            # In place, not copied: the records are load_coco's own, and a COCO file holds ~1M of them.
            ann["bbox"] = xywh
            ann.setdefault("area", xywh[2] * xywh[3])
            ann.setdefault("iscrowd", 0)
            kept.append(ann)
        return kept

    def plain_box(self, ann: dict) -> list[float] | None:
        """The bbox as floats when the annotation is plainly fine: kept image and category, a box of
        plain numbers at least 1 pixel wide and high inside its image (so not clipped), iscrowd and area
        absent or valid; else None. A shortcut that annotation_errors would agree with (it finds no
        problem and no reason to drop such a one), for the ~1M annotations of a COCO file."""
        iid, cid, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if type(iid) is not int or type(cid) is not int or cid not in self.categories:
            return None
        img = self.images.get(iid)
        if img is None or type(bbox) is not list or len(bbox) != 4:
            return None
        if not all(type(v) is float or type(v) is int for v in bbox):
            return None
        x, y, w, h = (float(v) for v in bbox)
        # Written so that NaN and inf fail: every comparison with NaN is False, and x + w <= width bounds
        # the rest.
        if not (0 <= x and 0 <= y and 1 <= w and 1 <= h and x + w <= img["width"] and y + h <= img["height"]):
            return None
        crowd, area = ann.get("iscrowd", 0), ann.get("area", 0)
        if type(crowd) is not int or crowd not in (0, 1) or type(area) not in (int, float):
            return None
        return [x, y, w, h] if 0 <= area < math.inf else None

    def annotation_errors(self, ann: dict) -> tuple[list[tuple[str, str, str]], str | None, Any]:
        """(problems as (reason, field, message), reason to drop without a problem, clipped xywh)."""
        errors: list[tuple[str, str, str]] = []
        silent_reasons = []
        for key, ids, kept, dropped_reason in (
            ("image_id", self.image_ids, self.images, IMAGE_DROPPED),
            ("category_id", self.category_ids, self.categories, CATEGORY_DROPPED),
        ):
            value = ann.get(key)
            if not _is_int(value):
                errors.append((f"bad {key}", key, f"expected an integer, got {value!r}"))
            elif value not in ids:
                errors.append((f"unknown {key}", key, f"no {key.split('_')[0]} has id {value}"))
            elif value not in kept:
                silent_reasons.append(dropped_reason)
        image_id = ann.get("image_id")  # may be any JSON value: only an integer is looked up
        img = self.images.get(image_id, _NO_SIZE) if _is_int(image_id) else _NO_SIZE
        reason, msg, xywh = _check_bbox(ann.get("bbox"), img["width"], img["height"])
        if msg is not None:
            errors.append((reason, "bbox", msg))
        elif reason is not None:
            silent_reasons.append(reason)
        crowd = ann.get("iscrowd", 0)
        if not _is_int(crowd) or crowd not in (0, 1):
            errors.append(("bad iscrowd", "iscrowd", f"expected 0 or 1, got {crowd!r}"))
        if "area" in ann and (not _is_number(ann["area"]) or ann["area"] < 0):
            errors.append(("bad area", "area", f"expected a finite number >= 0, got {ann['area']!r}"))
        return errors, (silent_reasons[0] if silent_reasons else None), xywh


def _regular_files(folder: str) -> set[str] | None:
    """Names of the regular files (or links to one) in folder; None when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_file()}
    except OSError:  # missing, not a folder, not readable: each file is then looked up by itself
        return None


def _check_bbox(bbox: Any, width: int | None, height: int | None) -> tuple[str | None, str | None, Any]:
    """(reason, message, clipped xywh): a problem has a message, a box under 1 pixel only a reason.

    Without the image's size (its record is bad) only the numbers themselves are checked.
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "bad bbox", f"expected a list of 4 finite numbers [x, y, w, h], got {bbox!r}", None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "bbox w or h <= 0", f"w and h must be > 0, got {list(bbox)!r}", None
    if width is None or height is None:
        return None, None, None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 >= x2 or y1 >= y2:
        msg = f"[x, y, w, h] = {list(bbox)!r} lies entirely outside the {width}x{height} (WxH) image"
        return "bbox outside the image", msg, None
    inside = (x1, y1, x2, y2) == (x, y, x + w, y + h)  # as given when inside: (x + w) - x != w in floats
    xywh = [x, y, w, h] if inside else [x1, y1, x2 - x1, y2 - y1]
    return (TINY_BOX if xywh[2] < 1 or xywh[3] < 1 else None), None, xywh
