"""Shared settings: the repository root on sys.path, small CPU-only settings."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Two xdist workers (and the processes their tests start) run more OpenMP threads than a 2-core machine has; idle
# threads that spin keep the other process's threads off the cores. Sleeping instead changes no result (the same
# threads compute the same sums) and made a 2-thread test 4x faster beside another 2-thread process (27.5 s ->
# 6.7 s; 4.0 s -> 5.5 s alone). It must be set before torch loads OpenMP: here, before any test module imports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The longest files, longest first. The two xdist workers take whole files (--dist loadfile). xdist's own order
# (most tests first) started the demo and the GPU self-test, about 2.5 minutes each with a handful of tests, among
# the last. First, one per worker, the short files fill in around them.
LONGEST_FILES = ("test_gpu_path.py", "test_demo.py", "test_clusters.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: the rest keep their order
