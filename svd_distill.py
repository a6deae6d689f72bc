"""Multi-teacher distillation on SVD video frames (the paper's svd_distill.py, which crashes as released).

Example (the paper's README):
python svd_distill.py -a resnet18 -ts mocov3 barlowtwins -c CKPT -dm config/svd.yaml --path_to_pretrained_weights W
Each epoch visits every training video once with one uniformly random frame; the two distillation views are two
augmentations of that frame. Uses every visible GPU (one process each), or the CPU; torchrun works as well.
"""
from __future__ import annotations

import argparse

from datasets.svd.data import DistributedFrameSampler, TrainFrames, two_view_collate
from datasets.svd.meta import SVDMeta, SVDMetaError
from datasets.transforms import svd_distill_transform, svd_distill_views
from engine.cli import (
    add_crop_size,
    add_distill_args,
    add_svd_meta,
    check_distill_args,
    check_svd_training_frames,
    make_parser,
)
from engine.distill import TrainData, preflight, run_distillation
from engine.teacher_cache import cached_pairs_collate
from utils.argtypes import nonnegative_int, positive_float
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.distributed import DistContext, launch
from utils.feature_store import StoreError
from utils.files import fingerprint

PAPER_TEMPERATURE = 0.05


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "Multi-teacher distillation on SVD (Short Video Dataset) frames.",
        epilog="--lr defaults to 0.3, the paper's value, although it is used with Adam (a leftover of LARS in the "
               "paper's code); values around 1e-3 (gld_distill's default) are the usual choice for Adam. "
               "-a defaults to resnet18 (the paper's mobilenet_v2 default is not a valid student).")
    data, training = add_distill_args(parser, arch_default="resnet18", lr_default=0.3, p_default=1.0)
    add_svd_meta(data)
    add_crop_size(data, "RandomResizedCrop size of the training views")
    training.add_argument("-t", type=positive_float, default=None, metavar="T",
                          help=f"temperature of the paper's svd_distill: sets both -st and -tt (default "
                               f"{PAPER_TEMPERATURE})")
    training.add_argument("-st", type=positive_float, default=None,
                          help="student similarity temperature (overrides -t)")
    training.add_argument("-tt", type=positive_float, default=None,
                          help="teacher similarity temperature (overrides -t)")
    training.add_argument("--warmup_epochs", type=nonnegative_int, default=5,
                          help="accepted for compatibility; unused, as in the paper's code")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    temperature = PAPER_TEMPERATURE if args.t is None else args.t
    args.st = temperature if args.st is None else args.st
    args.tt = temperature if args.tt is None else args.tt
    return check_distill_args(parser, args)


def build_svd_data(args: argparse.Namespace, ctx: DistContext) -> TrainData:
    meta = SVDMeta.from_yaml(args.dataset_meta)
    videos, counts = meta.training_videos()
    dataset = TrainFrames(meta.frame_root, videos, counts, svd_distill_transform(args.crop_size))
    sampler = DistributedFrameSampler(counts, args.batch_size, ctx.world_size, ctx.rank, seed=args.seed)
    return TrainData(dataset, sampler, two_view_collate, fingerprint([videos, counts]), load_item=dataset.load,
                     views=list(svd_distill_views(args.crop_size)), cached_collate=cached_pairs_collate)


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    run_distillation(args, ctx, build_svd_data)


def check_svd(args: argparse.Namespace) -> None:
    check_svd_training_frames(args)  # the metadata and frames, before the teachers' files are read
    preflight(args, pca_script="svd_pca_learn.py")


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(SVDMetaError, ConfigError, CheckpointError, StoreError),
           preflight=check_svd)


if __name__ == "__main__":
    main()
