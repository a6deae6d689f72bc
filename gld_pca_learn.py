"""Learn a teacher's PCA-whitening on GLDv2 images (the paper's gld_pca_learn.py).

Example: python gld_pca_learn.py -t resnet101_delg --gld_root_path GLD --path_to_pretrained_weights W
writes W/pca_weights/resnet101_delg_pca_512d_gldv2_512x512_p3_randcrop.pt (or --dump_to FILE).
"""
from __future__ import annotations

import argparse

from datasets.gld import IDS_NAME, GLDDataError, GLDImageDataset, check_images_exist, read_image_ids
from datasets.transforms import gld_train_transform
from engine.cli import add_gld_root, add_pca_args, check_pca_args, make_parser
from engine.pca import learn_pca, sample_items
from utils.argtypes import positive_int
from utils.checkpoint import CheckpointError
from utils.distributed import DistContext, launch
from utils.log import log_run_header, setup_logging
from utils.runtime import seed_everything


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser("Learn the PCA-whitening of a teacher on GLDv2 images.")
    data = add_pca_args(parser, p_default=3.0)
    add_gld_root(data)
    data.add_argument("--gld_ids", default=IDS_NAME, metavar="TXT",
                      help="image id list under --gld_root_path (or an absolute path), e.g. the filtered "
                           "meta/train_clean_available_ids.txt of tools/prepare_gld.py")
    data.add_argument("--imsize", type=positive_int, default=512,
                      help="RandomResizedCrop size (the published files: 512)")
    data.add_argument("--num_samples", type=int, default=10000,
                      help="images to sample (<= 0: all, as the published files)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.num_samples == 1:
        parser.error("--num_samples 1: a PCA needs at least 2 images (<= 0 takes all)")
    return check_pca_args(parser, args)


def sampled_ids(args: argparse.Namespace) -> list[str]:
    return sample_items(read_image_ids(args.gld_root_path, args.gld_ids), args.num_samples, args.seed)


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    logger = setup_logging(ctx.is_main)
    log_run_header(logger, args, ctx.launch)
    seed_everything(args.seed + ctx.rank)  # augmentation differs per rank, reproducibly
    dataset = GLDImageDataset(args.gld_root_path, sampled_ids(args), gld_train_transform(args.imsize))
    learn_pca(args.teacher, dataset, args, ctx)


def check_images(args: argparse.Namespace) -> None:
    check_images_exist(args.gld_root_path, sampled_ids(args), "sampled")


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(GLDDataError, CheckpointError), preflight=check_images)


if __name__ == "__main__":
    main()
