"""make_synthetic_coco: deterministic, valid COCO, and varied enough to exercise every FPN level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from retinanet.data import CocoDataset, make_synthetic_coco
from retinanet.data.synth import SHAPES, shape_mask

SMALL, LARGE = 32**2, 96**2  # COCO's area ranges


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 train and 8 val images of 256 pixels, 3 classes, seed 0: half the default, to stay under 1 s."""
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=32, num_val=8)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    first = files_of(make_synthetic_coco(tmp_path / "a", num_train=6, num_val=2, image_size=64, seed=3))
    again = files_of(make_synthetic_coco(tmp_path / "b", num_train=6, num_val=2, image_size=64, seed=3))
    other = files_of(make_synthetic_coco(tmp_path / "c", num_train=6, num_val=2, image_size=64, seed=4))
    pngs = [f"images/train_{i:06d}.png" for i in range(1, 7)] + [
        "images/val_000001.png",
        "images/val_000002.png",
    ]
    assert sorted(first) == [*pngs, "train.json", "val.json"]
    assert first == again
    assert first["train.json"] != other["train.json"]


def test_both_splits_load_with_zero_problems(shapes_dir: Path) -> None:
    for split, num_images in (("train", 32), ("val", 8)):
        dataset = CocoDataset.from_dir(shapes_dir, split, strict=True)
        assert len(dataset) == num_images and dataset.report.ok and dataset.report.num_dropped == 0
        assert dataset.report.num_clipped == 0


def test_categories_have_odd_ids_and_shape_names(shapes_dir: Path) -> None:
    dataset = CocoDataset.from_dir(shapes_dir, "val")
    assert dataset.category_ids == [1, 3, 5]
    assert dataset.class_names == ["rectangle", "ellipse", "triangle"]


def test_objects_span_small_medium_and_large_and_some_images_are_empty(shapes_dir: Path) -> None:
    coco = CocoDataset.from_dir(shapes_dir, "train").coco
    areas = np.array([a["area"] for a in coco["annotations"]])
    assert (areas < SMALL).any() and ((areas >= SMALL) & (areas < LARGE)).any() and (areas >= LARGE).any()
    with_objects = {a["image_id"] for a in coco["annotations"]}
    num_empty = sum(img["id"] not in with_objects for img in coco["images"])
    assert num_empty == 3  # every tenth of 32
    assert {(img["width"], img["height"]) for img in coco["images"]} >= {(256, 256), (320, 256), (256, 320)}


def test_every_box_is_area_w_times_h_and_not_crowd(shapes_dir: Path) -> None:
    coco = CocoDataset.from_dir(shapes_dir, "val").coco
    for a in coco["annotations"]:
        assert a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0


def test_a_sample_is_a_float_image_with_xyxy_boxes_inside_it(shapes_dir: Path) -> None:
    image, target = CocoDataset.from_dir(shapes_dir, "val")[0]
    height, width = image.shape[-2:]
    boxes = target["boxes"]
    assert len(boxes) > 0 and 0.0 <= image.min() <= image.max() <= 1.0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_pycocotools_loads_the_files(shapes_dir: Path) -> None:
    gt = COCO(str(shapes_dir / "val.json"))
    assert gt.getCatIds() == [1, 3, 5] and len(gt.getImgIds()) == 8


@pytest.mark.parametrize("kind", SHAPES)
def test_each_shape_touches_all_four_sides_of_its_box(kind: str) -> None:
    mask = shape_mask(kind, 20, 14)
    assert mask.shape == (14, 20)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_there_are_at_least_six_distinct_shapes() -> None:
    masks = {shape_mask(kind, 24, 24).tobytes() for kind in SHAPES}
    assert len(masks) == len(SHAPES) >= 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": len(SHAPES) + 1}, "num_classes: expected an integer >= 1 and <= 8"),
        ({"num_classes": 0}, "num_classes: expected an integer >= 1"),
        ({"image_size": 32}, "image_size: expected an integer >= 64, got 32"),
        ({"num_train": 0}, "num_train: expected an integer >= 1, got 0"),
        ({"seed": -1}, "seed: expected an integer >= 0, got -1"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"make_synthetic_coco: {message}"):
        make_synthetic_coco(tmp_path, **kwargs)


def test_object_sizes_draws_every_side_from_the_range(tmp_path: Path) -> None:
    root = make_synthetic_coco(tmp_path, num_train=40, num_val=4, image_size=128, object_sizes=(16, 80))
    coco = COCO(str(root / "train.json"))
    sides = np.array([a["bbox"][2:] for a in coco.dataset["annotations"]])  # (K, 2) tight w, h
    assert len(sides) > 40
    # A shape fills its drawn box up to a pixel, and its other side is clipped into the same range.
    assert sides.min() >= 15 and sides.max() <= 80
    assert (sides.max(axis=1) < 32).any() and (sides.max(axis=1) > 48).any()  # both ends are drawn


@pytest.mark.parametrize("bad", [(2, 10), (40, 20), (16, 200), (16.0, 40), (16,)])
def test_object_sizes_out_of_range_is_refused_with_the_limit(tmp_path: Path, bad) -> None:
    with pytest.raises(ValueError, match=r"object_sizes: expected two integers 4 <= low <= high <= 96"):
        make_synthetic_coco(tmp_path, num_train=2, num_val=1, image_size=128, object_sizes=bad)
