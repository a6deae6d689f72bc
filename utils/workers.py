"""Pools of worker processes or threads for the data tools, which a Ctrl-C ends at once and quietly."""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor


def ignore_interrupts() -> None:
    """Initializer of the worker processes: Ctrl-C and a cluster's SIGTERM/SIGUSR1 reach the whole process group,
    and only the tool itself answers them (each worker would print a traceback, or die and break the pool)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def worker_pool(jobs: int, processes: bool = True) -> Iterator[Executor]:
    """A pool of ``jobs`` processes (or threads). On an error or Ctrl-C the work not yet started is cancelled (a
    plain ``with`` would wait for every queued task, hours of a dataset) and the running tasks finish."""
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=ignore_interrupts) if processes \
        else ThreadPoolExecutor(max_workers=jobs)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
