"""Pictures of retrievals: a PNG strip per query (the query then its top results framed by their label) and a grid
of several queries and models."""
from __future__ import annotations

import io
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


def save_retrieval_grid(path: str | os.PathLike, rows: Sequence[tuple[str, Image.Image, Sequence[tuple]]],
                        title: str = "", cell: float = 1.25) -> Path:
    """Write ``path`` (PNG, matplotlib): one row per ``(row label, query image, results)``, the query then its
    results, each ``(image, label, rank, score)`` framed by its label, with the rank and the score under it and a
    legend of the frame colours. Rows of several models for one query compare them side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    unknown = sorted({r[1] for _, _, results in rows for r in results} - set(LABEL_COLOURS))
    if unknown:
        raise ValueError(f"unknown result label(s) {unknown}; use positive, junk or negative")
    n_cols = 1 + max(len(results) for _, _, results in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(cell * n_cols + 1.6, cell * 1.22 * len(rows) + 0.9),
                             squeeze=False)
    for axes_row, (label, query, results) in zip(axes, rows):
        tiles = [(query, "query", "query")] + [(img, kind, f"#{rank}   {score:.3f}")
                                                for img, kind, rank, score in results]
        for ax, (img, kind, caption) in zip(axes_row, tiles):
            ax.imshow(img.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor([c / 255 for c in LABEL_COLOURS[kind]])
                spine.set_linewidth(4)
            ax.set_xlabel(caption, fontsize=8, labelpad=2)
        for ax in axes_row[len(tiles):]:
            ax.axis("off")
        axes_row[0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
    handles = [Patch(facecolor="none", edgecolor=[c / 255 for c in colour], linewidth=3, label=kind)
               for kind, colour in LABEL_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())
    return path
