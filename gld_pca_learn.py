"""Learn a teacher's PCA-whitening on GLDv2 images (the paper's gld_pca_learn.py).

Example: python gld_pca_learn.py -t resnet101_delg --gld_root_path GLD --path_to_pretrained_weights W
writes W/pca_weights/resnet101_delg_pca_512d_gldv2_512x512_p3_randcrop.pt (or --dump_to FILE).
"""
from __future__ import annotations

import argparse

from datasets.gld import GLDDataError, GLDImageDataset, read_image_ids
from datasets.transforms import gld_train_transform
from utils.checkpoint import CheckpointError
from utils.distributed import DistContext, launch
from utils.log import log_run_header, setup_logging
from utils.pca_learn import add_pca_args, learn_pca, sample_items
from utils.runtime import add_runtime_args, seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Learn the PCA-whitening of a teacher on GLDv2 images.")
    add_pca_args(parser, p_default=3.0)
    parser.add_argument("--imsize", type=int, default=512, help="RandomResizedCrop size (the paper used 512)")
    parser.add_argument("--num_samples", type=int, default=10000, help="images to sample (<= 0: all)")
    parser.add_argument("--gld_root_path", type=str, default="/path/to/gldv2", metavar="PATH",
                        help="GLDv2 root (meta/train_clean_ids.txt, train/)")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    logger = setup_logging(ctx.is_main)
    log_run_header(logger, args)
    seed_everything(args.seed + ctx.rank)  # augmentation differs per rank, reproducibly
    ids = sample_items(read_image_ids(args.gld_root_path), args.num_samples, args.seed)
    dataset = GLDImageDataset(args.gld_root_path, ids, gld_train_transform(args.imsize))
    learn_pca(args.teacher, dataset, args, ctx)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch(main_worker, args, user_errors=(GLDDataError, CheckpointError))


if __name__ == "__main__":
    main()
