"""Stopping a long job cleanly when the cluster asks: SIGTERM (a preemption, ``scancel``) or SIGUSR1 (what SLURM
sends ahead of the time limit with ``--signal=USR1@SECONDS``).

The handler only notes the request; the training loop asks ``agreed(ctx)`` after every iteration, all ranks
together, so every rank stops after the same iteration, a checkpoint is written and the job exits with
``EXIT_PREEMPTED``. A handler that was installed before (submitit's, which requeues the job) is called after the
checkpoint.

Outside training (evaluation, PCA learning, the tools) ``signal_exits`` ends the process on a signal: Ctrl-C in one
line and ``EXIT_INTERRUPTED``, a stop signal in one line and ``EXIT_PREEMPTED``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from utils.distributed import DistContext

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with its state saved; run again with -r auto
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Notes SIGTERM/SIGUSR1 while installed (``with StopRequest() as stop: ...``)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, ctx: DistContext) -> bool:
        """True on every rank as soon as any rank received a stop signal (a collective: call it on all ranks)."""
        if not ctx.distributed:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit_preempted(self) -> NoReturn:
        """After the state was saved: the handler installed before runs (submitit's requeues the job and exits),
        else the process exits with ``EXIT_PREEMPTED``."""
        requeue = self.previous_handler()
        if requeue is not None:
            requeue(self.received, None)
        raise SystemExit(EXIT_PREEMPTED)

    def previous_handler(self) -> Callable[[int, FrameType | None], Any] | None:
        """The handler the received signal had before (e.g. submitit's requeue), if it was a Python function."""
        handler = self._previous.get(self.received) if self.received is not None else None
        return handler if callable(handler) else None


def ignore_stop_signals(*_: Any) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the training process, which finishes the iteration and saves."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignal(Exception):
    """SIGTERM/SIGUSR1 outside training: the work stops where it is (what it wrote atomically is kept: store shards,
    extracted videos) and the process exits with ``EXIT_PREEMPTED``, so that a cluster job requeues."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped on {signal.Signals(signum).name}")
        self.signum = signum


class StopOnSignals:
    """``with StopOnSignals():`` SIGTERM/SIGUSR1 raise ``StopSignal`` at once (training installs ``StopRequest``
    inside, which stops after an iteration instead). A signal that already has a Python handler (submitit's, which
    requeues the job) keeps it, so that training's ``StopRequest`` still finds and calls it. A no-op outside the
    main thread."""

    def __enter__(self) -> StopOnSignals:
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if not callable(signal.getsignal(sig)):
                    self._previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise StopSignal(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class InterruptLatch:
    """Ctrl-C that cannot be lost. Python raises KeyboardInterrupt wherever the main thread is when SIGINT
    arrives; inside a ``__del__`` or a finaliser (a DataLoader iterator shutting its workers down, a temporary file
    closing) it is printed as "Exception ignored" and the program goes on, to its end with exit code 0. The latch's
    handler also notes the signal, and ``check()`` (the loops call ``interrupted()`` between steps; the launcher
    calls ``check()`` when the work returns) raises KeyboardInterrupt again if it was noted."""

    received = False  # of this process

    def __enter__(self) -> InterruptLatch:
        InterruptLatch.received = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    @staticmethod
    def _note(signum: int, frame: Any) -> None:
        InterruptLatch.received = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if InterruptLatch.received:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was noted and swallowed since (call it between the steps of a loop)."""
    if InterruptLatch.received:
        raise KeyboardInterrupt


def script_name() -> str:
    """The name the one-line reports start with (``gld_distill.py: interrupted``)."""
    return os.path.basename(sys.argv[0]) or "python"


@contextlib.contextmanager
def signal_exits(speak: bool = True) -> Iterator[None]:
    """How a script or tool ends on a signal: Ctrl-C in one line and exit code 130 (never lost: ``InterruptLatch``);
    a cluster's SIGTERM/SIGUSR1 outside training (which stops after an iteration instead) in one line and exit code
    75, so that a job requeues, keeping what was completed. ``speak``: print the line (rank 0 only)."""
    try:
        with InterruptLatch() as latch, StopOnSignals():
            yield
            latch.check()  # a Ctrl-C that a __del__ or a finaliser swallowed still ends the process
    except KeyboardInterrupt:
        if speak:
            print(f"{script_name()}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except StopSignal as stop:
        if speak:
            print(f"{script_name()}: {stop}: what was completed is kept (checkpoints, store and cache shards, "
                  "extracted files); run the same command again to continue", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
