"""check_images="exists" and `retinaops data check --no-decode`: each image file must exist, none is opened.

The set: three 8x6 (W x H) images, ids 1-3, one box each (category 1); file_names a.jpg, sub/b.jpg and
c.jpg, written as real JPEGs unless a test says otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from retinanet.data import CocoDataset, load_coco
from retinanet.data import validate as validate_module

NAMES = {1: "a.jpg", 2: "sub/b.jpg", 3: "c.jpg"}


def write_set(root: Path, missing: tuple[int, ...] = ()) -> Path:
    images = [{"id": i, "file_name": n, "width": 8, "height": 6} for i, n in NAMES.items()]
    annotations = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 4, 3]} for i in NAMES]
    for iid, name in NAMES.items():
        if iid not in missing:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 6), (200, 10, 10)).save(root / name)
    path = root / "train.json"
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    path.write_text(json.dumps(coco))
    return path


def test_a_missing_file_is_named_dropped_and_counted_as_today(tmp_path: Path) -> None:
    path = write_set(tmp_path, missing=(3,))
    for check in ("exists", True):  # the same problem, reason and counts as the full decode
        coco, report = load_coco(path, tmp_path, check_images=check)
        assert [str(p) for p in report.problems] == [
            f"{path}: image 3: file_name: image file not found: {tmp_path / 'c.jpg'}"
        ]
        assert report.dropped_images == {"image file not found": 1} and report.num_unreadable_images == 1
        assert report.dropped_annotations == {"its image was dropped": 1}
        assert sorted(img["id"] for img in coco["images"]) == [1, 2] and report.num_annotations == 2


def test_a_file_in_a_sub_folder_is_found_and_one_missing_there_is_not(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    assert load_coco(path, tmp_path, check_images="exists")[1].ok
    (tmp_path / "sub" / "b.jpg").unlink()
    report = load_coco(path, tmp_path, check_images="exists")[1]
    assert [p.image_id for p in report.problems] == [2]
    assert f"image file not found: {tmp_path / 'sub' / 'b.jpg'}" in str(report.problems[0])


def test_a_missing_sub_folder_drops_its_images(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    (tmp_path / "sub" / "b.jpg").unlink()
    (tmp_path / "sub").rmdir()
    report = load_coco(path, tmp_path, check_images="exists")[1]
    assert [p.image_id for p in report.problems] == [2] and report.num_images == 2


def test_a_folder_where_a_file_should_be_is_not_an_image_file(tmp_path: Path) -> None:
    path = write_set(tmp_path, missing=(1,))
    (tmp_path / "a.jpg").mkdir()
    report = load_coco(path, tmp_path, check_images="exists")[1]
    assert [str(p) for p in report.problems] == [
        f"{path}: image 1: file_name: image file not found: {tmp_path / 'a.jpg'} (a folder of that name)"
    ]
    assert report.dropped_images == {"image file not found": 1}


def test_a_link_to_a_file_counts_as_the_file_and_a_dangling_link_as_missing(tmp_path: Path) -> None:
    path = write_set(tmp_path, missing=(1, 3))
    os.symlink(tmp_path / "sub" / "b.jpg", tmp_path / "a.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "c.jpg")
    report = load_coco(path, tmp_path, check_images="exists")[1]
    assert [p.image_id for p in report.problems] == [3]


def test_one_listing_per_folder_and_no_image_is_opened(tmp_path: Path, monkeypatch) -> None:
    path = write_set(tmp_path)
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 not a JPEG")  # corrupt: the full decode refuses it
    listed: list[str] = []
    scandir = os.scandir

    def counting_scandir(folder):  # spy on the real call: it still lists the real folder
        listed.append(str(folder))
        return scandir(folder)

    monkeypatch.setattr(validate_module.os, "scandir", counting_scandir)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an image was opened"))
    assert load_coco(path, tmp_path, check_images="exists")[1].ok
    assert sorted(listed) == sorted([str(tmp_path), str(tmp_path / "sub")])


def test_a_corrupt_jpeg_passes_the_existence_check_but_fails_the_full_decode(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    assert load_coco(path, tmp_path, check_images="exists")[1].ok
    report = load_coco(path, tmp_path, check_images=True)[1]
    assert report.dropped_images == {"image file unreadable": 1}


def test_check_images_takes_true_false_or_exists_only(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    with pytest.raises(ValueError, match=r"check_images: expected True, False or 'exists', got 'decode'"):
        load_coco(path, tmp_path, check_images="decode")


def test_the_dataset_checks_existence_only_when_asked(tmp_path: Path) -> None:
    path = write_set(tmp_path, missing=(2,))
    data = CocoDataset(path, tmp_path, check_images="exists")
    assert data.image_ids == [1, 3] and data.report is not None and data.report.num_unreadable_images == 1


def test_the_cleaned_dict_leaves_segmentation_out_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    coco = json.loads(path.read_text())
    coco["annotations"][0] |= {"segmentation": [[1, 1, 5, 1, 5, 4]], "extra": "kept"}
    coco["info"] = {"year": 2017}
    path.write_text(json.dumps(coco))
    cleaned = load_coco(path, tmp_path, check_images=False)[0]
    first = cleaned["annotations"][0]
    assert list(first) == ["id", "image_id", "category_id", "bbox", "extra", "area", "iscrowd"]
    assert first["bbox"] == [1.0, 1.0, 4.0, 3.0] and first["area"] == 12.0 and first["iscrowd"] == 0
    assert cleaned["info"] == {"year": 2017}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from retinaops.cli import main

    code = main(argv)
    return code, capsys.readouterr().out


def test_data_check_no_decode_reports_a_missing_file_and_passes_a_corrupt_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_set(tmp_path, missing=(1,))
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    argv = ["data", "check", "--annotations", str(path), "--images", str(tmp_path), "--strict"]
    code, out = run_cli([*argv, "--no-decode"], capsys)
    assert code == 1
    assert out.splitlines()[:3] == [
        f"{path}: 1 problem(s); kept 2 images and 2 annotations (0 boxes clipped to their image)",
        "dropped 1 images: 1 image file not found",
        "dropped 1 annotations: 1 its image was dropped",
    ]
    assert f"image 1: file_name: image file not found: {tmp_path / 'a.jpg'}" in out
    code, out = run_cli(argv, capsys)  # the default decodes: the corrupt file is found too
    assert code == 1 and "2 problem(s)" in out and "1 image file unreadable" in out


def test_data_check_help_says_what_no_decode_does_not_check(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(["data", "check", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0
    assert "--no-decode only check that each image file exists" in text
    assert "blind to a file's size, format and truncation" in text


def test_the_shortcut_for_plain_annotations_agrees_with_the_full_check(tmp_path: Path, monkeypatch) -> None:
    path = write_set(tmp_path, missing=(3,))  # image 3 dropped: its annotations go silently
    coco = json.loads(path.read_text())
    nan, inf = float("nan"), float("inf")
    odd = [
        {"bbox": [0, 0, 8, 6]},  # the whole image, ints
        {"bbox": [-0.0, 0.5, 7.5, 5.5]},
        {"bbox": [1, 1, 0.5, 3]},  # under 1 pixel wide: dropped without a problem
        {"bbox": [7, 5, 4, 4]},  # sticks out: clipped
        {"bbox": [9, 9, 2, 2]},  # outside
        {"bbox": [nan, 1, 2, 2]},
        {"bbox": [1, 1, inf, 2]},
        {"bbox": [1, 1, 2, -inf]},
        {"bbox": [True, 1, 2, 2]},
        {"bbox": [1, 1, 2]},
        {"bbox": "1 1 2 2"},
        {"image_id": 3},
        {"image_id": 9},
        {"image_id": [1]},
        {"image_id": True},
        {"category_id": 2},
        {"category_id": 1.0},
        {"iscrowd": 1},
        {"iscrowd": 2},
        {"iscrowd": False},
        {"area": 0},
        {"area": 3.5},
        {"area": -1},
        {"area": nan},
        {"area": inf},
        {"area": "7"},
        {"area": True},
    ]
    base = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 3]}
    coco["annotations"] = [{"id": 100 + k, **base, **change} for k, change in enumerate(odd)]
    path.write_text(json.dumps(coco))
    fast = load_coco(path, tmp_path, check_images="exists")
    monkeypatch.setattr(validate_module.Validator, "plain_box", lambda self, ann: None)
    full = load_coco(path, tmp_path, check_images="exists")
    assert json.dumps(fast[0]) == json.dumps(full[0])  # the same kept records, values and key order
    assert fast[1] == full[1] and len(full[1].problems) == 1 + 19 and full[1].num_clipped == 1
    assert [a["id"] - 100 for a in fast[0]["annotations"]] == [0, 1, 3, 17, 20, 21]
