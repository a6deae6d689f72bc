"""Flags and helpers every script shares: seeding, mixed precision, progress switch, file trust."""
from __future__ import annotations

import argparse
import contextlib
import random
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from utils.argtypes import seed_int
from utils.distributed import add_distributed_args


def add_runtime_args(parser: argparse.ArgumentParser, dist_url: str = "env://") -> None:
    """Flags common to the six scripts (all additive to the paper's own)."""
    add_distributed_args(parser, dist_url=dist_url)
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=seed_int, default=0, help="seed of every random generator (default 0)")
    group.add_argument("--amp", type=str, default="none", choices=["none", "bf16", "fp16"],
                       help="autocast precision for forward passes (default none = fp32, as the paper)")
    group.add_argument("--no_progress", action="store_true", help="disable progress bars")
    group.add_argument("--trust_checkpoint", action="store_true",
                       help="load weight files with full unpickling (only for files you trust)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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
