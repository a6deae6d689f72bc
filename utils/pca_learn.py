"""Learning a teacher's PCA-whitening layer (the flow shared by gld_pca_learn.py and svd_pca_learn.py).

Faithful to the paper (facts §4.2): the teacher in eval mode embeds every image of the set, outputs are
L2-normalised, and rank 0 fits ``PCAWhitening(teacher.embed_dim, embed_dim)`` and writes the published format.
Unlike the paper, the sample is drawn from one seeded RNG that is identical on every rank, and features are
reassembled by dataset index, so no rank's padding or drop ever adds zero rows to the covariance (B11).
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
from models.teachers import TEACHERS, build_teacher
from utils.argtypes import nonnegative_int, output_file, positive_float, positive_int
from utils.distributed import DistContext, barrier
from utils.features import distributed_loader, extract_features
from utils.log import get_logger

T = TypeVar("T")


def add_pca_args(parser: argparse.ArgumentParser, *, p_default: float) -> None:
    """Flags both PCA scripts share (names, short forms and defaults of the paper's, facts §4.1)."""
    parser.add_argument("-t", "--teacher", required=True, choices=list(TEACHERS), metavar="NAME",
                        help=f"teacher whose descriptors are whitened: {', '.join(TEACHERS)}")
    parser.add_argument("--num_workers", type=nonnegative_int, default=8,
                        help="data loader workers per process (default 8)")
    parser.add_argument("--embed_dim", type=positive_int, default=512,
                        help="output dimension of the PCA-whitening (default 512; at most the teacher's descriptor)")
    parser.add_argument("-b", "--batch_size", type=positive_int, default=256,
                        help="images per batch and process (default 256)")
    parser.add_argument("-p", type=positive_float, default=p_default,
                        help=f"GeM power of the teacher (default {p_default:g})")
    parser.add_argument("--path_to_pretrained_weights", type=str, default="/path/to/pretrained_weights",
                        metavar="DIR", help="folder of the teacher weight files (and pca_weights/)")
    parser.add_argument("--dump_to", type=output_file, default=None, metavar="FILE",
                        help="output file (default: the published name under "
                             "--path_to_pretrained_weights/pca_weights/); an existing file is kept unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output file when it exists (e.g. a downloaded published PCA file)")


def check_pca_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Cross-flag checks, as argparse errors: the whitening can only reduce the descriptor, and an existing output
    (perhaps the published file) is never replaced without --overwrite."""
    dim = TEACHERS[args.teacher].descriptor_dim
    if args.embed_dim > dim:
        parser.error(f"--embed_dim {args.embed_dim} is larger than the {dim}-d descriptor of teacher "
                     f"{args.teacher}; a PCA-whitening can only reduce it")
    out = output_path(args, args.teacher)
    if out.is_dir():
        parser.error(f"the output {out} is a folder; pass --dump_to FILE")
    if out.exists() and not args.overwrite:
        parser.error(f"the output {out} exists{' (a published file?)' if args.dump_to is None else ''}; pass "
                     "--overwrite to replace it, or --dump_to another file")
    if args.dump_to is None:
        try:
            output_file(str(out))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--path_to_pretrained_weights: {exc}")
    return args


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
    no_progress, dump_to. Returns the written path on rank 0, ``None`` elsewhere.
    """
    logger = get_logger()
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
    feats = extract_features(lambda x: F.normalize(teacher(x).float(), p=2, dim=-1), loader, n, ctx,
                             amp=args.amp, show_progress=not args.no_progress, desc=f"{teacher_name} features")
    logger.info("extracted %d x %d features in %.1f s", feats.shape[0], feats.shape[1], time.perf_counter() - start)
    if not torch.isfinite(feats).all():
        raise SystemExit(f"teacher {teacher_name} produced non-finite features; check its weight file"
                         + (" or run without --amp" if args.amp != "none" else ""))

    written = None
    if ctx.is_main:
        layer = PCAWhitening(dim1, args.embed_dim).fit(feats)
        save_pca_layer(layer, out)
        logger.info("kept energy: %.2f %% (%d of %d eigenvalues raised to eps); wrote %s",
                    100.0 * kept_energy(layer), int(layer.n_0), dim1, out)
        written = out
    barrier()
    return written
