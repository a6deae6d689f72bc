"""SVD near-duplicate video retrieval of one model, for one or more similarity functions.

The frame features of every part (queries, labeled candidates, unlabeled candidates) go through
``engine.features``: embedded once, or read from the store, and one extraction serves every ``--sim_fn``. The
queries' frames are on every rank; each rank scores its shards of candidates under every similarity function,
first the labeled ones (their scores for the queries whose ground truth names them are summed over ranks), then
the unlabeled ones, only counted above each relevant video's score. No rank holds the candidates' frames or the
(queries x candidates) scores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from datasets.svd.data import VideoFrames, frames_per_video, video_collate
from datasets.svd.eval import (
    VideoRanking,
    descriptor_similarity,
    format_map,
    mean_average_precision,
    pad_frames,
    video_descriptors,
)
from datasets.svd.meta import SVDMeta, SVDMetaError
from datasets.transforms import svd_test_transform
from engine.features import Part, PartExtractor, Shard, model_components
from models.embedder import build_embedder
from utils.distributed import DistContext, barrier
from utils.files import fingerprint, write_json
from utils.log import get_logger
from utils.runtime import configure_backends


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


def video_protocol(args: argparse.Namespace, frame_counts: list[int] | None = None,
                   frame_root: str | None = None) -> dict:
    """What of the protocol changes a video's frame features (the store key): the flags, and the frames read: the
    folder of the frames and each video's frame count (frames extracted again at another rate change both)."""
    return {"max_frames": args.max_frames, "stride": args.stride, "crop_size": args.crop_size,
            "input_norm": args.input_norm, "amp": args.amp,
            "frame_root": str(Path(frame_root).resolve()) if frame_root else None,
            "frame_counts": fingerprint(frame_counts) if frame_counts is not None else None}


def _reduce(ctx: DistContext):
    return (lambda t: dist.all_reduce(t)) if ctx.distributed else None


@torch.inference_mode()
def evaluate_videos(args: argparse.Namespace, ctx: DistContext) -> list[dict]:
    """Evaluate every ``args.sim_fn``; prints the paper's line for each and writes JSON on rank 0; returns the
    records."""
    logger = get_logger()
    configure_backends(ctx.device, args.amp)  # images of varying sizes: no cuDNN autotuning
    meta, queries, labeled, unlabeled = evaluation_videos(args)
    logger.info("SVD: %d queries, %d labeled candidates, %d distractors (%s evaluation)", len(queries), len(labeled),
                len(unlabeled), "subset" if args.subset_eval else "full")
    weights = args.path_to_pretrained_weights if args.teacher is not None else None
    embedder = build_embedder(args.arch, args.resume, args.teacher, args.pca, weights, args.embed_dim, args.p,
                              args.trust_checkpoint).to(ctx.device)
    logger.info("model: %s", embedder.description)
    extractor = PartExtractor(embedder.single, ctx, args,
                              model_components(args) if args.feature_cache else {},
                              label=f"the model ({embedder.description})")
    transform = svd_test_transform(args.input_norm, args.crop_size)
    num_frames = frames_per_video(args.max_frames, args.stride)

    def part(name: str, ids: list[str], role: str) -> Part:
        counts = meta.check_videos(ids, role)
        videos = VideoFrames(meta.frame_root, ids, counts, transform, args.max_frames, args.stride)
        return Part(name, videos, ids, video_protocol(args, counts, meta.frame_root), videos=True,
                    batch_size=args.batch_size,
                    collate_fn=video_collate)

    def descriptors(feats: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        padded = pad_frames(feats, lengths, num_frames)
        return {fn: video_descriptors(padded, lengths, fn) for fn in args.sim_fn}

    def similarities(shard: Shard) -> dict[str, torch.Tensor]:
        cdesc = descriptors(shard.feats, shard.lengths)
        return {fn: descriptor_similarity(qdesc[fn], qlens, cdesc[fn], shard.lengths, fn, args.max_elements)
                for fn in args.sim_fn}

    qfeats, qlens = extractor.gather(part("svd queries", queries, "test query"))
    qdesc = descriptors(qfeats, qlens)
    rankings = {fn: VideoRanking(queries, meta.test_groundtruth, labeled, ctx.device) for fn in args.sim_fn}
    if labeled:
        for shard in extractor.shards(part("svd labeled candidates", labeled, "test candidate")):
            for fn, block in similarities(shard).items():
                rankings[fn].add_labeled(block, shard.start)
    for ranking in rankings.values():
        ranking.end_labeled(_reduce(ctx))
    if unlabeled:
        for shard in extractor.shards(part("svd unlabeled candidates", unlabeled, "test candidate")):
            for fn, block in similarities(shard).items():
                rankings[fn].add_unlabeled(block)
    records = []
    for fn in args.sim_fn:
        positions = rankings[fn].positions(_reduce(ctx))
        if not ctx.is_main:
            continue
        result = mean_average_precision(positions, args.topk)
        print((f"{fn}: " if len(args.sim_fn) > 1 else "") + format_map(result), flush=True)
        records.append({"sim_fn": fn, "map": result, "n_queries": len(queries),
                        "n_candidates": len(labeled) + len(unlabeled),
                        "feature_store": {"dir": args.feature_cache, "dtype": args.cache_dtype,
                                          "extracted": extractor.report.extracted, "read": extractor.report.read}})
    if ctx.is_main and args.output_json:
        write_json(args.output_json, records[0] if len(records) == 1 else records)
        logger.info("wrote %s", args.output_json)
    barrier()
    return records

