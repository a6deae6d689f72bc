"""Stopping a long job cleanly when the cluster asks: SIGTERM (a preemption, ``scancel``) or SIGUSR1 (what SLURM
sends ahead of the time limit with ``--signal=USR1@SECONDS``).

The handler only notes the request; the training loop asks ``agreed(ctx)`` after every iteration, all ranks
together, so every rank stops after the same iteration, a checkpoint is written and the job exits with
``EXIT_PREEMPTED``. A handler that was installed before (submitit's, which requeues the job) is called after the
checkpoint.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from utils.distributed import DistContext

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with its state saved; run again with -r auto
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
