"""Reading an image file for any dataset: as RGB, or an error that names the file (never skipped)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

# Integer modes of one channel wider than 8 bits (16-bit PNG and TIFF greyscale). PIL's ``convert("RGB")`` clips
# them at 255, which makes almost every such image white; they are scaled to 8 bits instead.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
WIDE_GREY_MAX = 65535.0  # "I" holds the 16-bit files' values too (older Pillow opens 16-bit PNGs as "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, 16-bit greyscale scaled (65535 -> 255) rather than clipped."""
    if img.mode in WIDE_GREY_MODES:
        grey = np.asarray(img, dtype=np.float64) * (255.0 / WIDE_GREY_MAX)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike, error: type[Exception], what: str = "image",
             missing_hint: str = "", corrupt_hint: str = "") -> Image.Image:
    """``path`` decoded to RGB; a missing file, one that does not decode (truncated, not an image) or one larger than
    PIL's decompression-bomb limit is ``error`` with the file's path and the hint that fits."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}. {missing_hint}".strip()) from None
    except Image.DecompressionBombError as exc:
        raise error(f"{what} file {path} is larger than PIL's safety limit ({exc}); if you trust it, raise "
                    "PIL.Image.MAX_IMAGE_PIXELS or shrink the image") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise error(f"cannot read {what} file {path} ({exc}); the file is corrupt or not an image. "
                    f"{corrupt_hint}".strip()) from None
