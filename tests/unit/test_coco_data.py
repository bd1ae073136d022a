"""CocoDataset and load_coco: every kind of bad input is named; good input becomes torchvision targets.

The default dataset: two 16x12 (W x H) images, ids 1 and 2; categories 1 "cat" and 7 "dog";
annotation 10 on image 1 (dog, xywh [2, 3, 4, 5]) and 11 on image 1 (cat, [0, 0, 8, 6]); image 2 empty.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from retinanet.data import CocoDataset, Problem, RandomHorizontalFlip, collate, load_coco

CATS = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]


def image(iid: int, width: int = 16, height: int = 12, file_name: str | None = None) -> dict[str, Any]:
    return {"id": iid, "file_name": file_name or f"img{iid}.png", "width": width, "height": height}


def ann(aid: int, iid: int, cid: int, bbox: Any, **extra: Any) -> dict[str, Any]:
    return {"id": aid, "image_id": iid, "category_id": cid, "bbox": bbox, **extra}


def write_coco(
    root: Path,
    images: list[Any] | None = None,
    annotations: list[Any] | None = None,
    categories: list[Any] | None = None,
    name: str = "train.json",
) -> Path:
    """Write the JSON and, for each well-formed image record, a PNG of the recorded size under root."""
    images = [image(1), image(2)] if images is None else images
    annotations = (
        [ann(10, 1, 7, [2, 3, 4, 5]), ann(11, 1, 1, [0, 0, 8, 6])] if annotations is None else annotations
    )
    for img in images:
        well_formed = isinstance(img, dict) and isinstance(img.get("file_name"), str)
        if well_formed and isinstance(img.get("width"), int) and img["width"] > 0:
            Image.new("RGB", (img["width"], img["height"]), (255, 0, 0)).save(root / img["file_name"])
    path = root / name
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": CATS if categories is None else categories,
    }
    path.write_text(json.dumps(coco))
    return path


def problems_of(path: Path, **kwargs: Any) -> list[str]:
    _, report = load_coco(path, path.parent, **kwargs)
    return [str(p) for p in report.problems]


def test_problem_names_file_annotation_image_and_field() -> None:
    problem = Problem("data/train.json", "bbox", "w and h must be > 0, got [10, 5, 0, 4]", 3, 17)
    assert (
        str(problem)
        == "data/train.json: annotation 17 (image 3): bbox: w and h must be > 0, got [10, 5, 0, 4]"
    )
    assert str(Problem("a.json", "width", "expected a positive integer", image_id=4)) == (
        "a.json: image 4: width: expected a positive integer"
    )


def test_missing_annotation_file_raises_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nope.json'}: file not found")):
        CocoDataset(tmp_path / "nope.json", tmp_path)


def test_truncated_json_raises_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('{"images": [\n  {"id": 1,')
    with pytest.raises(ValueError, match=r"train.json: not valid JSON: .* at line 2 column 12"):
        CocoDataset(path, tmp_path)


def test_top_level_that_is_not_an_object_raises(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="train.json: expected a JSON object at the top level, got list"):
        CocoDataset(path, tmp_path)


def test_every_missing_or_mistyped_list_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": {"id": 1}, "annotations": []}))
    with pytest.raises(ValueError) as error:
        CocoDataset(path, tmp_path)
    assert "train.json: images: expected a list, got dict" in str(error.value)
    assert "train.json: categories: missing" in str(error.value)


def test_image_id_that_is_not_an_integer_is_reported_by_position(tmp_path: Path) -> None:
    path = write_coco(tmp_path, images=[image(1), {**image(2), "id": "2"}], annotations=[])
    with pytest.raises(
        ValueError, match=re.escape("train.json: images[1].id: expected an object with an integer")
    ):
        CocoDataset(path, tmp_path, strict=True)


def test_bad_width_is_reported_with_the_image_id(tmp_path: Path) -> None:
    path = write_coco(tmp_path, images=[image(1), {**image(2), "width": 0}], annotations=[])
    assert problems_of(path) == [f"{path}: image 2: width: expected a positive integer, got 0"]


def test_duplicate_image_ids_are_reported_with_both_positions(tmp_path: Path) -> None:
    path = write_coco(tmp_path, images=[image(1), image(2), image(1, file_name="again.png")])
    assert problems_of(path) == [
        f"{path}: images[2].id: duplicate id 1 (first at images[0]); this one is dropped"
    ]


def test_duplicate_annotation_ids_are_reported(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 1, 7, [2, 3, 4, 5]), ann(10, 2, 1, [0, 0, 8, 6])])
    with pytest.raises(
        ValueError, match=re.escape("annotations[1].id: duplicate id 10 (first at annotations[0])")
    ):
        CocoDataset(path, tmp_path, strict=True)


def test_duplicate_category_ids_are_reported(tmp_path: Path) -> None:
    path = write_coco(tmp_path, categories=[*CATS, {"id": 7, "name": "wolf"}])
    assert problems_of(path) == [
        f"{path}: categories[2].id: duplicate id 7 (first at categories[1]); this one is dropped"
    ]


def test_annotation_with_unknown_image_id_names_annotation_and_image(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 99, 7, [2, 3, 4, 5])])
    assert problems_of(path) == [f"{path}: annotation 10 (image 99): image_id: no image has id 99"]


def test_annotation_with_unknown_category_id_is_reported(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 1, 3, [2, 3, 4, 5])])
    with pytest.raises(
        ValueError, match=re.escape("annotation 10 (image 1): category_id: no category has id 3")
    ):
        CocoDataset(path, tmp_path, strict=True)


@pytest.mark.parametrize(
    "bbox", [[1, 2, 3], [1, 2, 3, float("nan")], [1, float("inf"), 3, 4], "1,2,3,4", None]
)
def test_bbox_that_is_not_four_finite_numbers_is_reported(tmp_path: Path, bbox: Any) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 1, 7, bbox)])
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: annotation 10 (image 1): bbox: expected a list of 4 finite numbers")


def test_bbox_with_zero_width_is_reported_with_its_values(tmp_path: Path) -> None:
    path = write_coco(tmp_path, images=[image(3)], annotations=[ann(17, 3, 7, [10, 5, 0, 4])])
    assert problems_of(path) == [
        f"{path}: annotation 17 (image 3): bbox: w and h must be > 0, got [10, 5, 0, 4]"
    ]


def test_bbox_entirely_outside_the_image_is_reported(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 1, 7, [16, 0, 4, 4])])
    assert problems_of(path) == [
        f"{path}: annotation 10 (image 1): bbox: [x, y, w, h] = [16, 0, 4, 4] lies entirely outside "
        "the 16x12 (WxH) image"
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"iscrowd": 2}, "iscrowd: expected 0 or 1, got 2"),
        ({"area": -1}, "area: expected a finite number >= 0, got -1"),
        ({"category_id": "7"}, "category_id: expected an integer, got '7'"),
    ],
)
def test_bad_annotation_fields_are_reported(tmp_path: Path, extra: dict, expected: str) -> None:
    path = write_coco(tmp_path, annotations=[{**ann(10, 1, 7, [2, 3, 4, 5]), **extra}])
    assert problems_of(path) == [f"{path}: annotation 10 (image 1): {expected}"]


def test_box_partly_outside_is_clipped_and_counted(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 1, 7, [-2, 10, 6, 5])])
    dataset = CocoDataset(path, tmp_path, strict=True)
    assert dataset.report.num_clipped == 1
    assert dataset[0][1]["boxes"].tolist() == [[0.0, 10.0, 4.0, 12.0]]
    assert dataset.coco["annotations"][0]["bbox"] == [0.0, 10.0, 4.0, 2.0]


def test_box_under_one_pixel_after_clipping_is_dropped_and_counted(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 1, 7, [15.5, 0, 4, 4]), ann(11, 1, 1, [0, 0, 8, 6])])
    dataset = CocoDataset(path, tmp_path, strict=True)
    assert dataset.report.dropped_annotations == {"w or h < 1 pixel after clipping": 1}
    assert [a["id"] for a in dataset.coco["annotations"]] == [11]


def test_missing_image_file_is_reported_and_its_image_dropped(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    (tmp_path / "img2.png").unlink()
    dataset = CocoDataset(path, tmp_path)
    assert dataset.image_ids == [1]
    assert dataset.report.num_unreadable_images == 1
    assert [str(p) for p in dataset.report.problems] == [
        f"{path}: image 2: file_name: image file not found: {tmp_path / 'img2.png'}"
    ]


def test_corrupt_image_file_is_reported(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    (tmp_path / "img2.png").write_bytes(b"not an image at all")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: image 2: file_name: image file unreadable: {tmp_path / 'img2.png'}")


def test_truncated_png_is_caught_when_images_are_checked(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    data = (tmp_path / "img2.png").read_bytes()
    (tmp_path / "img2.png").write_bytes(data[: len(data) // 2])
    (problem,) = problems_of(path)
    assert "image 2: file_name: image file unreadable" in problem


def test_truncated_png_raises_in_getitem_naming_file_and_image_id(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    data = (tmp_path / "img1.png").read_bytes()
    (tmp_path / "img1.png").write_bytes(data[: len(data) // 2])
    dataset = CocoDataset(path, tmp_path, check_images=False)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'img1.png'} (image 1): could not decode")):
        dataset[0]


def test_recorded_size_that_differs_from_the_file_is_reported(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    Image.new("RGB", (20, 12)).save(tmp_path / "img2.png")
    assert problems_of(path) == [
        f"{path}: image 2: file_name: recorded width x height 16x12 differs from the file's 20x12: "
        f"{tmp_path / 'img2.png'}"
    ]


def test_recorded_size_that_differs_raises_in_getitem_when_images_are_not_checked(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    Image.new("RGB", (20, 12)).save(tmp_path / "img1.png")
    dataset = CocoDataset(path, tmp_path, check_images=False)
    with pytest.raises(ValueError, match=re.escape("(image 1): recorded width x height 16x12 in")):
        dataset[0]


@pytest.mark.parametrize("images", [[], [image(1, file_name="missing.png")]])
def test_dataset_without_usable_images_raises_even_when_not_strict(tmp_path: Path, images: list) -> None:
    path = tmp_path / "train.json"  # written by hand: write_coco would create missing.png
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": CATS}))
    with pytest.raises(ValueError, match="train.json: images: expected at least one usable entry, got none"):
        CocoDataset(path, tmp_path, strict=False)


def test_strict_raises_listing_every_problem(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(10, 1, 7, [1, 1, -1, 2]), ann(11, 5, 1, [0, 0, 8, 6])])
    with pytest.raises(ValueError) as error:
        CocoDataset(path, tmp_path, strict=True)
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "annotation 10 (image 1): bbox: w and h must be > 0" in message
    assert "annotation 11 (image 5): image_id: no image has id 5" in message


def test_non_strict_drops_bad_annotations_counts_them_by_reason_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [ann(12, 1, 7, [1, 1, 0, 2]), ann(13, 1, 7, [1, 1, 2, -3]), ann(14, 1, 2, [1, 1, 2, 2])]
    path = write_coco(tmp_path, annotations=[ann(10, 1, 7, [2, 3, 4, 5]), *bad])
    with caplog.at_level(logging.WARNING, logger="retinanet.data.coco"):
        dataset = CocoDataset(path, tmp_path)
    assert dataset.report.dropped_annotations == {"bbox w or h <= 0": 2, "unknown category_id": 1}
    assert dataset.report.num_annotations == 1 and not dataset.report.ok
    assert "dropped 3 annotations: 2 bbox w or h <= 0, 1 unknown category_id" in caplog.text


def test_annotations_of_a_dropped_image_are_counted_without_a_second_problem(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    (tmp_path / "img1.png").unlink()
    _, report = load_coco(path, tmp_path)
    assert len(report.problems) == 1
    assert report.dropped_annotations == {"its image was dropped": 2}


def test_report_summary_lists_at_most_twenty_problems(tmp_path: Path) -> None:
    path = write_coco(tmp_path, annotations=[ann(i, 1, 7, [1, 1, 0, 1]) for i in range(25)])
    _, report = load_coco(path, tmp_path)
    lines = report.summary().splitlines()
    assert (
        lines[0] == f"{path}: 25 problem(s); kept 2 images and 0 annotations (0 boxes clipped to their image)"
    )
    assert lines[-1] == "  ... and 5 more problem(s)"
    assert len([line for line in lines if line.startswith(f"  {path}")]) == 20


def write_mode(path: Path, mode: str) -> None:
    if mode == "I;16":
        Image.fromarray(np.full((12, 16), 32768, dtype=np.uint16)).save(path)
    elif mode == "P+transparency":
        Image.new("P", (16, 12), 3).save(path, transparency=0)
    else:
        Image.new(mode, (16, 12)).save(path)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "P+transparency", "RGBA", "I;16"])
def test_images_of_any_mode_load_as_rgb_floats_in_unit_range(tmp_path: Path, mode: str) -> None:
    path = write_coco(tmp_path, images=[image(1)], annotations=[])
    write_mode(tmp_path / "img1.png", mode)
    img, _ = CocoDataset(path, tmp_path, strict=True)[0]
    assert img.shape == (3, 12, 16) and img.dtype == torch.float32
    assert 0.0 <= img.min() <= img.max() <= 1.0
    if mode == "I;16":
        assert torch.allclose(img, torch.full_like(img, 32768 / 65535))


def test_non_contiguous_category_ids_map_to_contiguous_labels_and_back(tmp_path: Path) -> None:
    categories = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]
    annotations = [ann(10, 1, 90, [0, 0, 2, 2]), ann(11, 1, 1, [0, 0, 2, 2]), ann(12, 1, 7, [0, 0, 2, 2])]
    dataset = CocoDataset(write_coco(tmp_path, annotations=annotations, categories=categories), tmp_path)
    labels = dataset[0][1]["labels"]
    assert dataset.num_classes == 3 and dataset.class_names == ["cat", "dog", "zebra"]
    assert labels.tolist() == [2, 0, 1] and labels.dtype == torch.int64
    assert [dataset.category_ids[label] for label in labels.tolist()] == [90, 1, 7]


def test_crowd_annotation_is_kept_with_its_flag(tmp_path: Path) -> None:
    annotations = [ann(10, 1, 7, [2, 3, 4, 5], iscrowd=1), ann(11, 1, 1, [0, 0, 8, 6])]
    dataset = CocoDataset(write_coco(tmp_path, annotations=annotations), tmp_path, strict=True)
    assert dataset[0][1]["iscrowd"].tolist() == [True, False]


def test_image_without_annotations_is_kept_with_empty_targets(tmp_path: Path) -> None:
    dataset = CocoDataset(write_coco(tmp_path), tmp_path, strict=True)
    _, target = dataset[1]
    assert target["image_id"] == 2
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["iscrowd"].shape == (0,)


def test_coco_xywh_boxes_become_xyxy_pixels_at_the_original_size(tmp_path: Path) -> None:
    dataset = CocoDataset(write_coco(tmp_path), tmp_path, strict=True)
    img, target = dataset[0]
    assert img.shape == (3, 12, 16)
    assert target["boxes"].tolist() == [[2.0, 3.0, 6.0, 8.0], [0.0, 0.0, 8.0, 6.0]]
    assert target["labels"].tolist() == [1, 0] and target["image_id"] == 1


def test_both_layouts_give_the_same_samples(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    write_coco(tmp_path / "flat", name="val.json")
    flat = CocoDataset.from_dir(tmp_path / "flat", "val", strict=True)
    images_dir, annotations_dir = tmp_path / "coco" / "val2017", tmp_path / "coco" / "annotations"
    images_dir.mkdir(parents=True)
    annotations_dir.mkdir()
    path = write_coco(images_dir, name="instances_val2017.json")
    nested = CocoDataset(path.rename(annotations_dir / "instances_val2017.json"), images_dir, strict=True)
    assert len(flat) == len(nested) == 2
    assert torch.equal(flat[0][0], nested[0][0]) and torch.equal(flat[0][1]["boxes"], nested[0][1]["boxes"])


def test_flip_transform_mirrors_the_boxes(tmp_path: Path) -> None:
    dataset = CocoDataset(write_coco(tmp_path), tmp_path, transform=RandomHorizontalFlip(p=1.0))
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[10.0, 3.0, 14.0, 8.0], [8.0, 0.0, 16.0, 6.0]]


def test_dataloader_with_collate_batches_images_of_any_size(tmp_path: Path) -> None:
    path = write_coco(tmp_path, images=[image(1), image(2, width=8, height=8)], annotations=[])
    loader = torch.utils.data.DataLoader(CocoDataset(path, tmp_path), batch_size=2, collate_fn=collate)
    images, targets = next(iter(loader))
    assert [tuple(i.shape) for i in images] == [(3, 12, 16), (3, 8, 8)]
    assert [t["image_id"] for t in targets] == [1, 2]


def test_cleaned_coco_fills_area_and_iscrowd_keeps_ids_and_serves_pycocotools(tmp_path: Path) -> None:
    annotations = [
        ann(10, 1, 7, [2, 3, 4, 5], area=3.5),
        ann(11, 1, 1, [0, 0, 8, 6]),
        ann(12, 1, 1, [1, 1, 0, 1]),
    ]
    dataset = CocoDataset(write_coco(tmp_path, annotations=annotations), tmp_path)
    kept = {a["id"]: a for a in dataset.coco["annotations"]}
    assert sorted(kept) == [10, 11]
    assert (kept[10]["area"], kept[10]["iscrowd"]) == (3.5, 0)
    assert (kept[11]["area"], kept[11]["iscrowd"]) == (48, 0)
    gt = COCO()
    gt.dataset = dataset.coco
    gt.createIndex()
    assert gt.getImgIds() == [1, 2] and gt.getCatIds() == [1, 7] and gt.getAnnIds(imgIds=[1]) == [10, 11]
