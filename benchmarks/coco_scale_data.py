"""COCO-sized annotation files for `benchmarks.coco_scale`, seeded, written as text without holding them.

`build_train`: images of COCO's sizes (one side 640, the other 240-480), boxes over COCO's 80 category
ids, polygon `segmentation`s of COCO's length (~22 points) and 1% crowd boxes with RLE counts, so the file
has the size of instances_train2017.json for the same counts; every file_name is a hard link to one small
real JPEG (to copies of it, 50,000 names each: ext4 allows 65,000 links to a file), all in one folder as
COCO has them. `build_eval`: a val-sized ground truth and ~100 detections per image near it (jittered gt
boxes with high scores, random ones with low scores), so AP is neither 0 nor 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids 1-90 that COCO leaves unused
CATEGORY_IDS = [i for i in range(1, 91) if i not in COCO_GAPS]  # (80,)
CHUNK = 20_000  # annotations formatted and written at a time
JPEG_SIZE = (64, 48)
LINKS_PER_FILE = 50_000


def categories() -> list[dict]:
    return [{"supercategory": f"group {i // 10}", "id": i, "name": f"class {i}"} for i in CATEGORY_IDS]


def _images(rng: np.random.Generator, num_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, widths, heights), each (N,): sparse ids as COCO's, one side 640 and the other 240-480."""
    ids = rng.choice(600_000, size=num_images, replace=False) + 1  # (N,)
    portrait = rng.random(num_images) < 0.25  # (N,)
    short = rng.integers(240, 481, size=num_images)  # (N,)
    widths = np.where(portrait, short, 640)  # (N,)
    heights = np.where(portrait, 640, short)  # (N,)
    return ids, widths, heights


def _image_records(ids: np.ndarray, widths: np.ndarray, heights: np.ndarray, split: str) -> list[str]:
    lines = []
    for iid, w, h in zip(ids.tolist(), widths.tolist(), heights.tolist(), strict=True):
        name = f"{iid:012d}.jpg"
        lines.append(
            f'{{"license": {iid % 8 + 1}, "file_name": "{name}", '
            f'"coco_url": "http://images.cocodataset.org/{split}/{name}", "height": {h}, "width": {w}, '
            f'"date_captured": "2013-11-14 11:18:45", '
            f'"flickr_url": "http://farm4.staticflickr.com/{iid % 9000}/{iid}_0123456789_z.jpg", "id": {iid}}}'
        )
    return lines


def _boxes(
    rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray, num_boxes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image index (B,), xywh (B, 4)): images drawn unevenly (COCO's counts vary), sizes log-uniform."""
    weights = rng.gamma(0.8, size=len(widths))  # (N,)
    image_idx = rng.choice(len(widths), size=num_boxes, p=weights / weights.sum())  # (B,)
    return image_idx, _boxes_in(rng, widths[image_idx], heights[image_idx])


def _boxes_in(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """xywh (B, 4), one box inside each image of the given sizes, each side 2% to 90% of the image's."""
    img_w, img_h = widths.astype(float), heights.astype(float)  # (B,), (B,)
    w = np.maximum(img_w * np.exp(rng.uniform(np.log(0.02), np.log(0.9), len(img_w))), 2.0)  # (B,)
    h = np.maximum(img_h * np.exp(rng.uniform(np.log(0.02), np.log(0.9), len(img_h))), 2.0)  # (B,)
    x = rng.uniform(0, img_w - w)  # (B,)
    y = rng.uniform(0, img_h - h)  # (B,)
    return np.round(np.stack([x, y, w, h], axis=1), 2)  # (B, 4)


def _write_annotations(
    f, rng: np.random.Generator, image_ids: np.ndarray, image_idx: np.ndarray, xywh: np.ndarray
) -> np.ndarray:
    """COCO annotation records with polygons inside their boxes (RLE counts on crowd ones), by chunks;
    their category ids (B,)."""
    num_boxes = len(image_idx)
    templates: dict[int, str] = {}
    crowd = rng.random(num_boxes) < 0.01  # (B,)
    labels = rng.choice(CATEGORY_IDS, size=num_boxes)  # (B,)
    for start in range(0, num_boxes, CHUNK):
        stop = min(start + CHUNK, num_boxes)
        points = rng.integers(8, 36, size=stop - start)  # (b,) polygon vertices per box
        offsets = np.concatenate([[0], np.cumsum(points)])  # (b + 1,)
        box_of = np.repeat(np.arange(start, stop), points)  # (P,)
        # Sorted within each box (2 pi apart per box, which cos and sin do not see): a simple polygon.
        angle = np.sort(rng.uniform(0, 2 * np.pi, offsets[-1]) + 2 * np.pi * (box_of - start))  # (P,)
        radius = rng.uniform(0.6, 1.0, offsets[-1])  # (P,)
        x, y, w, h = xywh[box_of].T  # (P,) each
        px = np.round(x + w / 2 * (1 + radius * np.cos(angle)), 2)  # (P,)
        py = np.round(y + h / 2 * (1 + radius * np.sin(angle)), 2)  # (P,)
        coords = np.stack([px, py], axis=1).reshape(-1).tolist()  # (2P,) x0, y0, x1, y1, ...
        ends = (2 * offsets).tolist()
        records = zip(
            range(start, stop),
            xywh[start:stop].tolist(),
            crowd[start:stop].tolist(),
            image_ids[image_idx[start:stop]].tolist(),
            labels[start:stop].tolist(),
            strict=True,
        )
        lines = []
        for j, (k, (bx, by, bw, bh), is_crowd, image_id, label) in enumerate(records):  # plain strings
            if is_crowd:
                counts = ", ".join(str(v) for v in rng.integers(1, 400, size=60).tolist())
                seg = f'{{"counts": [{counts}], "size": [480, 640]}}'
            else:
                n = ends[j + 1] - ends[j]
                template = templates.setdefault(n, "[[" + ", ".join(["%.2f"] * n) + "]]")
                seg = template % tuple(coords[ends[j] : ends[j + 1]])
            lines.append(
                f'{{"segmentation": {seg}, "area": {bw * bh * 0.7!r}, "iscrowd": {int(is_crowd)}, '
                f'"image_id": {image_id}, "bbox": [{bx}, {by}, {bw}, {bh}], "category_id": {label}, '
                f'"id": {k + 1}}}'
            )
        f.write((", " if start else "") + ", ".join(lines))
    return labels


def write_coco(path: Path, seed: int, num_images: int, num_boxes: int, split: str) -> tuple[np.ndarray, ...]:
    """Write the file; (image ids, widths, heights, image index of each box, xywh, category ids) as written."""
    rng = np.random.default_rng(seed)
    ids, widths, heights = _images(rng, num_images)
    image_idx, xywh = _boxes(rng, widths, heights, num_boxes)
    head = {
        "info": {"description": "COCO-sized synthetic set (benchmarks.coco_scale)", "year": 2017},
        "licenses": [
            {"url": f"http://example.org/license/{i}", "id": i, "name": "a license"} for i in range(8)
        ],
    }
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(head)[:-1] + ', "images": [')
        images = _image_records(ids, widths, heights, split)
        for start in range(0, len(images), CHUNK):
            f.write((", " if start else "") + ", ".join(images[start : start + CHUNK]))
        f.write('], "annotations": [')
        labels = _write_annotations(f, rng, ids, image_idx, xywh)
        f.write(f'], "categories": {json.dumps(categories())}}}')
    return ids, widths, heights, image_idx, xywh, labels


def build_train(
    work: Path, *, num_images: int, num_boxes: int, missing: int, seed: int = 0
) -> tuple[Path, Path]:
    """(annotations JSON, image folder): every file_name a hard link to one JPEG but the last `missing`."""
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    path, images_dir = work / "instances_train.json", work / "train"
    ids = write_coco(path, seed, num_images, num_boxes, "train2017")[0]
    images_dir.mkdir(exist_ok=True)
    jpeg = work / "one.jpg"  # outside the image folder: it holds exactly the file_names
    Image.new("RGB", JPEG_SIZE, (120, 90, 60)).save(jpeg, quality=90)
    for k, iid in enumerate(ids[: len(ids) - missing].tolist()):
        if k % LINKS_PER_FILE == 0:  # a fresh copy: ext4 allows 65,000 links to one file
            source = jpeg.with_name(f"one-{k // LINKS_PER_FILE}.jpg")
            shutil.copyfile(jpeg, source)
        os.link(source, images_dir / f"{iid:012d}.jpg")
    return path, images_dir


def build_eval(
    work: Path, *, num_images: int, num_boxes: int, dets_per_image: int, seed: int = 1
) -> tuple[Path, Path]:
    """(ground-truth JSON, COCO results JSON): per image, each gt box jittered (right category with
    probability 0.8, score ~ how close), then random boxes with low scores up to dets_per_image."""
    work.mkdir(parents=True, exist_ok=True)
    gt_path, results_path = work / "instances_val.json", work / "results_val.json"
    ids, widths, heights, image_idx, xywh, labels = write_coco(
        gt_path, seed, num_images, num_boxes, "val2017"
    )
    rng = np.random.default_rng(seed + 1)
    jitter = rng.normal(0, 0.12, size=(num_boxes, 4)) * xywh[:, [2, 3, 2, 3]]  # (B, 4)
    near = xywh + jitter  # (B, 4)
    near[:, 2:] = np.maximum(near[:, 2:], 1.0)
    wrong = rng.random(num_boxes) < 0.2  # (B,)
    near_labels = np.where(wrong, rng.choice(CATEGORY_IDS, size=num_boxes), labels)  # (B,)
    near_scores = np.clip(
        0.95 - np.abs(jitter).sum(1) / xywh[:, 2:].sum(1) + rng.normal(0, 0.1, num_boxes), 0.05, 1
    )
    per_image = np.bincount(image_idx, minlength=num_images)  # (N,)
    num_random = np.maximum(dets_per_image - per_image, 0)  # (N,)
    rand_idx = np.repeat(np.arange(num_images), num_random)  # (R,)
    rand_xywh = _boxes_in(rng, widths[rand_idx], heights[rand_idx])  # (R, 4)
    rand_scores = rng.uniform(0.01, 0.5, len(rand_idx))  # (R,)
    results = [
        {
            "image_id": int(ids[i]),
            "category_id": int(c),
            "bbox": [round(v, 2) for v in b],
            "score": round(s, 4),
        }
        for i, c, b, s in zip(
            np.concatenate([image_idx, rand_idx]).tolist(),
            np.concatenate([near_labels, rng.choice(CATEGORY_IDS, size=len(rand_idx))]).tolist(),
            np.concatenate([near, rand_xywh]).tolist(),
            np.concatenate([near_scores, rand_scores]).tolist(),
            strict=True,
        )
    ]
    results_path.write_text(json.dumps(results))
    return gt_path, results_path
