"""A store of extracted descriptors (``--feature_cache DIR``): each part of an evaluation (queries, database,
distractors, SVD videos) is computed once per model and protocol, then read back.

An entry is a folder named by its key, the SHA-256 of everything that changes the descriptors (the caller's
``components``: model file digests, flags, the item list, the protocol) and the format version; ``manifest.json``
repeats the key and the components, so an entry is never read under another key. Items are stored in fixed
shards of ``shard_items`` consecutive items (``shard-000012.npy``, rows x dim, float32 or float16, written
atomically with numpy, no pickle; a video part adds ``shard-000012.lens.npy``, the frames per video). Shards are
written as extraction goes, by whichever process embedded them; the entry counts as complete once the manifest is
written, after the last shard. A killed extraction resumes from the shards on disk.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import UserError
from utils.files import atomic_write, fingerprint, write_json
from utils.locks import LOCK_NAME

STORE_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


REFRESH_FIX = "rerun with --refresh_cache (or delete {folder}) to extract this part again"


class StoreError(UserError, ValueError):
    """A store entry is unusable (a corrupt shard, a folder that holds another entry)."""


def items_fingerprint(names: Sequence[str]) -> str:
    """The identity of an item list: its names, in order."""
    return fingerprint(list(map(str, names)))


class StoreEntry:
    """One part's descriptors under one key."""

    def __init__(self, root: str | os.PathLike, components: dict[str, Any], n_items: int, shard_items: int,
                 dtype: str = "float32", videos: bool = False, rows_per_item: int = 1,
                 extras: tuple[str, ...] = (), fix: str = REFRESH_FIX) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"--cache_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if n_items < 1 or shard_items < 1:
            raise ValueError(f"a store entry needs items and a shard size, got {n_items} and {shard_items}")
        self.components = {"store_version": STORE_VERSION, "dtype": dtype, "shard_items": shard_items,
                           "n_items": n_items, **components}
        self.key = fingerprint(self.components)
        self.folder = Path(root) / self.key[:32]
        self.n_items, self.shard_items, self.dtype, self.videos = n_items, shard_items, dtype, videos
        self.rows_per_item, self.extras = rows_per_item, extras
        self.fix = fix.format(folder=self.folder)  # what a damaged entry's error tells the user to do

    # ---------------------------------------------------------------------------------------------- layout
    @property
    def n_shards(self) -> int:
        return -(-self.n_items // self.shard_items)

    def bounds(self, shard: int) -> tuple[int, int]:
        """Item range ``[start, end)`` of a shard."""
        start = shard * self.shard_items
        return start, min(start + self.shard_items, self.n_items)

    def shard_file(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.npy"

    def lengths_file(self, shard: int) -> Path:
        return self.extra_file(shard, "lens")

    def extra_file(self, shard: int, name: str) -> Path:
        return self.folder / f"shard-{shard:06d}.{name}.npy"

    def rows(self, shard: int, lengths: np.ndarray | None = None) -> int:
        start, end = self.bounds(shard)
        return int(lengths.sum()) if lengths is not None else (end - start) * self.rows_per_item

    @property
    def manifest_file(self) -> Path:
        return self.folder / MANIFEST

    # ------------------------------------------------------------------------------------------------ state
    @property
    def complete(self) -> bool:
        if not self.manifest_file.is_file():
            return False
        try:
            manifest = json.loads(self.manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"feature store manifest {self.manifest_file} is unreadable ({exc}); {self.fix}") from None
        if manifest.get("key") != self.key:
            raise StoreError(f"feature store folder {self.folder} holds another entry (key "
                             f"{str(manifest.get('key'))[:16]}..., wanted {self.key[:16]}...); {self.fix}, or "
                             "give another store folder")
        return True

    def done_shards(self) -> set[int]:
        """Shards whose descriptors are on disk (the descriptor file is written last)."""
        if not self.folder.is_dir():
            return set()
        done = set()
        for path in self.folder.glob("shard-*.npy"):
            stem = path.name[len("shard-"):-len(".npy")]
            if stem.isdigit() and int(stem) < self.n_shards:
                done.add(int(stem))
        return done

    def clear(self) -> None:
        """Forget the entry (``--refresh_cache``): its files are deleted, but for the lock of the job that clears
        it (``utils.locks``)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name == LOCK_NAME:
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    # ------------------------------------------------------------------------------------------ write, read
    def write_shard(self, shard: int, feats: np.ndarray, lengths: np.ndarray | None = None,
                    extras: dict[str, np.ndarray] | None = None) -> None:
        """Descriptors of a shard's items (and, for videos, their frame counts; ``extras``: arrays with a row per
        descriptor row, e.g. a view's parameters); the descriptor file is written last."""
        start, end = self.bounds(shard)
        rows = self.rows(shard, lengths)
        if (lengths is not None and len(lengths) != end - start) or feats.ndim != 2 or feats.shape[0] != rows:
            raise ValueError(f"shard {shard} of {self.folder}: {feats.shape} descriptors for items [{start}, {end})")
        extras = dict(extras or {})
        if sorted(extras) != sorted(self.extras) or any(len(a) != rows for a in extras.values()):
            raise ValueError(f"shard {shard} of {self.folder}: extras {sorted(extras)} for {sorted(self.extras)}")
        self.folder.mkdir(parents=True, exist_ok=True)
        if lengths is not None:
            extras["lens"] = np.asarray(lengths, dtype=np.int64)
        for name, array in extras.items():
            with atomic_write(self.extra_file(shard, name), "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        with atomic_write(self.shard_file(shard), "wb") as f:  # last: its presence marks the shard done
            np.save(f, np.ascontiguousarray(feats, dtype=DTYPES[self.dtype]), allow_pickle=False)

    def _load(self, path: Path, mmap: bool = False) -> np.ndarray:
        """One array file of the entry; a missing, truncated or corrupt one is a ``StoreError`` naming it."""
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise StoreError(f"feature store shard {path} is missing, truncated or corrupt ({exc}); "
                             f"{self.fix}") from None

    def _damaged(self, path: Path, why: str) -> StoreError:
        return StoreError(f"feature store shard {path} does not fit its entry ({why}); {self.fix}")

    def read_shard(self, shard: int, dim: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(descriptors as float32, frames per video or None); a file that does not load with the expected shape is
        a ``StoreError`` naming it."""
        start, end = self.bounds(shard)
        path = self.shard_file(shard)
        lengths = self._load(self.lengths_file(shard)) if self.videos else None
        if lengths is not None and lengths.shape != (end - start,):
            raise self._damaged(self.lengths_file(shard), f"{lengths.shape[0]} frame counts for {end - start} videos")
        feats = self._load(path, mmap=True)
        rows = self.rows(shard, lengths)
        if feats.ndim != 2 or feats.shape[0] != rows or (dim is not None and feats.shape[1] != dim):
            raise self._damaged(path, f"shape {feats.shape}, expected ({rows}, {dim or 'D'})")
        if feats.dtype != DTYPES[self.dtype]:
            raise self._damaged(path, f"dtype {feats.dtype}, expected {self.dtype}")
        try:
            return np.array(feats, dtype=np.float32), lengths  # a copy: one shard in memory, read-write
        except (OSError, ValueError) as exc:
            raise self._damaged(path, str(exc)) from None

    def open_shard(self, shard: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A shard memory-mapped as stored (descriptors, extras): for random access by row (a training loader)."""
        path = self.shard_file(shard)
        feats = self._load(path, mmap=True)
        rows = self.rows(shard, self._load(self.lengths_file(shard)) if self.videos else None)
        if feats.shape[0] != rows:
            raise self._damaged(path, f"{feats.shape[0]} rows, expected {rows}")
        extras = {}
        for name in self.extras:
            extras[name] = self._load(self.extra_file(shard, name), mmap=True)
            if extras[name].shape[0] != rows:
                raise self._damaged(self.extra_file(shard, name), f"{extras[name].shape[0]} rows, expected {rows}")
        return feats, extras

    def finish(self, dim: int) -> None:
        """Write the manifest once every shard is on disk: from now on the entry is read, never extracted."""
        missing = sorted(set(range(self.n_shards)) - self.done_shards())
        if missing:
            raise StoreError(f"feature store entry {self.folder} lacks shard(s) {missing[:5]}: cannot complete it")
        write_json(self.manifest_file, {"key": self.key, "components": self.components, "n_shards": self.n_shards,
                                        "dim": int(dim), "written": time.strftime("%Y-%m-%d %H:%M:%S")})

    @property
    def dim(self) -> int:
        return int(json.loads(self.manifest_file.read_text())["dim"])

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*") if p.is_file()) if self.folder.is_dir() else 0
