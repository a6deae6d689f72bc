"""Shared settings: the repository root on sys.path, small CPU-only settings, one intra-op thread per xdist worker."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # pyproject's "-n 2": two workers share the cores, and two OpenMP threads per process on a busy core spin-wait
    # (10-40x slower): each worker, and every process it starts (scripts, ranks, the demo's steps), computes with one.
    # "-n 0" keeps OMP_NUM_THREADS as given (the 2-thread rounding, e.g. of the demo's table).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
