"""Process-wide runtime helpers: seeding and RNG states, mixed precision, FLOP counting, memory layout."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import random
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def python_rng_state(rng: random.Random | Any = random) -> list[Any]:
    """The state of a ``random.Random`` (default: the ``random`` module's) in plain types, which a checkpoint
    loads with ``weights_only=True``."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(rng: random.Random | Any, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(x) for x in internal), gauss))


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, Python) in plain types."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": python_rng_state(random),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    set_python_rng_state(random, state["python"])


AMP_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device: torch.device) -> None:
    """Fail early (before models are built) on an ``--amp`` the device cannot run."""
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs a GPU; use --amp bf16 on CPU.")


def autocast(amp: str, device: torch.device) -> AbstractContextManager:
    """Autocast context for ``--amp``; ``none`` is a no-op (exact fp32)."""
    check_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def count_gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """GFLOPs per image of ``model(x)`` (``torch.utils.flop_counter``: a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 1e9 / x.shape[0]


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """A (N, C, H, W) batch in NHWC memory order: convolutions then run 10-30 % faster on CPU
    (``benchmarks/embedding_cost.py``) and use tensor cores on GPU; values are unchanged, outputs equal up to
    float rounding. Converting the input suffices: a convolution follows its input's layout."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (for its allocator's calls), else None (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Thousands of CPU forwards of images of varying sizes can leave glibc's heap holding gigabytes of freed memory
    that it neither reuses nor returns (measured: a 3,000-image extraction at 64 px grew to 20 GB in one run of
    two, back to 0.8 GB after a trim); extraction loops call this every few dozen batches."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
