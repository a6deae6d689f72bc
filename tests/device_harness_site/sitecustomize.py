"""Started by ``tests/device_harness.py`` (through PYTHONPATH): every Python process under it is tracked."""
import os

if os.environ.get("DEVICE_HARNESS_REPORTS"):
    from device_harness import track_this_process

    track_this_process()
