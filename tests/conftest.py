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
    # (10-40x slower); each worker computes with one. Subprocesses keep their own setting (OMP_NUM_THREADS).
    torch.set_num_threads(1)
