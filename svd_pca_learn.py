"""Learn a teacher's PCA-whitening on SVD training frames (the paper's svd_pca_learn.py).

Example: python svd_pca_learn.py -t mocov3 -dm config/svd.yaml --path_to_pretrained_weights W
writes W/pca_weights/mocov3_pca_512d_svd_224x224_p1.pt (or --dump_to FILE).
Frames: up to 60 random frames of every training video (one seeded RNG, the same on every rank).
"""
from __future__ import annotations

import argparse

from datasets.svd.data import FrameList, sample_pca_frames
from datasets.svd.meta import SVDMeta, SVDMetaError
from datasets.transforms import svd_pca_transform
from engine.cli import add_crop_size, add_pca_args, add_svd_meta, check_pca_args, check_svd_training_frames, make_parser
from engine.pca import learn_pca
from utils.argtypes import positive_int
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.distributed import DistContext, launch
from utils.log import get_logger, log_run_header, setup_logging
from utils.runtime import seed_everything


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser("Learn the PCA-whitening of a teacher on SVD training frames.")
    data = add_pca_args(parser, p_default=1.0)
    add_svd_meta(data)
    data.add_argument("--frames_per_video", type=positive_int, default=60,
                      help="random frames per training video (the paper's 60)")
    add_crop_size(data, "RandomResizedCrop size")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    return check_pca_args(parser, parser.parse_args(argv))


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    logger = setup_logging(ctx.is_main)
    log_run_header(logger, args, ctx.launch)
    seed_everything(args.seed + ctx.rank)  # augmentation differs per rank, reproducibly
    meta = SVDMeta.from_yaml(args.dataset_meta)
    videos, counts = meta.training_videos()
    frames = sample_pca_frames(videos, counts, args.frames_per_video, args.seed)
    get_logger().info("SVD PCA frames: %d from %d training videos", len(frames), len(videos))
    learn_pca(args.teacher, FrameList(meta.frame_root, frames, svd_pca_transform(args.crop_size)), args, ctx)


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(SVDMetaError, ConfigError, CheckpointError),
           preflight=check_svd_training_frames)


if __name__ == "__main__":
    main()
