"""SVD near-duplicate video retrieval of one model, for one or more similarity functions.

The frame features of every part (queries, labeled candidates, unlabeled candidates) go through
``engine.features``: embedded once, or read from the store, and one extraction serves every ``--sim_fn``. The
queries' frames are on every rank; each rank scores its shards of candidates under every similarity function,
first the labeled ones (their scores for the queries whose ground truth names them are summed over ranks), then
the unlabeled ones, only counted above each relevant video's score. No rank holds the candidates' frames or the
(queries x candidates) scores.
"""
from __future__ import annotations

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
from engine.features import Extraction, Part, PartExtractor, Shard, evaluated_model, model_key
from engine.params import VideoEvalParams
from utils.distributed import DistContext, barrier
from utils.files import fingerprint, write_json
from utils.flags import protocol_values
from utils.log import get_logger
from utils.runtime import configure_backends
from utils.tensorboard import write_evaluation


def evaluation_videos(params: VideoEvalParams) -> tuple[SVDMeta, list[str], list[str], list[str]]:
    """(metadata, queries, labeled candidates, unlabeled candidates) of the evaluation."""
    meta = SVDMeta.from_yaml(params.dataset_meta)
    queries, labeled = meta.test_query_ids, meta.test_labeled_ids
    if not queries:
        raise SVDMetaError(f"the test ground truth of {params.dataset_meta} lists no query")
    return meta, queries, labeled, [] if params.subset_eval else meta.unlabeled_ids


def check_frames(params: VideoEvalParams) -> None:
    """Every test video's frames are on disk, before the extraction."""
    meta, queries, labeled, unlabeled = evaluation_videos(params)
    for ids, role in ((queries, "test query"), (labeled + unlabeled, "test candidate")):
        meta.check_frames_on_disk(ids, meta.check_videos(ids, role), role, max_frames=params.max_frames)


def frames_key(frame_counts: list[int], frame_root: str) -> dict:
    """What changes a video's frame features beyond the model's key (the flags are in it): the frames read, i.e.
    their folder and each video's frame count (frames extracted again at another rate change both)."""
    return {"frame_root": str(Path(frame_root).resolve()), "frame_counts": fingerprint(frame_counts)}


def video_part(params: VideoEvalParams, meta: SVDMeta, name: str, ids: list[str], role: str) -> Part:
    """Videos as the evaluation embeds them: the first ``--max_frames`` frames (every ``--stride``-th) of each."""
    counts = meta.check_videos(ids, role)
    videos = VideoFrames(meta.frame_root, ids, counts, svd_test_transform(params.input_norm, params.crop_size),
                         params.max_frames, params.stride)
    return Part(name, videos, ids, frames_key(counts, meta.frame_root), several_rows=True,
                batch_size=params.batch_size, collate_fn=video_collate)


def _reduce(ctx: DistContext):
    return (lambda t: dist.all_reduce(t)) if ctx.distributed else None


@torch.inference_mode()
def evaluate_videos(params: VideoEvalParams, ctx: DistContext) -> list[dict]:
    """Evaluate every ``params.sim_fn``; prints the paper's line for each and writes JSON on rank 0; returns the
    records."""
    logger = get_logger()
    configure_backends(ctx.device, params.amp)  # images of varying sizes: no cuDNN autotuning
    meta, queries, labeled, unlabeled = evaluation_videos(params)
    logger.info("SVD: %d queries, %d labeled candidates, %d distractors (%s evaluation)", len(queries), len(labeled),
                len(unlabeled), "subset" if params.subset_eval else "full")
    embedder = evaluated_model(params).to(ctx.device)
    logger.info("model: %s", embedder.description)
    extractor = PartExtractor(embedder.single, ctx, Extraction.of(params),
                              model_key(params) if params.feature_cache else {},
                              label=f"the model ({embedder.description})")
    num_frames = frames_per_video(params.max_frames, params.stride)

    def part(name: str, ids: list[str], role: str) -> Part:
        return video_part(params, meta, name, ids, role)

    def descriptors(feats: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        padded = pad_frames(feats, lengths, num_frames)
        return {fn: video_descriptors(padded, lengths, fn) for fn in params.sim_fn}

    def similarities(shard: Shard) -> dict[str, torch.Tensor]:
        cdesc = descriptors(shard.feats, shard.lengths)
        return {fn: descriptor_similarity(qdesc[fn], qlens, cdesc[fn], shard.lengths, fn, params.max_elements)
                for fn in params.sim_fn}

    qfeats, qlens = extractor.gather(part("svd queries", queries, "test query"))
    qdesc = descriptors(qfeats, qlens)
    rankings = {fn: VideoRanking(queries, meta.test_groundtruth, labeled, ctx.device) for fn in params.sim_fn}
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
    protocol = {**protocol_values(params), "model": embedder.description, "embed_dim": embedder.embed_dim,
                "world_size": ctx.world_size}
    for fn in params.sim_fn:
        positions = rankings[fn].positions(_reduce(ctx))
        if not ctx.is_main:
            continue
        result = mean_average_precision(positions, params.topk)
        print((f"{fn}: " if len(params.sim_fn) > 1 else "") + format_map(result), flush=True)
        records.append({"sim_fn": fn, "map": result, "n_queries": len(queries),
                        "n_candidates": len(labeled) + len(unlabeled),
                        "protocol": protocol,
                        "feature_store": extractor.report.record(params.feature_cache, params.cache_dtype)})
    if ctx.is_main and params.output_json:
        write_json(params.output_json, records[0] if len(records) == 1 else records)
        logger.info("wrote %s", params.output_json)
    if ctx.is_main and params.tensorboard:
        write_evaluation(params.tensorboard, embedder.epoch,
                         {f"svd/{r['sim_fn']}/mAP_{k}": v for r in records for k, v in r["map"].items()})
    barrier()
    return records

