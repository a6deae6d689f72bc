"""Reading an image file for any dataset: as RGB, or an error that names the file (never skipped)."""
from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError


def open_rgb(path: str | os.PathLike, error: type[Exception], what: str = "image",
             missing_hint: str = "", corrupt_hint: str = "") -> Image.Image:
    """``path`` decoded to RGB; a missing file or one that does not decode (truncated, not an image) is
    ``error`` with the file's path and the hint that fits."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}. {missing_hint}".strip()) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise error(f"cannot read {what} file {path} ({exc}); the file is corrupt or not an image. "
                    f"{corrupt_hint}".strip()) from None
