"""Image files: read any PIL-readable image as RGB float, and check a file before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

FILE_REASONS = ("image file not found", "image file unreadable", "recorded size differs from the file")


def image_file_error(path: Path, width: int, height: int) -> tuple[str, str] | None:
    """(reason, message) when the file is missing, unreadable or not width x height; reads the header only."""
    if not path.is_file():
        return FILE_REASONS[0], f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # checks PNG chunk checksums without decoding; JPEG is only checked when decoded
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on corrupt files
        return FILE_REASONS[1], f"image file unreadable: {path}: {type(e).__name__}: {e}"
    if size != (width, height):
        msg = f"recorded width x height {width}x{height} differs from the file's {size[0]}x{size[1]}: {path}"
        return FILE_REASONS[2], msg
    return None


def read_image(path: str | Path, *, image_id: int | None = None) -> Tensor:
    """Decode to float32 (3, H, W) RGB in [0, 1]. Grayscale, palette and alpha are converted to RGB;
    16-bit images (mode I;16 or I) are scaled by 1/65535. Raises ValueError naming the file on failure."""
    where = f"{path}" + (f" (image {image_id})" if image_id is not None else "")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # 16-bit grayscale
                gray = np.clip(np.array(im, dtype=np.float32) / 65535.0, 0.0, 1.0)  # (H, W)
                return torch.from_numpy(gray)[None].expand(3, -1, -1).contiguous()  # (3, H, W)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            rgb = np.array(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except FileNotFoundError as e:
        raise ValueError(f"{where}: image file not found") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on corrupt files
        raise ValueError(f"{where}: could not decode the image: {type(e).__name__}: {e}") from e
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
