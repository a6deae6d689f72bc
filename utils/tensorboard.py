"""A run's metrics records as TensorBoard scalars (``--tensorboard``). The tensorboard package is optional: asking
for it without the package is a usage error before any work."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import UsageError

# the record types and the prefix of their scalars; a record's other types ("resume") hold no figure to plot
PREFIXES = {"iter": "train", "epoch": "epoch", "eval": "eval"}
NOT_FIGURES = {"type", "epoch", "iter", "iteration", "step"}


def check_tensorboard(flag: str = "--tensorboard") -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError(f"{flag} writes TensorBoard event files with the tensorboard package, which is not "
                         "installed: pip install tensorboard (or drop the flag)")


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of every number of ``record``: ``<prefix>/<key>``, a dict's entries as ``<prefix>/<key>/<name>``."""
    prefix = PREFIXES.get(record.get("type", ""))
    if prefix is None:
        return
    for key, value in record.items():
        if key in NOT_FIGURES:
            continue
        if isinstance(value, dict):
            for name, inner in value.items():
                if isinstance(inner, (int, float)) and not isinstance(inner, bool):
                    yield f"{prefix}/{key}/{name}", float(inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", float(value)


def write_evaluation(log_dir: str | os.PathLike, step: int | None, figures: dict[str, float | None]) -> None:
    """An evaluation's figures (tag -> value; None, an undefined mAP, is left out) as ``eval/<tag>`` scalars at
    ``step`` (the evaluated checkpoint's epoch; 0 for a model without one)."""
    writer = ScalarWriter(log_dir, step_key="step")
    try:
        writer.write({"type": "eval", "step": step or 0, **{k: v for k, v in figures.items() if v is not None}})
    finally:
        writer.close()


class ScalarWriter:
    """Writes records' figures (``scalars``) at the step ``record[step_key]`` into ``log_dir``.

    The event file is opened at the first record with ``purge_step`` = its step: the events an earlier run of the
    folder wrote from that step on belong to iterations that run again after a resume, and TensorBoard hides them.
    (Evaluations, one step each, do not purge: each snapshot's is its own.)"""

    def __init__(self, log_dir: str | os.PathLike, step_key: str = "iteration") -> None:
        self.log_dir, self.step_key = Path(log_dir), step_key
        self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        step = record.get(self.step_key)
        figures = list(scalars(record))
        if step is None or not figures:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = int(step) if record.get("type") != "eval" else None
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        for tag, value in figures:
            self.writer.add_scalar(tag, value, int(step))
        if record.get("type") != "iter":  # an epoch's or an evaluation's end: on disk for a watching TensorBoard now
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
