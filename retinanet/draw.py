"""Draw detections on an image for a human to look at.

Legend: K detections, H/W image height and width in pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

logger = logging.getLogger(__name__)

# Distinct, saturated colours; label i gets PALETTE[i % len(PALETTE)].
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


def to_pil(image: Tensor | Image.Image) -> Image.Image:
    """A new RGB PIL image from a (3, H, W) float tensor in [0, 1] or from a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # convert always copies, so drawing never touches the caller's image
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"draw_detections: image must be a (3, H, W) float tensor or a PIL image, got {got}")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def label_name(class_names: Sequence[str], label: int) -> str:
    """The class name of a contiguous label, or the label as text when there is no name for it."""
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def draw_detections(
    image: Tensor | Image.Image,
    detections: Mapping[str, Tensor],
    class_names: Sequence[str],
    score_thresh: float = 0.3,
) -> Image.Image:
    """A copy of the image with every detection scoring >= score_thresh drawn as a box and "name 0.87".

    `detections` holds xyxy `boxes` (K, 4) in the image's pixels, `scores` (K,) and contiguous `labels` (K,);
    a label without a name is drawn as its number.
    """
    canvas = to_pil(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    boxes = torch.as_tensor(detections["boxes"]).detach().cpu().float().reshape(-1, 4)  # (K, 4)
    scores = torch.as_tensor(detections["scores"]).detach().cpu().float().reshape(-1)  # (K,)
    labels = torch.as_tensor(detections["labels"]).detach().cpu().long().reshape(-1)  # (K,)
    keep = scores >= score_thresh  # (K,)
    # Lowest score first, so the most confident boxes end up on top.
    order = scores[keep].argsort()
    for box, score, label in zip(
        boxes[keep][order].tolist(), scores[keep][order].tolist(), labels[keep][order].tolist(), strict=True
    ):
        color = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=color, width=2)
        text = f"{label_name(class_names, label)} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 2, bottom - top + 2
        # Above the box, or inside it when the box touches the top edge; never past the right edge.
        x = max(0.0, min(box[0], canvas.width - text_w))
        y = box[1] - text_h if box[1] >= text_h else box[1]
        draw.rectangle((x, y, x + text_w, y + text_h), fill=color)
        draw.text((x + 1 - left, y + 1 - top), text, fill=(0, 0, 0), font=font)
    return canvas
