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
from datasets.transforms import svd_distill_transform
from utils.argtypes import existing_file, nonnegative_int, positive_float, positive_int
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.distributed import DistContext, launch
from utils.engine import TrainData, add_distill_args, check_distill_args, preflight, run_distillation
from utils.files import fingerprint

PAPER_TEMPERATURE = 0.05


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Multi-teacher distillation on SVD (Short Video Dataset) frames.",
        epilog="--lr defaults to 0.3, the paper's value, although it is used with Adam (a leftover of LARS in the "
               "paper's code); values around 1e-3 (gld_distill's default) are the usual choice for Adam. "
               "-a defaults to resnet18 (the paper's mobilenet_v2 default is not a valid student).")
    add_distill_args(parser, arch_default="resnet18", lr_default=0.3, p_default=1.0)
    parser.add_argument("-dm", "--dataset_meta", default="config/svd.yaml", metavar="FILE", type=existing_file,
                        help="SVD metadata yaml (keys of config/svd.yaml; default config/svd.yaml)")
    parser.add_argument("-t", type=positive_float, default=None, metavar="T",
                        help=f"temperature of the paper's svd_distill: sets both -st and -tt "
                             f"(default {PAPER_TEMPERATURE})")
    parser.add_argument("-st", type=positive_float, default=None,
                        help="student similarity temperature (overrides -t)")
    parser.add_argument("-tt", type=positive_float, default=None,
                        help="teacher similarity temperature (overrides -t)")
    parser.add_argument("--warmup_epochs", type=nonnegative_int, default=5,
                        help="accepted for compatibility; unused, as in the paper's code")
    parser.add_argument("--crop_size", type=positive_int, default=224,
                        help="RandomResizedCrop size (the paper: 224; smaller only for quick tests)")
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
    return TrainData(dataset, sampler, two_view_collate, fingerprint([videos, counts]))


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    run_distillation(args, ctx, build_svd_data)


def check_svd(args: argparse.Namespace) -> None:
    meta = SVDMeta.from_yaml(args.dataset_meta)
    meta.check_frames_on_disk(*meta.training_videos(), "training")
    preflight(args, pca_script="svd_pca_learn.py")


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(SVDMetaError, ConfigError, CheckpointError),
           preflight=check_svd)


if __name__ == "__main__":
    main()
