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


MAX_EPOCH_LINES = 30  # more epoch ends than this are marked by an epoch axis, not one line each
SMOOTHED_POINTS = 50  # the loss is smoothed over about len/50 records: a curve that a noisy loss does not hide


def smoothed(values: Sequence[float], window: float) -> list[float]:
    """The exponential moving average over about ``window`` values, debiased so that it starts at the first value
    (TensorBoard's smoothing, with weight 1 - 1/window)."""
    weight = 1.0 - 1.0 / max(1.0, window)
    average, out = 0.0, []
    for n, value in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * value
        out.append(average / (1.0 - weight ** n) if weight > 0 else value)
    return out


def piecewise_linear(x: Any, xs: Sequence[float], ys: Sequence[float]) -> Any:
    """``np.interp`` through the points (xs, ys), continued beyond both ends along the end segments (an axis's
    margins lie outside the points: clamped, they would label the margin with the last epoch)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.interp(x, xs, ys)
    low = ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    high = ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return np.where(x < xs[0], low, np.where(x > xs[-1], high, y))


def plot_training_metrics(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> dict:
    """Write ``path`` (PNG, atomically) and return the series it drew: the loss, raw and smoothed, the lr and the
    win shares. Epoch ends are lines on every panel, or an epoch axis on top when there are many."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = iteration_series(records)
    if not series["iteration"]:
        raise ValueError("no iteration records to plot (is this the metrics.jsonl of a training run?)")
    epoch_ends = [r["iteration"] for r in records if r.get("type") == "epoch"]
    series["loss_smoothed"] = smoothed(series["loss"], len(series["loss"]) / SMOOTHED_POINTS)
    series["epoch_marks"] = "lines" if len(epoch_ends) <= MAX_EPOCH_LINES else "axis"
    panels = 3 if series["wins"] else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True, constrained_layout=True)
    x = series["iteration"]
    axes[0].plot(x, series["loss"], color="tab:blue", alpha=0.3, marker="." if len(x) < 60 else None, label="raw")
    axes[0].plot(x, series["loss_smoothed"], color="tab:blue", label="smoothed")
    axes[0].set_ylabel("distillation loss")
    axes[0].legend(loc="upper right", fontsize="small")
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
        for end in epoch_ends if series["epoch_marks"] == "lines" else []:
            ax.axvline(end, color="0.8", linewidth=0.8, zorder=0)
    if series["epoch_marks"] == "axis":  # iteration <-> epoch through the recorded epoch ends
        ends, counts = [0, *epoch_ends], list(range(len(epoch_ends) + 1))
        top = axes[0].secondary_xaxis("top", functions=(lambda i: piecewise_linear(i, ends, counts),
                                                        lambda e: piecewise_linear(e, counts, ends)))
        top.set_xlabel("epoch")
    axes[-1].set_xlabel("iteration" + (" (grey lines: epoch ends)" if series["epoch_marks"] == "lines" else ""))
    if title:
        axes[0].set_title(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(Path(path), "wb") as f:
        f.write(buffer.getvalue())
    return series
