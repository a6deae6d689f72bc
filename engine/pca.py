"""Learning a teacher's PCA-whitening layer (the flow shared by gld_pca_learn.py and svd_pca_learn.py).

Faithful to the paper: the teacher in eval mode embeds every image of the set, outputs are
L2-normalised, and rank 0 fits ``PCAWhitening(teacher.embed_dim, embed_dim)`` and writes the published format.
Unlike the paper, the sample is drawn from one seeded RNG that is identical on every rank, every image is embedded
exactly once over the ranks (no padding or drop ever adds zero or duplicate rows to the covariance, B11), and no
rank holds the features: each folds its rows into their count, sum and ``X^T X`` (float64), and one all-reduce of
those 1 + D + D x D numbers gives the mean and covariance (memory independent of the number of images: the
features of GLDv2-clean's 1.58M images would be 13 GB per copy).
"""
from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from models.pca_layer import PCAWhitening, pca_weight_path, save_pca_layer
from models.teachers import build_teacher
from utils.distributed import DistContext, barrier
from utils.features import distributed_loader, feature_moments
from utils.log import get_logger
from utils.runtime import configure_backends

T = TypeVar("T")


def sample_items(items: Sequence[T], num_samples: int, seed: int) -> list[T]:
    """The paper's sample (shuffle, keep the first ``num_samples``; <= 0 keeps all) from ``random.Random(seed)``.

    Every rank calls this with the same arguments and gets the same list.
    """
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if num_samples <= 0 else items[:num_samples]


def output_path(args: argparse.Namespace, teacher_name: str) -> Path:
    """``--dump_to``, or the published file name under ``--path_to_pretrained_weights``."""
    if args.dump_to:
        return Path(args.dump_to)
    return pca_weight_path(args.path_to_pretrained_weights, teacher_name, args.embed_dim)


def kept_energy(layer: PCAWhitening) -> float:
    """Share of the total variance (eigenvalue sum) carried by the ``dim2`` kept directions."""
    d = layer.d.clamp_min(0).sort(descending=True).values
    total = float(d.sum())
    return float(d[: int(layer.dim2)].sum()) / total if total > 0 else float("nan")


def learn_pca(teacher_name: str, dataset: Dataset, args: argparse.Namespace, ctx: DistContext) -> Path | None:
    """Embed ``dataset`` (items ``(image, index)``) with the teacher and fit/save its PCA layer on rank 0.

    Uses ``args``: path_to_pretrained_weights, p, trust_checkpoint, embed_dim, batch_size, num_workers, amp,
    deterministic, no_progress, dump_to. Returns the written path on rank 0, ``None`` elsewhere.
    """
    logger = get_logger()
    configure_backends(ctx.device, args.amp, args.deterministic, fixed_input_size=True)
    out = output_path(args, teacher_name)
    teacher = build_teacher(teacher_name, args.path_to_pretrained_weights, gem_p=args.p,
                            trust=args.trust_checkpoint)
    teacher = teacher.to(ctx.device).eval()
    dim1 = int(teacher.embed_dim)
    if not 0 < args.embed_dim <= dim1:
        raise SystemExit(f"--embed_dim {args.embed_dim} must be between 1 and the {dim1}-d descriptor of "
                         f"teacher {teacher_name}")
    n = len(dataset)
    if n < 2:
        raise SystemExit(f"PCA learning needs at least 2 images, the sample has {n} (check --num_samples)")
    logger.info("PCA learning for %s: %d images, %d -> %d dims, output %s", teacher_name, n, dim1,
                args.embed_dim, out)
    if n < dim1:
        logger.info("note: %d images < %d dims, so at most %d eigenvalues are non-zero", n, dim1, n - 1)

    start = time.perf_counter()
    loader = distributed_loader(dataset, ctx, batch_size=args.batch_size, num_workers=args.num_workers)
    moments = feature_moments(lambda x: F.normalize(teacher(x).float(), p=2, dim=-1), loader, ctx, amp=args.amp,
                              show_progress=not args.no_progress, desc=f"{teacher_name} features")
    logger.info("extracted %d x %d features in %.1f s (folded into their sums)", int(moments.count), dim1,
                time.perf_counter() - start)
    if int(moments.count) != n:
        raise RuntimeError(f"PCA learning embedded {int(moments.count)} images, expected {n}")
    if not (torch.isfinite(moments.total).all() and torch.isfinite(moments.gram).all()):
        raise SystemExit(f"teacher {teacher_name} produced non-finite features; check its weight file"
                         + (" or run without --amp" if args.amp != "none" else ""))

    written = None
    if ctx.is_main:
        layer = PCAWhitening(dim1, args.embed_dim).fit_moments(moments.count, moments.total, moments.gram)
        save_pca_layer(layer, out)
        logger.info("kept energy: %.2f %% (%d of %d eigenvalues raised to eps); wrote %s",
                    100.0 * kept_energy(layer), int(layer.n_0), dim1, out)
        written = out
    barrier()
    return written
