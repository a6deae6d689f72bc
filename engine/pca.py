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

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.gld import GLDImageDataset, check_images_exist, read_image_ids
from datasets.svd.data import FrameList, sample_pca_frames
from datasets.svd.meta import SVDMeta
from datasets.transforms import gld_train_transform, svd_pca_transform
from engine.params import GLDPCAParams, PCAParams, SVDPCAParams
from engine.training_data import check_svd_data
from models.pca_layer import PCAWhitening, save_pca_layer
from models.teachers import build_teacher, check_teacher_file
from utils.distributed import DistContext, barrier
from utils.errors import UsageError, UserError
from utils.features import distributed_loader, feature_moments
from utils.log import get_logger, log_run_header, setup_logging
from utils.runtime import configure_backends, seed_everything

T = TypeVar("T")


def sample_items(items: Sequence[T], num_samples: int, seed: int) -> list[T]:
    """The paper's sample (shuffle, keep the first ``num_samples``; <= 0 keeps all) from ``random.Random(seed)``.

    Every rank calls this with the same arguments and gets the same list.
    """
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if num_samples <= 0 else items[:num_samples]


def kept_energy(layer: PCAWhitening) -> float:
    """Share of the total variance (eigenvalue sum) carried by the ``dim2`` kept directions."""
    d = layer.d.clamp_min(0).sort(descending=True).values
    total = float(d.sum())
    return float(d[: int(layer.dim2)].sum()) / total if total > 0 else float("nan")


def learn_pca(params: PCAParams, dataset: Dataset, ctx: DistContext) -> Path | None:
    """Embed ``dataset`` (items ``(image, index)``) with the teacher and fit/save its PCA layer on rank 0.
    Returns the written path on rank 0, ``None`` elsewhere."""
    logger = get_logger()
    configure_backends(ctx.device, params.amp, params.deterministic, fixed_input_size=True)
    teacher_name, out = params.teacher, params.output
    teacher = build_teacher(teacher_name, params.path_to_pretrained_weights, gem_p=params.p,
                            trust=params.trust_checkpoint, pool=params.teacher_pool)
    teacher = teacher.to(ctx.device).eval()
    dim1 = int(teacher.embed_dim)
    n = len(dataset)
    if n < 2:
        raise UsageError(f"PCA learning needs at least 2 images, the sample has {n} (check --num_samples)")
    logger.info("PCA learning for %s: %d images, %d -> %d dims, output %s", teacher_name, n, dim1,
                params.embed_dim, out)
    if n < dim1:
        logger.info("note: %d images < %d dims, so at most %d eigenvalues are non-zero", n, dim1, n - 1)

    start = time.perf_counter()
    loader = distributed_loader(dataset, ctx, batch_size=params.batch_size, num_workers=params.num_workers)
    moments = feature_moments(lambda x: F.normalize(teacher(x).float(), p=2, dim=-1), loader, ctx, amp=params.amp,
                              show_progress=not params.no_progress, desc=f"{teacher_name} features")
    logger.info("extracted %d x %d features in %.1f s (folded into their sums)", int(moments.count), dim1,
                time.perf_counter() - start)
    if int(moments.count) != n:
        raise RuntimeError(f"PCA learning embedded {int(moments.count)} images, expected {n}")
    if not (torch.isfinite(moments.total).all() and torch.isfinite(moments.gram).all()):
        raise UserError(f"teacher {teacher_name} produced non-finite features; check its weight file"
                        + (" or run without --amp" if params.amp != "none" else ""))

    written = None
    if ctx.is_main:
        layer = PCAWhitening(dim1, params.embed_dim).fit_moments(moments.count, moments.total, moments.gram)
        save_pca_layer(layer, out)
        logger.info("kept energy: %.2f %% (%d of %d eigenvalues raised to eps); wrote %s",
                    100.0 * kept_energy(layer), int(layer.n_0), dim1, out)
        written = out
    barrier()
    return written


# ------------------------------------------------------------------------------------- the images of each dataset
def sampled_gld_ids(params: GLDPCAParams) -> list[str]:
    return sample_items(read_image_ids(params.gld_root_path, params.gld_ids), params.num_samples, params.seed)


def check_gld_images(params: GLDPCAParams) -> None:
    """Before any work: every sampled image exists."""
    check_images_exist(params.gld_root_path, sampled_gld_ids(params), "sampled")


def gld_images(params: GLDPCAParams) -> Dataset:
    """GLDv2 images sampled as the paper (``--num_samples``), each with a random crop."""
    return GLDImageDataset(params.gld_root_path, sampled_gld_ids(params), gld_train_transform(params.imsize))


def svd_frames(params: SVDPCAParams) -> Dataset:
    """Up to ``--frames_per_video`` random frames of every SVD training video (one seeded RNG, the same on every
    rank)."""
    meta = SVDMeta.from_yaml(params.dataset_meta)
    videos, counts = meta.training_videos()
    frames = sample_pca_frames(videos, counts, params.frames_per_video, params.seed)
    get_logger().info("SVD PCA frames: %d from %d training videos", len(frames), len(videos))
    return FrameList(meta.frame_root, frames, svd_pca_transform(params.crop_size))


# dataset_name -> (check before any work, the images to embed)
PCA_DATA: dict[str, tuple[Callable[[Any], None], Callable[[Any], Dataset]]] = {
    "gldv2": (check_gld_images, gld_images),
    "svd": (check_svd_data, svd_frames),
}


def pca_preflight(params: PCAParams) -> None:
    """Before any rank starts: the images, and the teacher's file (a timm file: its keys and shapes)."""
    PCA_DATA[params.dataset_name][0](params)
    check_teacher_file(params.teacher, params.path_to_pretrained_weights, trust=params.trust_checkpoint)


def pca_worker(params: PCAParams, ctx: DistContext) -> Path | None:
    """A PCA-learning run on every rank."""
    logger = setup_logging(ctx.is_main)
    log_run_header(logger, params, ctx.launch)
    seed_everything(params.seed + ctx.rank)  # augmentation differs per rank, reproducibly
    return learn_pca(params, PCA_DATA[params.dataset_name][1](params), ctx)
