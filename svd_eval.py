"""Near-duplicate video retrieval on SVD (the paper's svd_eval.py).

Example (the paper's README): python svd_eval.py -a resnet18 -r CKPT -dm config/svd.yaml --sim_fn cf --embed_dim 512
A teacher: python svd_eval.py -t mocov3 --pca --path_to_pretrained_weights W
Protocol as the paper: the first --max_frames frames of each video (every --stride-th), Resize(256) +
CenterCrop(224) + ToTensor without Normalize (--input_norm imagenet adds it), AP@k normalised by the relevant
videos inside the top k. Prints ``top-100 mAP: 0.xxxx | top-inf mAP: 0.xxxx``.
"""
from __future__ import annotations

import argparse

from datasets.svd.eval import DEFAULT_MAX_ELEMENTS, SIM_FNS
from datasets.svd.meta import SVDMetaError
from engine.cli import add_crop_size, add_eval_args, add_svd_meta, check_eval_args, make_parser
from engine.features import add_store_args
from engine.video_retrieval import check_frames, evaluate_videos
from models.embedder import EmbedderConfigError
from utils.argtypes import positive_int
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.distributed import DistContext, launch
from utils.feature_store import StoreError
from utils.log import log_run_header, setup_logging
from utils.runtime import seed_everything


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser("Near-duplicate video retrieval evaluation on SVD.")
    data, evaluation = add_eval_args(parser, p_default=1.0)
    add_svd_meta(data)
    data.add_argument("-b", "--batch_size", type=positive_int, default=16, help="videos per batch and process")
    data.add_argument("--max_frames", type=positive_int, default=60, help="use the first N frames of each video")
    data.add_argument("--stride", type=positive_int, default=1, help="take every N-th of those frames")
    data.add_argument("--input_norm", default="none", choices=["none", "imagenet"],
                      help="none: ToTensor only, as the paper's evaluation; imagenet: add the ImageNet "
                           "normalisation the models were trained with")
    add_crop_size(data, "CenterCrop size after Resize(crop * 256/224)")
    evaluation.add_argument("--sim_fn", default=["fmx"], nargs="+", choices=SIM_FNS, metavar="FN",
                            help="fme/fmx: mean/max-pooled video descriptors; sme/smx/cf: mean/max/chamfer over "
                                 "frame pairs (fmx: the paper's code; its README uses cf). Several are evaluated "
                                 "from one extraction")
    evaluation.add_argument("--topk", type=positive_int, nargs="+", default=[100], metavar="K",
                            help="report mAP@K for each K, besides top-inf (the full ranking)")
    evaluation.add_argument("--subset_eval", action="store_true",
                            help="rank the labeled candidates only (no unlabeled distractors)")
    evaluation.add_argument("--max_elements", type=positive_int, default=DEFAULT_MAX_ELEMENTS,
                            help="frame-level similarities: most frame pairs held in memory at once")
    add_store_args(evaluation)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = check_eval_args(parser, parser.parse_args(argv))
    args.sim_fn = list(dict.fromkeys(args.sim_fn))
    return args


def main_worker(args: argparse.Namespace, ctx: DistContext) -> list[dict]:
    logger = setup_logging(ctx.is_main)
    log_run_header(logger, args, ctx.launch)
    seed_everything(args.seed)
    return evaluate_videos(args, ctx)


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(SVDMetaError, ConfigError, CheckpointError,
                                                       EmbedderConfigError, StoreError), preflight=check_frames)


if __name__ == "__main__":
    main()
