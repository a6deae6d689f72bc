"""Distributed feature extraction shared by the PCA-learning and evaluation scripts.

Each rank embeds its share of the dataset; for PCA learning the rows are folded into sufficient statistics
(``feature_moments``), summed over the ranks by one all-reduce.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from utils.distributed import DistContext, gather_objects
from utils.log import Throughput, progress
from utils.preemption import ignore_stop_signals, interrupted
from utils.runtime import autocast, release_freed_memory

EmbedFn = Callable[[torch.Tensor], torch.Tensor]

PAPER_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
TRIM_EVERY = 64  # batches between returns of freed heap memory (utils.runtime.release_freed_memory)


def distributed_loader(dataset: Dataset, ctx: DistContext, batch_size: int = 1, num_workers: int = 0,
                       collate_fn: Callable | None = None) -> DataLoader:
    """In-order loader over this rank's share, items ``rank, rank + world_size, ...``: every item exactly once over
    all ranks (no padding, so no duplicate is ever counted twice; ranks may differ by one item)."""
    share = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)) if ctx.distributed else dataset
    return DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=ctx.device.type == "cuda", collate_fn=collate_fn, worker_init_fn=ignore_stop_signals)


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize by ``scale`` as the paper (``scale_factor``); an image so small that a side would vanish
    keeps one pixel there (a 1-pixel image at scale 1/2 was an error)."""
    if min(int(side * scale) for side in x.shape[-2:]) >= 1:
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    size = [max(1, int(side * scale)) for side in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def multiscale(embed: EmbedFn, x: torch.Tensor, scales: Sequence[float] = PAPER_SCALES,
               post: EmbedFn | None = None) -> torch.Tensor:
    """Mean over scales of L2(post(L2(embed(resize(x))))), then L2 — the paper's multi-scale descriptor.

    ``post`` is the PCA-whitening of a teacher (then re-normalised per scale); ``None`` for students.
    """
    total = None
    for s in scales:
        xs = x if s == 1 else rescale(x, s)
        v = F.normalize(embed(xs).float(), dim=-1)
        if post is not None:
            v = F.normalize(post(v), dim=-1)
        total = v if total is None else total + v
    return F.normalize(total / len(scales), dim=-1)


def embedded_batches(embed: EmbedFn, loader: DataLoader, ctx: DistContext, amp: str = "none",
                     show_progress: bool = True, desc: str = "extract", unit: str = "img"
                     ) -> Iterator[tuple[torch.Tensor, list[Any]]]:
    """The extraction loop of every script: per batch ``(images, *rest)`` of ``loader``, ``(embed(images) as
    float32 on ctx.device, rest)``, under ``--amp``, with a progress bar of ``unit``/s on rank 0."""
    meter = Throughput()
    bar = progress(loader, enabled=show_progress and ctx.is_main, total=len(loader), desc=desc, unit="batch")
    for batch, (images, *rest) in enumerate(bar, start=1):
        with autocast(amp, ctx.device):
            out = embed(images.to(ctx.device, non_blocking=True))
        meter.update(images.shape[0])
        interrupted()  # a Ctrl-C swallowed by a finaliser (a loader worker's shutdown) still stops the extraction
        if batch % TRIM_EVERY == 0:
            release_freed_memory()
        bar.set_postfix({f"{unit}_s": f"{meter.rate:.1f}"}, refresh=False)
        yield out.float(), rest


@dataclass
class Moments:
    """The sufficient statistics of a set of rows for their mean and covariance: count, sum and ``X^T X`` in
    float64, whatever the number of rows (1 + D + D x D numbers)."""

    count: float
    total: torch.Tensor  # (D,)
    gram: torch.Tensor  # (D, D)


@torch.inference_mode()
def feature_moments(embed: EmbedFn, loader: DataLoader, ctx: DistContext, amp: str = "none",
                    show_progress: bool = True, desc: str = "extract") -> Moments:
    """The moments of ``embed`` over every item of ``loader`` (this rank's share, ``distributed_loader``), summed
    over all ranks by one all-reduce; the same on every rank, on the host.

    Memory does not grow with the number of items: each batch is folded into the sums and dropped (the features of
    GLDv2-clean's 1.58M images at 2048-d would be 13 GB on every rank)."""
    count, total, gram = 0, None, None
    for out, _ in embedded_batches(embed, loader, ctx, amp, show_progress, desc):
        x = out.double()
        if gram is None:
            total = torch.zeros(x.shape[1], dtype=torch.float64, device=ctx.device)
            gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=ctx.device)
        count += x.shape[0]
        total += x.sum(dim=0)
        gram.addmm_(x.T, x)
    dims = [d for d in gather_objects(None if gram is None else gram.shape[0], ctx) if d is not None]
    if not dims:
        raise ValueError("no features were extracted: the dataset is empty")
    if gram is None:  # a rank without items (fewer items than ranks) still takes part in the sum
        total = torch.zeros(dims[0], dtype=torch.float64, device=ctx.device)
        gram = torch.zeros(dims[0], dims[0], dtype=torch.float64, device=ctx.device)
    flat = torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=ctx.device), total, gram.flatten()])
    if ctx.distributed:
        dist.all_reduce(flat)
    flat = flat.cpu()
    d = total.shape[0]
    return Moments(float(flat[0]), flat[1:1 + d], flat[1 + d:].view(d, d))
