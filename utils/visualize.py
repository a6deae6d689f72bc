"""Pictures of retrievals: a PNG strip per query, the query then its top results framed by their label."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from utils.files import atomic_write

LABEL_COLOURS = {
    "query": (40, 90, 220),
    "positive": (30, 170, 60),
    "junk": (245, 150, 20),
    "negative": (220, 40, 40),
}


def save_retrieval_strip(path: str | os.PathLike, query_img: Image.Image,
                         results: Sequence[tuple[Image.Image, str]], cell: int = 128, frame: int = 5,
                         gap: int = 4, captions: Sequence[str] | None = None) -> Path:
    """Write ``path`` (PNG): the query (blue frame) then each result framed green (positive), orange (junk) or
    red (negative). Images are scaled to fit ``cell`` x ``cell``; ``captions`` (one per result) go underneath."""
    unknown = sorted({label for _, label in results} - set(LABEL_COLOURS))
    if unknown:
        raise ValueError(f"unknown result label(s) {unknown}; use positive, junk or negative")
    if captions is not None and len(captions) != len(results):
        raise ValueError(f"{len(captions)} captions for {len(results)} results")
    tiles = [(query_img, "query", "query")]
    tiles += [(img, label, captions[i] if captions is not None else f"#{i + 1}")
              for i, (img, label) in enumerate(results)]
    box = cell + 2 * frame
    text_h = 14
    strip = Image.new("RGB", (len(tiles) * (box + gap) + gap, box + 2 * gap + text_h), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for k, (img, label, caption) in enumerate(tiles):
        x0 = gap + k * (box + gap)
        draw.rectangle([x0, gap, x0 + box - 1, gap + box - 1], fill=LABEL_COLOURS[label])
        thumb = ImageOps.contain(img.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS)
        inner = Image.new("RGB", (cell, cell), (255, 255, 255))
        inner.paste(thumb, ((cell - thumb.width) // 2, (cell - thumb.height) // 2))
        strip.paste(inner, (x0 + frame, gap + frame))
        draw.text((x0 + 2, gap + box + 1), caption, fill=(0, 0, 0))
    path = Path(path)
    with atomic_write(path, "wb") as f:
        strip.save(f, format="PNG")
    return path
