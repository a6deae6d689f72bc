"""Multi-teacher distillation on GLDv2 landmark pairs (the paper's gld_distill.py).

Example (the paper's README):
python gld_distill.py -a resnet18 -ts resnet101_delg resnet101_dolg -c CKPT --gld_root_path GLD \
    --path_to_pretrained_weights W
Uses every visible GPU (one process each), or the CPU; ``torchrun --nproc_per_node=N`` works as well.
"""
from __future__ import annotations

import argparse

from datasets.gld import (
    CSV_NAME,
    DistributedGroupSampler,
    GLDDataError,
    GLDPairDataset,
    check_images_exist,
    pair_collate,
    read_groups,
)
from datasets.transforms import GLDView, gld_train_transform
from engine.cli import add_distill_args, add_gld_root, check_distill_args, make_parser
from engine.distill import TrainData, preflight, run_distillation
from engine.teacher_cache import cached_halves_collate
from utils.argtypes import positive_float, positive_int
from utils.checkpoint import CheckpointError
from utils.distributed import DistContext, launch
from utils.feature_store import StoreError
from utils.files import fingerprint


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser("Multi-teacher distillation on Google Landmarks v2 (clean).")
    data, training = add_distill_args(parser, arch_default="resnet18", lr_default=1e-3, p_default=3.0)
    add_gld_root(data)
    data.add_argument("--gld_csv", default=CSV_NAME, metavar="CSV",
                      help="landmark list under --gld_root_path (or an absolute path), e.g. the filtered "
                           "meta/train_clean_available.csv of tools/prepare_gld.py")
    data.add_argument("--imsize", type=positive_int, default=512, help="RandomResizedCrop size of the training views")
    training.add_argument("-tt", type=positive_float, default=0.05,
                          help="teacher similarity temperature (lower: sharper targets)")
    training.add_argument("-st", type=positive_float, default=0.05, help="student similarity temperature")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    return check_distill_args(parser, parser.parse_args(argv))


def build_gld_data(args: argparse.Namespace, ctx: DistContext) -> TrainData:
    dataset = GLDPairDataset(args.gld_root_path, gld_train_transform(args.imsize), csv_name=args.gld_csv)
    sampler = DistributedGroupSampler(dataset.groups, args.batch_size, ctx.world_size, ctx.rank, seed=args.seed)
    return TrainData(dataset, sampler, pair_collate, fingerprint([dataset.image_ids, [len(g) for g in dataset.groups]]),
                     load_item=dataset.load, views=[GLDView(args.imsize)], cached_collate=cached_halves_collate)


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    run_distillation(args, ctx, build_gld_data)


def check_gld(args: argparse.Namespace) -> None:
    """Before any work: the CSV and every training image (a missing one would be found hours into the run)."""
    groups = read_groups(args.gld_root_path, csv_name=args.gld_csv)
    check_images_exist(args.gld_root_path, [i for g in groups for i in g], "training")
    preflight(args, pca_script="gld_pca_learn.py")


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(GLDDataError, CheckpointError, StoreError), preflight=check_gld)


if __name__ == "__main__":
    main()
