"""One writer per folder: a lock file that names its holder, safe on a shared file system.

A run folder (``-c``), a feature-store entry being extracted and a teacher cache being built are written by one job
at a time; a second job that tries gets one line naming the holder (host, pid, since when) instead of two jobs
writing the same checkpoints or shards.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFS v3+), holding the holder's
host, pid and a random token. While it is held a thread touches it every ``HEARTBEAT_S`` seconds. A lock is stale,
and taken over, when its holder is a process of this host that no longer exists, or when it has not been touched
for ``STALE_AFTER_S`` seconds (a holder on another host that died: its heartbeat stopped). A take-over renames the
stale file to a name of its own first (only one contender can win that rename), then creates the lock anew.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from utils.errors import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class LockHeld(UserError, RuntimeError):
    """The folder is locked by a live writer; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_id() -> str | None:
    """The cluster job this process belongs to: a requeued SLURM job keeps its id, so its new incarnation (on any
    node, minutes after a SIGKILL) takes over the lock of the old one."""
    return os.environ.get("SLURM_JOB_ID")


class FolderLock:
    """``with FolderLock(folder, "the run folder -c"):`` holds ``folder/.lock``; ``LockHeld`` if a live writer has
    it (another process, or this one through another ``FolderLock``)."""

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        return _read(self.path)

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # a lock file torn by a kill between its creation and its write
            try:
                return time.time() - self.path.stat().st_mtime > HEARTBEAT_S
            except FileNotFoundError:
                return True
        if holder.get("job") is not None and holder.get("job") == _job_id():
            return int(holder.get("pid", -1)) != os.getpid() or holder.get("host") != socket.gethostname()
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", -1)))
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(), "token": self.token,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return True

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, daemon=True)
                self._thread.start()
                return self
            holder = self.holder()
            if not self._stale(holder):
                who = f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" \
                    if holder else "a process that is starting"
                raise LockHeld(f"{self.what} {self.path.parent} is in use by {who} (lock file {self.path}); wait "
                               "for it to finish, or delete the lock file if that process is gone")
            grave = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
            try:
                os.rename(self.path, grave)  # one contender wins; the others find the new lock or none
                grave.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        raise LockHeld(f"{self.what} {self.path.parent}: could not take its lock {self.path} (contended)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:  # never remove another holder's lock
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_for_job(folder: str | os.PathLike, what: str, is_main: bool) -> FolderLock | None:
    """Rank 0 takes the lock for the whole job (its ranks may be on other hosts); every rank learns the answer, so
    that all stop with the same one-line error when another job holds it. Returns the lock on rank 0 (release it
    there), None elsewhere. Call it on every rank."""
    from utils.distributed import broadcast_object

    lock, refusal = None, None
    if is_main:
        try:
            lock = FolderLock(folder, what).acquire()
        except LockHeld as exc:
            refusal = str(exc)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise LockHeld(refusal)  # on every rank, so that all end with the same line
    return lock
