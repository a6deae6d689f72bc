"""Multi-teacher distillation on GLDv2 landmark pairs (the paper's gld_distill.py).

Example (the paper's README):
python gld_distill.py -a resnet18 -ts resnet101_delg resnet101_dolg -c CKPT --gld_root_path GLD \
    --path_to_pretrained_weights W
Uses every visible GPU (one process each), or the CPU; ``torchrun --nproc_per_node=N`` works as well.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets.gld import (
    CSV_NAME,
    DistributedGroupSampler,
    GLDDataError,
    GLDPairDataset,
    check_images_exist,
    pair_collate,
    read_groups,
)
from datasets.transforms import gld_train_transform
from utils.argtypes import existing_dir, positive_float, positive_int
from utils.checkpoint import CheckpointError
from utils.distributed import DistContext, launch
from utils.engine import TrainData, add_distill_args, check_distill_args, preflight, run_distillation
from utils.files import fingerprint


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Multi-teacher distillation on Google Landmarks v2 (clean).")
    add_distill_args(parser)
    parser.add_argument("--gld_root_path", default="/path/to/gldv2", metavar="PATH", type=existing_dir,
                        help="GLDv2 root (meta/train_clean.csv, train/)")
    parser.add_argument("-tt", type=positive_float, default=0.05, help="teacher similarity temperature (default 0.05)")
    parser.add_argument("-st", type=positive_float, default=0.05, help="student similarity temperature (default 0.05)")
    parser.add_argument("--imsize", type=positive_int, default=512, help="RandomResizedCrop size (default 512)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    return check_distill_args(parser, parser.parse_args(argv))


def build_gld_data(args: argparse.Namespace, ctx: DistContext) -> TrainData:
    dataset = GLDPairDataset(args.gld_root_path, gld_train_transform(args.imsize))
    sampler = DistributedGroupSampler(dataset.groups, args.batch_size, ctx.world_size, ctx.rank, seed=args.seed)
    return TrainData(dataset, sampler, pair_collate, fingerprint([dataset.image_ids, [len(g) for g in dataset.groups]]))


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    run_distillation(args, ctx, build_gld_data)


def check_gld(args: argparse.Namespace) -> None:
    csv_file = Path(args.gld_root_path) / CSV_NAME
    if not csv_file.is_file():
        raise SystemExit(f"GLDv2 metadata file not found: {csv_file}. --gld_root_path must contain {CSV_NAME}.")
    check_images_exist(args.gld_root_path, [i for g in read_groups(args.gld_root_path) for i in g], "training")
    preflight(args, pca_script="gld_pca_learn.py")


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(GLDDataError, CheckpointError), preflight=check_gld)


if __name__ == "__main__":
    main()
