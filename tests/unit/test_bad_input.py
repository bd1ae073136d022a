"""Every kind of bad input the platform takes, in one place: each is refused (or dropped, or converted)
with a message naming the file, the id, the field and what was expected. Kinds with a test elsewhere are
listed in docs/RELIABILITY.md; these are the ones that had none, and the naming rule over all COCO kinds.
"""

import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from retinanet import RetinaNet, RetinaNetConfig
from retinanet.data import CocoDataset, collate, load_coco, make_synthetic_coco
from retinaops.job.resolved import resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import JobSpec, SpecError

CATS = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]


def write(root: Path, images: list, annotations: list, categories: list = CATS, without: str = "") -> Path:
    """The COCO file, and a PNG of the recorded size for each well-formed image record but `without`."""
    for img in images:
        if (
            "file_name" in img
            and img["file_name"] != without
            and isinstance(img["width"], int)
            and img["width"] > 0
        ):
            Image.new("RGB", (img["width"], img["height"]), (0, 90, 200)).save(root / img["file_name"])
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def img(iid: int, **extra):
    return {"id": iid, "file_name": f"i{iid}.png", "width": 16, "height": 12, **extra}


def box(aid: int, bbox, **extra):
    return {"id": aid, "image_id": 1, "category_id": 7, "bbox": bbox, **extra}


# kind: (images, annotations, categories, the id as named, the field, what was expected or is wrong)
COCO_KINDS = {
    "bbox with zero width": (
        [img(1)],
        [box(5, [1, 1, 0, 4])],
        CATS,
        "annotation 5",
        "bbox",
        "w and h must be > 0",
    ),
    "bbox with negative height": (
        [img(1)],
        [box(5, [1, 1, 3, -2])],
        CATS,
        "annotation 5",
        "bbox",
        "must be > 0",
    ),
    "bbox outside the image": (
        [img(1)],
        [box(5, [20, 1, 3, 3])],
        CATS,
        "annotation 5",
        "bbox",
        "entirely outside the 16x12",
    ),
    "NaN in a bbox": (
        [img(1)],
        [box(5, [1, float("nan"), 3, 3])],
        CATS,
        "annotation 5",
        "bbox",
        "expected a list of 4 finite numbers",
    ),
    "bbox of 3 numbers": (
        [img(1)],
        [box(5, [1, 1, 3])],
        CATS,
        "annotation 5",
        "bbox",
        "expected a list of 4 finite numbers",
    ),
    "unknown category": (
        [img(1)],
        [box(5, [1, 1, 3, 3], category_id=3)],
        CATS,
        "annotation 5",
        "category_id",
        "no category has id 3",
    ),
    "unknown image": (
        [img(1)],
        [box(5, [1, 1, 3, 3], image_id=9)],
        CATS,
        "annotation 5",
        "image_id",
        "no image has id 9",
    ),
    "image id of an annotation that is a list": (
        [img(1)],
        [box(5, [1, 1, 3, 3], image_id=[])],
        CATS,
        "annotation 5",
        "image_id",
        "expected an integer",
    ),
    "category id as a string": (
        [img(1)],
        [box(5, [1, 1, 3, 3], category_id="7")],
        CATS,
        "annotation 5",
        "category_id",
        "expected an integer",
    ),
    "iscrowd of 2": (
        [img(1)],
        [box(5, [1, 1, 3, 3], iscrowd=2)],
        CATS,
        "annotation 5",
        "iscrowd",
        "expected 0 or 1",
    ),
    "negative area": (
        [img(1)],
        [box(5, [1, 1, 3, 3], area=-4)],
        CATS,
        "annotation 5",
        "area",
        "expected a finite number >= 0",
    ),
    "duplicate annotation id": (
        [img(1)],
        [box(5, [1, 1, 3, 3]), box(5, [2, 2, 3, 3])],
        CATS,
        "annotations[1]",
        "id",
        "duplicate id 5",
    ),
    "duplicate image id": ([img(1), img(1)], [], CATS, "images[1]", "id", "duplicate id 1"),
    "duplicate category id": (
        [img(1)],
        [],
        [*CATS, {"id": 7, "name": "wolf"}],
        "categories[2]",
        "id",
        "duplicate id 7",
    ),
    "image id as a string": (
        [img(1), img("2")],
        [],
        CATS,
        "images[1]",
        "id",
        "expected an object with an integer id",
    ),
    "width of 0": ([img(1), img(2, width=0)], [], CATS, "image 2", "width", "expected a positive integer"),
    "file_name missing": (
        [img(1), {"id": 2, "width": 16, "height": 12}],
        [],
        CATS,
        "image 2",
        "file_name",
        "expected a non-empty string",
    ),
    "category name missing": ([img(1)], [], [*CATS, {"id": 9}], "category 9", "name", "expected a string"),
}


@pytest.mark.parametrize("kind", COCO_KINDS)
def test_every_bad_coco_record_is_named_by_file_id_field_and_what_was_expected(tmp_path, kind):
    images, annotations, categories, where, field, expected = COCO_KINDS[kind]
    path = write(tmp_path, images, annotations, categories)
    (problem,) = [str(p) for p in load_coco(path, tmp_path)[1].problems]
    assert problem.startswith(f"{path}: ") and where in problem
    assert f"{field}: " in problem and expected in problem


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (and no pixel data): what a decompression bomb shows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", ihdr), (b"IEND", b"")]
    body = b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks
    )
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_an_image_claiming_a_huge_size_is_dropped_by_name_before_anything_decodes_it(tmp_path):
    images = [img(1), {"id": 2, "file_name": "bomb.png", "width": 30000, "height": 30000}]
    path = write(tmp_path, images, [], without="bomb.png")
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    coco, report = load_coco(path, tmp_path)
    assert [im["id"] for im in coco["images"]] == [1]
    (problem,) = [str(p) for p in report.problems]
    assert problem.startswith(f"{path}: image 2: file_name: image too large: {tmp_path / 'bomb.png'}")
    assert "DecompressionBombError" in problem and "data.max_image_pixels=178956970" in problem
    assert report.dropped_images == {"image over max_image_pixels": 1}


def test_an_image_between_pil_warning_and_the_cap_is_decided_by_the_cap_and_no_warning_passes(tmp_path):
    # 10000 x 10000 = 1e8 pixels: over PIL's warning threshold (89.5 Mpx), under its error (179 Mpx)
    images = [img(1), {"id": 2, "file_name": "big.png", "width": 10000, "height": 10000}]
    path = write(tmp_path, images, [], without="big.png")
    png_header_only(tmp_path / "big.png", 10000, 10000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        capped = load_coco(path, tmp_path, max_image_pixels=50_000_000)[1]
        allowed = load_coco(path, tmp_path)[1]  # the default cap lets it be decoded: it has no pixels
    (problem,) = [str(p) for p in capped.problems]
    assert "image too large" in problem and "over the cap of 50000000 (data.max_image_pixels)" in problem
    (problem,) = [str(p) for p in allowed.problems]
    assert "image file unreadable" in problem  # decoded, and found to hold no pixel data


def test_a_max_image_pixels_over_pils_own_limit_is_refused_at_its_key():
    with pytest.raises(
        SpecError, match=r"job.yaml: data.max_image_pixels: must be <= 178956970, got 200000000"
    ):
        JobSpec.from_dict({"data": {"root": "d", "max_image_pixels": 200_000_000}}, "job.yaml")


def test_an_image_far_larger_than_the_others_is_resized_like_them_and_its_boxes_follow(tmp_path):
    images = [img(1), {"id": 2, "file_name": "huge.png", "width": 2000, "height": 1500}]
    annotations = [box(5, [1, 1, 8, 8]), {**box(6, [500, 375, 1000, 750]), "image_id": 2}]
    path = write(tmp_path, images, annotations)
    config = RetinaNetConfig(backbone="resnet18", num_classes=2, min_size=64, max_size=96, fpn_channels=16)
    dataset = CocoDataset(path, tmp_path, strict=True)
    batch, sizes, targets = RetinaNet(config).preprocess(*collate([dataset[0], dataset[1]]))
    assert tuple(batch.shape) == (2, 3, 128, 128)  # padded to a multiple of 128, not to 1500 x 2000
    assert sizes[1] == (64, 85)  # the short side at min_size, the aspect ratio kept
    torch.testing.assert_close(
        targets[1]["boxes"], torch.tensor([[21.25, 16.0, 63.75, 48.0]]), atol=0.05, rtol=0
    )


def test_an_empty_dataset_is_refused_naming_the_file(tmp_path):
    path = write(tmp_path, [], [])
    with pytest.raises(ValueError, match=r"train.json: images: expected at least one usable entry, got none"):
        load_coco(path, tmp_path)


def test_anchor_sizes_that_do_not_match_the_pyramid_levels_are_refused_at_their_key():
    with pytest.raises(
        SpecError, match=r"job.yaml: model.anchor_sizes: has 3 entries, expected 5 \(one per FPN level"
    ):
        JobSpec.from_dict({"data": {"root": "d"}, "model": {"anchor_sizes": [32, 64, 128]}}, "job.yaml")


def test_a_model_num_classes_that_disagrees_with_the_data_is_refused_before_ray_starts(tmp_path):
    root = make_synthetic_coco(tmp_path / "d", num_train=2, num_val=1, num_classes=3, image_size=64, seed=0)
    spec = JobSpec.from_dict({"data": {"root": str(root)}, "model": {"num_classes": 5}}, "job.yaml")
    with pytest.raises(SpecError, match=r"job.yaml: model.num_classes: the data has 3 categories, got 5"):
        resolve_job(spec, Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))
