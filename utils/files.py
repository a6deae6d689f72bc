"""Output files that are complete or absent: every file this project writes goes through ``atomic_write``.

The content is written to a temporary file in the destination folder, flushed and fsynced, then renamed over the
destination (``os.replace`` is atomic on POSIX and Windows), so a crash, a kill or Ctrl-C never leaves a torn file
and a failed write keeps the previous version.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from utils.errors import UserError


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputError(UserError, OSError):
    """An output file could not be written (disk full, permissions); the previous version, if any, is intact."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """``with atomic_write(path, "wb") as f: ...``: ``path`` appears, complete, only when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise OutputError(f"cannot write {path}: {exc.strerror or exc} ({kept})") from exc
        raise
    _fsync_folder(path.parent)


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files ``atomic_write`` left in ``folder`` when its process was killed mid-write."""
    return sorted(Path(folder).glob(".*.tmp"))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON with a final newline, atomically; NaN and infinities (which JSON lacks) become null."""
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records (JSON objects) of a JSON-lines file; a torn last line (a kill during an append) is not a record.
    Any other line that is not a JSON object is a ``ValueError`` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # only the line being appended when the writer died can be torn
                break
            raise ValueError(f"{path}:{i + 1} is not a JSON record: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks (a 250 MB teacher file takes about a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(items: object) -> str:
    """SHA-256 of a JSON-serialisable value (a training list's names and order, a cache key)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def files_exist(paths: Sequence[str | os.PathLike], workers: int = 32, chunk: int = 2048) -> list[bool]:
    """``os.path.isfile`` of every path, in order, by a pool of threads (a network file system answers many
    stats at once; one R1M list of 1M files takes seconds). Chunked: one future per ``chunk`` paths."""
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [ok for block in pool.map(lambda ps: [os.path.isfile(p) for p in ps], chunks) for ok in block]


def read_text(path: str | os.PathLike, error: type[Exception], what: str) -> str:
    """A text file's content; a file that is not UTF-8 text (a binary or a partial download) or not readable is
    ``error`` naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not a text file (byte {exc.start} is not UTF-8); download or write it "
                    "again") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
