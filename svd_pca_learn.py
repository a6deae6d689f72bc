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
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.distributed import DistContext, launch
from utils.log import get_logger, log_run_header, setup_logging
from utils.pca_learn import add_pca_args, learn_pca
from utils.runtime import add_runtime_args, seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Learn the PCA-whitening of a teacher on SVD training frames.")
    add_pca_args(parser, p_default=1.0)
    parser.add_argument("-dm", "--dataset_meta", default="config/svd.yaml", metavar="FILE",
                        help="SVD metadata yaml (keys of config/svd.yaml)")
    parser.add_argument("--frames_per_video", type=int, default=60,
                        help="random frames per training video (the paper: 60)")
    parser.add_argument("--crop_size", type=int, default=224,
                        help="RandomResizedCrop size (the paper: 224; smaller only for quick tests)")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.frames_per_video < 1:
        parser.error("--frames_per_video must be >= 1")
    return args


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    logger = setup_logging(ctx.is_main)
    log_run_header(logger, args)
    seed_everything(args.seed + ctx.rank)  # augmentation differs per rank, reproducibly
    meta = SVDMeta.from_yaml(args.dataset_meta)
    videos = meta.train_ids
    if not videos:
        raise SVDMetaError(f"the training ground truth of {args.dataset_meta} lists no video")
    frames = sample_pca_frames(videos, meta.check_videos(videos, "training"), args.frames_per_video, args.seed)
    get_logger().info("SVD PCA frames: %d from %d training videos", len(frames), len(videos))
    learn_pca(args.teacher, FrameList(meta.frame_root, frames, svd_pca_transform(args.crop_size)), args, ctx)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch(main_worker, args, user_errors=(SVDMetaError, ConfigError, CheckpointError))


if __name__ == "__main__":
    main()
