"""A training run's folder (``-c/--ckpt_dir``): which files make a run, which checkpoint to resume, and a metrics
file that stays consistent with the state a run resumes from.

Files: ``config.yaml``, ``log.log``, ``metrics.jsonl``, ``checkpoint_last.pt`` (every ``--save_every`` epochs) and
``checkpoint_{epoch}.pt`` (every ``--snapshot_step`` epochs). A snapshot is written before ``checkpoint_last.pt``,
so a kill between the two leaves the newer state in the snapshot, and ``-r auto`` resumes from the newest of them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from utils.files import read_jsonl, stale_temporaries, write_text

LAST_CHECKPOINT = "checkpoint_last.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.log"
TENSORBOARD_DIR = "tensorboard"  # --tensorboard's event files
_SNAPSHOT = re.compile(r"checkpoint_(\d+)\.pt")


def snapshot_name(epoch: int) -> str:
    return f"checkpoint_{epoch}.pt"


def snapshots(ckpt_dir: str | os.PathLike) -> dict[int, Path]:
    """{epoch: path} of the ``checkpoint_{epoch}.pt`` files in the folder."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _SNAPSHOT.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def run_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The files that show a training run already used this folder (checkpoints, or metrics with records)."""
    folder = Path(ckpt_dir)
    found = [folder / LAST_CHECKPOINT] if (folder / LAST_CHECKPOINT).is_file() else []
    found += [snapshots(folder)[e] for e in sorted(snapshots(folder))]
    if read_jsonl(folder / METRICS_FILE):
        found.append(folder / METRICS_FILE)
    return found


def clear_run(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Delete a previous run's files (``--overwrite``); returns what was deleted."""
    folder = Path(ckpt_dir)
    doomed = run_files(folder) + [folder / n for n in (CONFIG_FILE, LOG_FILE, METRICS_FILE) if (folder / n).is_file()]
    doomed += sorted((folder / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    doomed = list(dict.fromkeys(doomed)) + stale_temporaries(folder)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def truncate_metrics(ckpt_dir: str | os.PathLike, iteration: int) -> int:
    """Keep the metrics records up to ``iteration`` (the resumed state): the iterations after it are run again and
    recorded again. Returns the number of records dropped."""
    path = Path(ckpt_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if int(r.get("iteration", 0)) <= iteration]
    canonical = "".join(json.dumps(r) + "\n" for r in kept)
    if len(kept) != len(records) or path.read_text() != canonical:  # also a torn last line: the next append
        write_text(path, canonical)  # would continue it, and the file could no longer be read
    return len(records) - len(kept)
