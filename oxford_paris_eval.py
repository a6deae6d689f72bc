"""Image retrieval evaluation on revisited Oxford/Paris (+ R1M), the paper's ``oxford_paris_eval.py``.

    python oxford_paris_eval.py -a resnet18 -r CKPT -dp DATA --embed_dim 512 -ms -p 3
    python oxford_paris_eval.py -t resnet101_delg --pca --path_to_pretrained_weights W -dp DATA -ms
    torchrun --nproc_per_node=4 oxford_paris_eval.py ...

Faithful to the paper by default: queries are not cropped (``--crop_queries`` for the standard protocol), images
at full resolution unless ``--imsize``. Prints E/M/H mAP and mP@k in percent like revisitop/cirtorch.
"""
from __future__ import annotations

import argparse

from datasets.oxford_paris import DATASETS, DatasetError
from engine.cli import add_eval_args, check_eval_args, make_parser
from engine.features import add_store_args
from engine.image_retrieval import evaluate_images
from models.embedder import EmbedderConfigError
from utils.argtypes import existing_dir, output_dir, positive_int
from utils.checkpoint import CheckpointError
from utils.distributed import DistContext, launch
from utils.feature_store import StoreError
from utils.log import get_logger, log_run_header, setup_logging
from utils.runtime import seed_everything

USER_ERRORS = (CheckpointError, DatasetError, EmbedderConfigError, StoreError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser("Evaluation on roxford5k and/or rparis6k (+1M distractors).")
    data, evaluation = add_eval_args(parser, p_default=3)
    data.add_argument("-dp", "--data_path", default="/path/to/datasets", type=existing_dir,
                      help="root holding <dataset>/gnd_<dataset>.pkl, <dataset>/jpg/ and revisitop1m/")
    data.add_argument("-d", "--dataset", default=["roxford5k"], nargs="+", choices=list(DATASETS), metavar="NAME",
                      help="roxford5k and/or rparis6k: with --plus1m the distractors are embedded once for all")
    data.add_argument("--imsize", default=None, type=positive_int,
                      help="shrink images so the long side is at most this (LANCZOS); default: full resolution")
    data.add_argument("--plus1m", action="store_true", help="add the revisitop1m distractors to the database")
    evaluation.add_argument("-ms", "--multiscale", action="store_true",
                            help="multi-scale descriptors (scales 1, 1/sqrt2, 1/2)")
    evaluation.add_argument("--crop_queries", action="store_true",
                            help="crop queries to their bbx (the standard revisitop protocol; the paper does not)")
    evaluation.add_argument("--visualize", default=None, type=output_dir, metavar="DIR",
                            help="write one PNG per query: the query and its top results framed by label")
    evaluation.add_argument("--visualize_top", default=10, type=positive_int, metavar="K", help="results per picture")
    add_store_args(evaluation)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = check_eval_args(parser, parser.parse_args(argv))
    args.dataset = list(dict.fromkeys(args.dataset))  # a name given twice is evaluated once
    return args


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    setup_logging(ctx.is_main)
    if ctx.is_main:
        log_run_header(get_logger(), args, ctx.launch)
    seed_everything(args.seed)
    evaluate_images(args, ctx)


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=USER_ERRORS)


if __name__ == "__main__":
    main()
