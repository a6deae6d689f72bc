"""Distributed feature extraction shared by the PCA-learning and evaluation scripts.

Each rank embeds its share of the dataset; rows are reassembled by dataset index on every rank, so the padding
a distributed sampler adds never yields duplicate or zero rows.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from utils.distributed import DistContext, gather_by_index
from utils.log import Throughput, progress
from utils.runtime import autocast, release_freed_memory

EmbedFn = Callable[[torch.Tensor], torch.Tensor]

PAPER_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
TRIM_EVERY = 64  # batches between returns of freed heap memory (utils.runtime.release_freed_memory)


def distributed_loader(dataset: Dataset, ctx: DistContext, batch_size: int = 1, num_workers: int = 0,
                       collate_fn: Callable | None = None) -> DataLoader:
    """In-order loader over this rank's share (padded by the sampler; duplicates are harmless here)."""
    sampler = None
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False,
                                     drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                      pin_memory=ctx.device.type == "cuda", collate_fn=collate_fn,
                      persistent_workers=False)


def multiscale(embed: EmbedFn, x: torch.Tensor, scales: Sequence[float] = PAPER_SCALES,
               post: EmbedFn | None = None) -> torch.Tensor:
    """Mean over scales of L2(post(L2(embed(resize(x))))), then L2 — the paper's multi-scale descriptor.

    ``post`` is the PCA-whitening of a teacher (then re-normalised per scale); ``None`` for students.
    """
    total = None
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
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
        if batch % TRIM_EVERY == 0:
            release_freed_memory()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({f"{unit}_s": f"{meter.rate:.1f}"})
        yield out.float(), rest


@torch.inference_mode()
def extract_features(embed: EmbedFn, loader: DataLoader, total: int, ctx: DistContext, amp: str = "none",
                     show_progress: bool = True, desc: str = "extract") -> torch.Tensor:
    """Embed every item of ``loader`` (which yields ``(images, indices)``) -> (total, D) float32 CPU tensor.

    The result is identical on every rank. ``embed`` maps a batch on ``ctx.device`` to (B, D). Every rank has at
    least one item: the distributed sampler pads.
    """
    feats, idxs = [], []
    for out, (indices,) in embedded_batches(embed, loader, ctx, amp, show_progress, desc):
        feats.append(out)
        idxs.append(torch.as_tensor(indices, dtype=torch.long, device=ctx.device))
    return gather_by_index(torch.cat(feats), torch.cat(idxs), total).cpu()
