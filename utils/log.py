"""Logging on rank 0: a console + file logger, a JSON-lines metrics writer and a progress bar."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils.files import OutputError

LOGGER_NAME = "whiten_mtd"
# ``logger.info(..., extra=FILE_ONLY)``: a line for the run's log file, kept off the console (the argument dump,
# iteration records without --log_every)
FILE_ONLY = {"file_only": True}


def _for_the_console(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(is_main: bool, log_file: str | os.PathLike | None = None) -> logging.Logger:
    """Rank 0 logs INFO to stdout (and ``log_file``); other ranks log warnings only."""
    logger = get_logger()
    for handler in logger.handlers:  # a previous run in this process (the Python API, tests): its log file closed
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.addFilter(_for_the_console)
    logger.addHandler(console)
    if is_main and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def close_logging() -> None:
    """Detach the run's console and file handlers when it ends: a later run in this process (the Python API, tests)
    must not write into this run's log."""
    logger = get_logger()
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_run_header(logger: logging.Logger, args: Any, launch: str | None = None) -> None:
    """How the run was launched, on the console; what a reader of the log needs to reproduce it (the git revision,
    every argument) in the log file only."""
    if launch:
        logger.info("%s", launch)
    logger.info("git revision: %s", git_revision(), extra=FILE_ONLY)
    for key, value in sorted(vars(args).items()):
        logger.info("  %s: %s", key, value, extra=FILE_ONLY)


class MetricsWriter:
    """Append one JSON object per line (rank 0 only; a no-op elsewhere), and its figures as TensorBoard scalars
    into ``tensorboard`` when given (``utils.tensorboard``)."""

    def __init__(self, path: str | os.PathLike | None, tensorboard: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scalars = None
        if tensorboard is not None:
            from utils.tensorboard import ScalarWriter

            self.scalars = ScalarWriter(tensorboard)

    def close(self) -> None:
        if self.scalars is not None:
            self.scalars.close()

    def write(self, record: dict[str, Any]) -> None:
        if self.scalars is not None:
            self.scalars.write(record)
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as exc:
            gone = "" if self.path.parent.is_dir() else f" (the run folder {self.path.parent} was removed)"
            raise OutputError(f"cannot append to {self.path}: {exc.strerror or exc}{gone}") from None


class Quiet:
    """A progress bar that shows nothing (other ranks, ``--no_progress``): it iterates and ignores the figures."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def set_postfix(self, *figures: Any, **named: Any) -> None:
        pass


def progress(iterable: Iterable, enabled: bool, total: int | None = None, desc: str = "",
             unit: str = "it") -> tqdm | Quiet:
    """A tqdm bar on rank 0 (when enabled), a ``Quiet`` one elsewhere; both take ``set_postfix(**figures)`` (the
    live figures a bar shows after its rate: loss, lr, images/s)."""
    if not enabled:
        return Quiet(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


class Throughput:
    """Items per second since construction (or the last ``reset``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def update(self, n: int) -> float:
        self.count += n
        return self.rate

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0
