"""Near-duplicate video retrieval on SVD (the paper's svd_eval.py).

Example (the paper's README): python svd_eval.py -a resnet18 -r CKPT -dm config/svd.yaml --sim_fn cf --embed_dim 512
A teacher: python svd_eval.py -t mocov3 --pca --path_to_pretrained_weights W
Protocol as the paper: the first --max_frames frames of each video (every --stride-th), Resize(256) +
CenterCrop(224) + ToTensor without Normalize (--input_norm imagenet adds it), AP@k normalised by the relevant
videos inside the top k. Prints ``top-100 mAP: 0.xxxx | top-inf mAP: 0.xxxx``.
"""
from __future__ import annotations

import argparse

from datasets.svd.data import VideoFrames, frames_per_video, video_collate
from datasets.svd.eval import (
    DEFAULT_MAX_ELEMENTS,
    SIM_FNS,
    build_rankings,
    extract_video_descriptors,
    format_map,
    mean_average_precision,
    score_videos,
)
from datasets.svd.meta import SVDMeta, SVDMetaError
from datasets.transforms import svd_test_transform
from engine.cli import add_crop_size, add_eval_args, add_svd_meta, check_eval_args, make_parser
from models.embedder import EmbedderConfigError, build_embedder
from utils.argtypes import positive_int
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.distributed import DistContext, launch
from utils.features import distributed_loader
from utils.files import write_json
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
    evaluation.add_argument("--sim_fn", default="fmx", choices=SIM_FNS,
                            help="fme/fmx: mean/max-pooled video descriptors; sme/smx/cf: mean/max/chamfer over "
                                 "frame pairs (fmx: the paper's code; its README uses cf)")
    evaluation.add_argument("--topk", type=positive_int, nargs="+", default=[100], metavar="K",
                            help="report mAP@K for each K, besides top-inf (the full ranking)")
    evaluation.add_argument("--subset_eval", action="store_true",
                            help="rank the labeled candidates only (no unlabeled distractors)")
    evaluation.add_argument("--max_elements", type=positive_int, default=DEFAULT_MAX_ELEMENTS,
                            help="frame-level similarities: most frame pairs held in memory at once")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    return check_eval_args(parser, parser.parse_args(argv))


def evaluation_videos(args: argparse.Namespace) -> tuple[SVDMeta, list[str], list[str], list[str]]:
    """(metadata, queries, labeled candidates, unlabeled candidates) of the evaluation."""
    meta = SVDMeta.from_yaml(args.dataset_meta)
    queries, labeled = meta.test_query_ids, meta.test_labeled_ids
    if not queries:
        raise SVDMetaError(f"the test ground truth of {args.dataset_meta} lists no query")
    return meta, queries, labeled, [] if args.subset_eval else meta.unlabeled_ids


def check_frames(args: argparse.Namespace) -> None:
    """Every test video's frames are on disk, before the extraction."""
    meta, queries, labeled, unlabeled = evaluation_videos(args)
    for ids, role in ((queries, "test query"), (labeled + unlabeled, "test candidate")):
        meta.check_frames_on_disk(ids, meta.check_videos(ids, role), role, max_frames=args.max_frames)


def main_worker(args: argparse.Namespace, ctx: DistContext) -> dict | None:
    logger = setup_logging(ctx.is_main)
    log_run_header(logger, args)
    seed_everything(args.seed)
    meta, queries, labeled, unlabeled = evaluation_videos(args)
    query_counts = meta.check_videos(queries, "test query")
    candidates = labeled + unlabeled
    candidate_counts = meta.check_videos(candidates, "test candidate")
    logger.info("SVD: %d queries, %d labeled candidates, %d distractors (%s evaluation)", len(queries), len(labeled),
                len(unlabeled), "subset" if args.subset_eval else "full")

    weights = args.path_to_pretrained_weights if args.teacher is not None else None
    embedder = build_embedder(args.arch, args.resume, args.teacher, args.pca, weights, args.embed_dim, args.p,
                              args.trust_checkpoint).to(ctx.device)
    logger.info("model: %s", embedder.description)
    transform = svd_test_transform(args.input_norm, args.crop_size)
    num_frames = frames_per_video(args.max_frames, args.stride)

    def loader(ids: list[str], counts: list[int]):
        videos = VideoFrames(meta.frame_root, ids, counts, transform, args.max_frames, args.stride)
        return distributed_loader(videos, ctx, args.batch_size, args.num_workers, collate_fn=video_collate)

    common = dict(ctx=ctx, sim_fn=args.sim_fn, num_frames=num_frames, amp=args.amp,
                  show_progress=not args.no_progress)
    qdesc, qlens = extract_video_descriptors(embedder.single, loader(queries, query_counts), len(queries),
                                             desc="queries", **common)
    sims = score_videos(embedder.single, loader(candidates, candidate_counts), len(candidates), qdesc=qdesc,
                        qlens=qlens, desc="candidates", max_elements=args.max_elements, **common)
    if not ctx.is_main:
        return None
    rankings = build_rankings(queries, meta.test_groundtruth, labeled, sims[:, :len(labeled)],
                              None if args.subset_eval else sims[:, len(labeled):])
    result = mean_average_precision(rankings, args.topk)
    print(format_map(result), flush=True)
    if args.output_json:
        record = {"sim_fn": args.sim_fn, "map": result, "n_queries": len(queries), "n_candidates": len(candidates)}
        write_json(args.output_json, record)
        logger.info("wrote %s", args.output_json)
    return result


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=(SVDMetaError, ConfigError, CheckpointError,
                                                       EmbedderConfigError), preflight=check_frames)


if __name__ == "__main__":
    main()
