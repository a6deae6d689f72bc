"""Process-wide runtime helpers: seeding and RNG states, mixed precision, FLOP counting, memory layout."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from utils.errors import UsageError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_host_rngs(seed: int) -> Iterator[None]:
    """Python's and torch's CPU generators seeded with ``seed`` inside, restored afterwards: what an item's
    augmentation draws from (the transforms use both). The GPUs' generators are never touched: ``torch.manual_seed``
    would reseed them too, and with loading in the training process the fusion strategies' draws on the GPU would
    then depend on the last item loaded."""
    python_state = random.getstate()
    torch_state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.set_rng_state(torch_state)


def mixed_seed(*parts: int, factors: tuple[int, ...]) -> int:
    """One 63-bit seed from several integers: ``((p0 * f0 + p1) * f1 + p2) ...``, the one rule behind the item seeds
    of training and the teacher cache's view seeds (each with its own factors, which fix their streams)."""
    value = parts[0]
    for part, factor in zip(parts[1:], factors, strict=True):
        value = value * factor + part
    return value % (2**63)


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


AMP_DTYPES = {"none": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = tuple(AMP_DTYPES)
AMP_HELP = ("precision of the forward passes. none: true float32 everywhere, as the paper's V100s (no TF32 on "
            "Ampere/Hopper either); tf32: float32 with TF32 tensor cores for convolutions and matrix products (GPU "
            "only, about 10 mantissa bits, several times faster on A100/H100); bf16 / fp16: autocast (fp16 GPU only, "
            "with a gradient scaler in training). The loss is always computed in float32")
CUBLAS_DETERMINISTIC = ":4096:8"  # the workspace setting cuBLAS needs for reproducible results (CUDA >= 10.2)


def check_amp(amp: str, device: torch.device) -> None:
    """Fail early (before models are built) on an ``--amp`` the device cannot run."""
    if amp in ("fp16", "tf32") and device.type != "cuda":
        raise UsageError(f"--amp {amp} needs a GPU; use --amp none or bf16 on CPU.")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UsageError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support (it needs "
                         "compute capability 8.0, Ampere, or newer); use --amp fp16.")


def configure_backends(device: torch.device, amp: str, deterministic: bool = False,
                       fixed_input_size: bool = False) -> None:
    """The numerics of this process's GPU kernels, set once per rank before any model runs.

    * TF32 only with ``--amp tf32``: ``--amp none`` is true float32 (the paper's V100s have no TF32; PyTorch
      enables it for cuDNN convolutions by default on Ampere and newer, so without this ``none`` would not be
      float32 there); ``deterministic`` turns it off too.
    * ``deterministic``: deterministic algorithms where PyTorch has them (a warning names an operation that has
      none), cuDNN's deterministic kernels without autotuning, and cuBLAS's fixed workspace; a run is then
      reproducible bit for bit on the same GPU model, software and number of processes.
    * otherwise cuDNN autotuning where every batch has one size (training crops, PCA crops): it picks the fastest
      convolution kernels once per shape; evaluation images vary in size, where it would tune for every image.
    """
    check_amp(amp, device)
    tf32 = amp == "tf32" and not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = fixed_input_size and device.type == "cuda"


def autocast(amp: str, device: torch.device) -> AbstractContextManager:
    """Autocast context for ``--amp``; ``none`` and ``tf32`` are no-ops (float32; TF32 is a backend setting)."""
    check_amp(amp, device)
    if amp in ("none", "tf32"):
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


def share_cpu_threads(processes: int) -> int:
    """Limit this process's intra-op threads to its share of the cores when ``processes`` CPU processes of this
    node share them (ranks spawned here or by torchrun); never raises the count. Returns the count in use.

    More threads than cores leave OpenMP threads spinning on cores that another rank's threads wait for: two gloo
    ranks with two threads each on two cores trained 15-20x slower than with one thread each (measured on
    tools/gpu_check.py's two-rank svd_distill.py step: 1.0 against 20 images/s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(torch.get_num_threads(), max(1, cores // processes))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


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
