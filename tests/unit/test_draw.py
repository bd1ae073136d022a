"""Drawing detections: the boxes land where the detections say, and the input is left alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from retinanet.draw import PALETTE, draw_detections


def detections(score: float) -> dict:
    return {
        "boxes": torch.tensor([[8.0, 20.0, 40.0, 44.0]]),
        "scores": torch.tensor([score]),
        "labels": torch.tensor([1]),
    }


def test_box_outline_is_drawn_in_the_label_colour() -> None:
    out = draw_detections(torch.zeros(3, 48, 64), detections(0.9), ["a", "b"])
    assert out.size == (64, 48)
    assert out.getpixel((24, 44)) == PALETTE[1]  # bottom edge of the box
    assert out.getpixel((2, 2)) == (0, 0, 0)


def test_detection_below_score_thresh_is_not_drawn() -> None:
    out = draw_detections(torch.zeros(3, 48, 64), detections(0.2), ["a", "b"], score_thresh=0.3)
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_pil_input_is_copied_not_drawn_on() -> None:
    image = Image.new("RGB", (64, 48))
    draw_detections(image, detections(0.9), ["a"])  # label 1 has no name: drawn as "1"
    assert image.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_image_of_wrong_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\(3, H, W\) float tensor or a PIL image, got \(48, 64\)"):
        draw_detections(torch.zeros(48, 64), detections(0.9), ["a"])
