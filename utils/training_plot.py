"""A picture of a distillation run from its ``metrics.jsonl``: the loss and the learning rate per iteration, and
each teacher's share of the positive wins (which teacher the ``max`` fusions took on the diagonal)."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.files import atomic_write


def iteration_series(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The plotted series of the ``iter`` records: iterations, loss, lr and, per teacher, its win share (None
    where the strategy does not count wins)."""
    rows = [r for r in records if r.get("type") == "iter"]
    teachers = sorted({t for r in rows for t in (r.get("pos_win_share") or {})})
    return {"iteration": [r["iteration"] for r in rows], "loss": [r["loss"] for r in rows],
            "lr": [r["lr"] for r in rows],
            "wins": {t: [(r.get("pos_win_share") or {}).get(t) for r in rows] for t in teachers}}


def plot_training_metrics(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> dict:
    """Write ``path`` (PNG, atomically) and return the series it drew. Epoch ends are marked on every panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = iteration_series(records)
    if not series["iteration"]:
        raise ValueError("no iteration records to plot (is this the metrics.jsonl of a training run?)")
    epoch_ends = [r["iteration"] for r in records if r.get("type") == "epoch"]
    panels = 3 if series["wins"] else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True, constrained_layout=True)
    x = series["iteration"]
    axes[0].plot(x, series["loss"], color="tab:blue", marker="." if len(x) < 60 else None)
    axes[0].set_ylabel("distillation loss")
    axes[1].plot(x, series["lr"], color="tab:orange")
    axes[1].set_ylabel("learning rate")
    axes[1].set_yscale("log")
    if series["wins"]:
        for name, shares in series["wins"].items():
            points = [(i, s) for i, s in zip(x, shares) if s is not None]
            axes[2].plot([i for i, _ in points], [s for _, s in points], marker=".", label=name)
        axes[2].set_ylabel("positive-win share")
        axes[2].set_ylim(-0.05, 1.05)
        axes[2].legend(loc="best", fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
        for end in epoch_ends:
            ax.axvline(end, color="0.8", linewidth=0.8, zorder=0)
    axes[-1].set_xlabel("iteration (grey lines: epoch ends)")
    if title:
        axes[0].set_title(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(Path(path), "wb") as f:
        f.write(buffer.getvalue())
    return series
