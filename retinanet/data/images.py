"""Image files: decode any PIL-readable image as RGB float, the same way when checking and when training.

Orientation: an image's EXIF orientation tag is applied (`ImageOps.exif_transpose`), as viewers and
annotation tools show it and as COCO records its width and height. A file whose recorded width x height
matches only its stored, un-rotated pixels (orientations 5-8 swap width and height) was annotated on
those pixels, by a tool that ignores the tag: it is read un-rotated, so its boxes still fit. Orientations
2-4 keep the size and are always applied. Checking and decoding make this choice by the same rule.

Size: images over `max_pixels` (default 178,956,970, PIL's own refusal threshold, which is also the
highest cap allowed) are refused from the header, before any pixel is decoded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

FILE_REASONS = (
    "image file not found",
    "image file unreadable",
    "recorded size differs from the file",
    "image over max_image_pixels",
)
ORIENTATION = 0x0112  # the EXIF tag
MAX_IMAGE_PIXELS = 178_956_970  # 2 * PIL's Image.MAX_IMAGE_PIXELS: where PIL itself raises


class ImageTooLargeError(ValueError):
    """An image whose header claims more pixels than the cap; nothing of it was decoded."""


def escapes_root(file_name: str) -> bool:
    """Whether a COCO file_name leaves the image folder: absolute, a drive, or `..` out of it."""
    if PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).is_absolute():
        return True
    if PureWindowsPath(file_name).drive or file_name.startswith("\\"):
        return True
    normal = os.path.normpath(file_name.replace("\\", "/"))
    return normal == ".." or normal.startswith("../")


@contextmanager
def _open(path: str | Path, max_pixels: int) -> Iterator[Image.Image]:
    """The opened (not yet decoded) image, refused when its header claims over max_pixels.

    PIL warns (DecompressionBombWarning) between its two thresholds; the cap decides instead, explicitly:
    an image under it was allowed by the setting, one over it raises. The warning is not left to pass."""
    if not 0 < max_pixels <= MAX_IMAGE_PIXELS:
        raise ValueError(f"max_pixels: expected an integer in [1, {MAX_IMAGE_PIXELS}], got {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decided by max_pixels below
            im = Image.open(path)
    except Image.DecompressionBombError as e:  # over PIL's own threshold, which bounds max_pixels
        raise ImageTooLargeError(f"DecompressionBombError: {e} (data.max_image_pixels={max_pixels})") from e
    try:
        if im.width * im.height > max_pixels:
            raise ImageTooLargeError(
                f"{im.width}x{im.height} = {im.width * im.height} pixels, over the cap of {max_pixels} "
                "(data.max_image_pixels); refused before decoding"
            )
        yield im
    finally:
        im.close()


def _decode(im: Image.Image, width: int | None, height: int | None) -> Image.Image:
    """The decoded image, oriented as the recorded width x height says (module docstring)."""
    im.load()  # a full decode: a truncated JPEG or a corrupt PNG stream raises here
    if im.getexif().get(ORIENTATION, 1) in (0, 1):
        return im  # no rotation: spare exif_transpose's copy
    oriented = ImageOps.exif_transpose(im)
    if width is None or oriented.size == (width, height) or im.size != (width, height):
        return oriented  # a size that fits neither is reported by the caller against the oriented one
    return im


def image_file_error(
    path: Path, width: int, height: int, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[str, str] | None:
    """(reason, message) when the file is missing, does not decode fully, is over max_pixels, or is not
    width x height (oriented or as stored, module docstring); None when it is fine. Decodes every pixel."""
    if not path.is_file():
        return FILE_REASONS[0], f"image file not found: {path}"
    try:
        with _open(path, max_pixels) as im:
            size = _decode(im, width, height).size
    except ImageTooLargeError as e:
        return FILE_REASONS[3], f"image too large: {path}: {e}"
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on corrupt files
        return FILE_REASONS[1], f"image file unreadable: {path}: {type(e).__name__}: {e}"
    if size != (width, height):
        msg = f"recorded width x height {width}x{height} differs from the file's {size[0]}x{size[1]}: {path}"
        return FILE_REASONS[2], msg
    return None


def read_image(
    path: str | Path,
    *,
    image_id: int | None = None,
    size: tuple[int, int] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Tensor:
    """Decode to float32 (3, H, W) RGB in [0, 1], EXIF orientation applied (or not, to fit `size`, the
    recorded (width, height): module docstring). Grayscale, palette, alpha and CMYK are converted to RGB;
    16-bit images (modes I;16 and I) are scaled by 1/65535, 16-bit RGB arrives from PIL as 8-bit RGB.
    Raises ValueError naming the file on failure, ImageTooLargeError over max_pixels."""
    where = f"{path}" + (f" (image {image_id})" if image_id is not None else "")
    width, height = size if size is not None else (None, None)
    try:
        with _open(path, max_pixels) as opened:
            im = _decode(opened, width, height)
            if im.mode.startswith("I"):  # 16-bit grayscale
                gray = np.clip(np.array(im, dtype=np.float32) / 65535.0, 0.0, 1.0)  # (H, W)
                return torch.from_numpy(gray)[None].expand(3, -1, -1).contiguous()  # (3, H, W)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            rgb = np.array(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except FileNotFoundError as e:
        raise ValueError(f"{where}: image file not found") from e
    except ImageTooLargeError as e:
        raise ImageTooLargeError(f"{where}: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on corrupt files
        raise ValueError(f"{where}: could not decode the image: {type(e).__name__}: {e}") from e
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
