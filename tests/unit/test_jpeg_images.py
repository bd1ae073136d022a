"""Real JPEG files, written by PIL here, beside the PNGs: EXIF orientation, CMYK, progressive, truncated,
16-bit, file names that leave the image folder or hold spaces, and files that go bad after validation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.data import CocoDataset, load_coco, read_image
from retinanet.data.skip import SKIPPED, SkipBadSamples

W, H = 40, 24  # the image as displayed (and as the annotations record it): landscape
BOX = (6, 4, 18, 12)  # xyxy of the white object on black, displayed coordinates
# The pixels to store so that PIL's exif_transpose of tag `o` shows the displayed image: the inverse.
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def displayed() -> Image.Image:
    im = Image.new("RGB", (W, H), (0, 0, 0))
    im.paste((255, 255, 255), BOX)
    return im


def save_jpeg(path: Path, im: Image.Image, orientation: int = 1, **kwargs) -> None:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    im.save(path, "JPEG", quality=95, exif=exif, **kwargs)


def write_coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    path = root / "train.json"
    categories = [{"id": 1, "name": "thing"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def object_contrast(image: torch.Tensor, box: torch.Tensor) -> tuple[float, float]:
    """(mean inside the box, mean outside it) of a (3, H, W) image."""
    x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
    inside = torch.zeros(image.shape[-2:], dtype=torch.bool)  # (H, W)
    inside[y1:y2, x1:x2] = True
    return image[:, inside].mean().item(), image[:, ~inside].mean().item()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_oriented_jpeg_loads_upright_with_its_boxes_over_the_object(tmp_path, orientation):
    stored = displayed() if STORE[orientation] is None else displayed().transpose(STORE[orientation])
    save_jpeg(tmp_path / "photo.jpg", stored, orientation)
    x1, y1, x2, y2 = BOX
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
    path = write_coco(tmp_path, [{"id": 1, "file_name": "photo.jpg", "width": W, "height": H}], [ann])
    image, target = CocoDataset(path, tmp_path, strict=True)[0]  # strict: the size check passed
    assert tuple(image.shape) == (3, H, W)
    inside, outside = object_contrast(image, target["boxes"][0])
    assert inside > 0.9 and outside < 0.1


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_a_rotated_jpeg_recorded_at_its_stored_size_was_annotated_unrotated_and_stays_so(
    tmp_path, orientation
):
    # A tool that ignores EXIF shows the stored pixels (24 x 40 here); its size and boxes are of those.
    stored = displayed().transpose(STORE[orientation])
    save_jpeg(tmp_path / "photo.jpg", stored, orientation)
    arr = np.array(stored.convert("L")) > 128  # (40, 24): where the object is in the stored pixels
    ys, xs = np.nonzero(arr)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox}
    path = write_coco(tmp_path, [{"id": 1, "file_name": "photo.jpg", "width": H, "height": W}], [ann])
    image, target = CocoDataset(path, tmp_path, strict=True)[0]
    assert tuple(image.shape) == (3, W, H)
    inside, outside = object_contrast(image, target["boxes"][0])
    assert inside > 0.9 and outside < 0.1


def test_a_jpeg_recorded_at_neither_its_stored_nor_its_displayed_size_is_dropped_by_name(tmp_path):
    save_jpeg(tmp_path / "photo.jpg", displayed().transpose(Image.Transpose.ROTATE_90), 6)
    images = [{"id": 1, "file_name": "photo.jpg", "width": 30, "height": 30}, _png(tmp_path, 2)]
    coco, report = load_coco(write_coco(tmp_path, images, []), tmp_path)
    assert [im["id"] for im in coco["images"]] == [2]
    assert "image 1: file_name: recorded width x height 30x30 differs from the file's 40x24" in str(
        report.problems[0]
    )


def _png(root: Path, iid: int) -> dict:
    Image.new("RGB", (W, H), (10, 20, 30)).save(root / f"ok{iid}.png")
    return {"id": iid, "file_name": f"ok{iid}.png", "width": W, "height": H}


def test_a_truncated_jpeg_that_pils_verify_accepts_is_dropped_at_check_time(tmp_path):
    save_jpeg(tmp_path / "cut.jpg", Image.effect_noise((W, H), 60).convert("RGB"))
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as im:
        im.verify()  # what the check used to rely on: it passes
    images = [{"id": 1, "file_name": "cut.jpg", "width": W, "height": H}, _png(tmp_path, 2)]
    path = write_coco(tmp_path, images, [])
    coco, report = load_coco(path, tmp_path)
    assert [im["id"] for im in coco["images"]] == [2]
    (problem,) = [str(p) for p in report.problems]
    assert problem.startswith(f"{path}: image 1: file_name: image file unreadable: {tmp_path / 'cut.jpg'}")
    assert "truncated" in problem
    assert report.dropped_images == {"image file unreadable": 1}


def test_a_progressive_jpeg_and_a_cmyk_jpeg_decode_to_rgb_in_0_1(tmp_path):
    save_jpeg(tmp_path / "prog.jpg", displayed(), progressive=True)
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", "JPEG", quality=95)  # red
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    prog = read_image(tmp_path / "prog.jpg")
    assert tuple(prog.shape) == (3, H, W)
    x1, y1, x2, y2 = BOX
    assert prog[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() > 0.9 and prog[:, 0, 0].max() < 0.1
    red = read_image(tmp_path / "cmyk.jpg")
    assert red.dtype == torch.float32 and tuple(red.shape) == (3, H, W)
    torch.testing.assert_close(red.mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=0.03, rtol=0)


def test_16_bit_gray_and_16_bit_rgb_pngs_decode_to_rgb_in_0_1(tmp_path):
    gray = np.full((H, W), 65535 // 4, dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray16.png")  # mode I;16
    image = read_image(tmp_path / "gray16.png")
    torch.testing.assert_close(image, torch.full((3, H, W), (65535 // 4) / 65535), atol=1e-6, rtol=0)
    rgb16 = np.zeros((H, W, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 32768
    (tmp_path / "rgb16.png").write_bytes(_png_rgb16(rgb16))
    image = read_image(tmp_path / "rgb16.png")
    assert 0.0 <= image.min() and image.max() <= 1.0
    torch.testing.assert_close(image.mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-6, rtol=0)


def _png_rgb16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    chunks = [
        (b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)),
        (b"IDAT", zlib.compress(raw)),
        (b"IEND", b""),
    ]
    body = b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/outside.jpg", "a/../../outside.jpg", "C:\\x.jpg"])
def test_a_file_name_that_leaves_the_image_folder_is_refused_by_file_id_and_field(tmp_path, name):
    images = [_png(tmp_path, 1), {"id": 2, "file_name": name, "width": W, "height": H}]
    path = write_coco(tmp_path, images, [])
    for check_images in (True, False):  # a record check: refused even when the files are not opened
        coco, report = load_coco(path, tmp_path, check_images=check_images)
        assert [im["id"] for im in coco["images"]] == [1]
        (problem,) = [str(p) for p in report.problems]
        assert problem.startswith(f"{path}: image 2: file_name: expected a path inside the image folder")
        assert repr(name) in problem


def test_file_names_with_spaces_and_a_harmless_dotdot_load(tmp_path):
    (tmp_path / "my photos").mkdir()
    save_jpeg(tmp_path / "my photos" / "a cat.jpg", displayed())
    images = [
        {"id": 1, "file_name": "my photos/a cat.jpg", "width": W, "height": H},
        {"id": 2, "file_name": "my photos/../my photos/a cat.jpg", "width": W, "height": H},
    ]
    dataset = CocoDataset(write_coco(tmp_path, images, []), tmp_path, strict=True)
    assert len(dataset) == 2 and tuple(dataset[1][0].shape) == (3, H, W)


def test_a_file_that_goes_bad_after_validation_is_skipped_and_named_in_the_next_sample(tmp_path):
    for i in range(3):
        save_jpeg(tmp_path / f"{i}.jpg", displayed())
    images = [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in range(3)]
    dataset = CocoDataset(write_coco(tmp_path, images, []), tmp_path, strict=True)
    data = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(data[: len(data) // 2])  # truncated after validation
    (tmp_path / "2.jpg").unlink()  # and one deleted
    with pytest.raises(ValueError, match=r"1.jpg \(image 1\): could not decode the image"):
        dataset[1]
    skipping = SkipBadSamples(dataset)
    image, target = skipping[1]  # 1 and 2 are bad: wraps around to 0
    assert target["image_id"] == 0 and tuple(image.shape) == (3, H, W)
    assert len(target[SKIPPED]) == 2
    assert "1.jpg (image 1): could not decode" in target[SKIPPED][0]
    assert "2.jpg (image 2): image file not found" in target[SKIPPED][1]
    assert skipping[0][1][SKIPPED] == []
    with pytest.raises(ValueError, match=r"2 samples in a row failed to decode, from index 1:\n.*1.jpg"):
        SkipBadSamples(dataset, max_in_a_row=2)[1]


def test_data_check_caps_image_pixels_by_its_flag_and_refuses_a_cap_over_pils_limit(tmp_path, capsys):
    from retinaops.cli import main

    save_jpeg(tmp_path / "photo.jpg", displayed())
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    images = [
        {"id": 1, "file_name": "photo.jpg", "width": W, "height": H},
        {"id": 2, "file_name": "small.png", "width": 10, "height": 10},
    ]
    path = write_coco(tmp_path, images, [])
    argv = ["data", "check", "--annotations", str(path), "--images", str(tmp_path)]
    assert main([*argv, "--max-image-pixels", str(W * H - 1), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "kept 1 images" in out and "dropped 1 images: 1 image over max_image_pixels" in out
    assert f"image 1: file_name: image too large: {tmp_path / 'photo.jpg'}: 40x24 = 960 pixels" in out
    assert main([*argv, "--max-image-pixels", "200000000"]) == 2
    err = capsys.readouterr().err
    assert err == "retinaops: error: --max-image-pixels: expected 1 to 178956970, got 200000000\n"
