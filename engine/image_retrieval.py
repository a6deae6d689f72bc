"""Revisited Oxford/Paris (+1M) evaluation of one model on one or more datasets.

Every part goes through ``engine.features`` (embedded once, or read from the store). Scores are streamed: the
queries (70 x D) are on every rank; each rank scores its database shards (all-gathered: a few thousand rows), then
its distractor shards, counting per query how many distractors score above each labelled image (the counts add up
over ranks) and keeping its best rows for the pictures. No rank ever holds the distractors' descriptors or
scores: memory is one shard plus the database scores, whatever the number of distractors. The distractors are
embedded or read once for all datasets of the run.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms as T

from datasets.oxford_paris import (
    KAPPAS,
    DatasetError,
    HigherCounter,
    ImageList,
    RevisitedDataset,
    TopK,
    distractor_images,
    item_positions,
    labelled_items,
    padded_items,
    result_from_positions,
    save_query_strips,
)
from datasets.transforms import imagenet_normalize
from engine.features import Part, PartExtractor, model_components
from models.embedder import build_embedder
from utils.distributed import DistContext, barrier, gather_objects
from utils.features import PAPER_SCALES
from utils.files import fingerprint, write_json
from utils.log import get_logger
from utils.runtime import configure_backends


def require_images(images: ImageList, what: str) -> None:
    """Fail before extraction (which may take hours) when images are missing: parallel stats, seconds at 1M."""
    missing = images.missing()
    if missing:
        raise DatasetError(f"{len(missing)} of {len(images)} {what} image(s) not found, e.g. {missing[0]}. "
                           f"{images.where}")


def image_protocol(args: argparse.Namespace, crop: bool = False, boxes: list | None = None) -> dict:
    """What of the protocol changes an image's descriptor (the store key): the flags, the data root (another root
    holds other images under the same names) and, for cropped queries, the boxes read from the ground truth."""
    protocol = {"imsize": args.imsize, "multiscale": args.multiscale,
                "scales": list(PAPER_SCALES) if args.multiscale else [1.0], "amp": args.amp, "input": "imagenet",
                "data_root": str(Path(args.data_path).resolve()) if getattr(args, "data_path", None) else None}
    if crop:
        protocol.update(crop_queries=True, boxes=fingerprint([[float(v) for v in box] for box in boxes or []]))
    return protocol


@dataclass
class DatasetRun:
    """One dataset's queries and the running results of its ranking."""

    dataset: RevisitedDataset
    queries: torch.Tensor  # L2-normalised (nq x D)
    items: list[np.ndarray]
    db_positions: list[np.ndarray]
    distractors: HigherCounter
    best: TopK | None

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        """(nq x rows) cosine similarities, as the paper scores (both sides L2-normalised)."""
        return self.queries @ F.normalize(feats, dim=1).T


def start_dataset(dataset: RevisitedDataset, extractor: PartExtractor, parts: dict[str, Part], k: int | None,
                  ctx: DistContext) -> DatasetRun:
    """The queries on every rank, the database scored and ranked exactly (ties by database index)."""
    queries, _ = extractor.gather(parts["query"])
    queries = F.normalize(queries, dim=1)
    mine = [(sh.start, (queries @ F.normalize(sh.feats, dim=1).T).T.cpu())
            for sh in extractor.shards(parts["database"])]
    blocks = sorted((b for rank in gather_objects(mine, ctx) for b in rank), key=lambda b: b[0])
    db_scores = torch.cat([b[1] for b in blocks]).to(ctx.device)  # (n_db x nq)
    items = labelled_items(dataset.gnd)
    idx, sizes = padded_items(items, ctx.device)
    best = None
    if k is not None:
        best = TopK(dataset.n_queries, k, ctx.device)
        best.add(db_scores.T, 0)
    return DatasetRun(dataset, queries, items, item_positions(db_scores, items),
                      HigherCounter(db_scores.gather(0, idx.T).T, sizes), best)


def finish_dataset(run: DatasetRun, ctx: DistContext) -> tuple[list[np.ndarray], TopK | None]:
    """Sum the distractor counts of all ranks; on rank 0, each labelled image's position and the best rows."""
    if ctx.distributed:
        dist.all_reduce(run.distractors.counts)
    higher = run.distractors.higher().cpu().numpy()
    positions = [p + higher[q, : len(p)] for q, p in enumerate(run.db_positions)]
    best = run.best
    if best is not None and ctx.distributed:
        parts = gather_objects((best.scores.cpu(), best.rows.cpu()), ctx)
        best = TopK(run.dataset.n_queries, best.k, ctx.device)
        for scores, rows in parts:
            best.merge(scores.to(ctx.device), rows.to(ctx.device))
    return positions, best


@torch.inference_mode()
def evaluate_images(args: argparse.Namespace, ctx: DistContext) -> list[dict]:
    """Evaluate ``args.dataset`` (one or more names); prints the revisitop lines, writes JSON and pictures on rank 0
    and returns the JSON records."""
    logger = get_logger()
    configure_backends(ctx.device, args.amp)  # images of varying sizes: no cuDNN autotuning
    embedder = build_embedder(arch=args.arch, resume=args.resume, teacher=args.teacher, pca=args.pca,
                              weights_dir=args.path_to_pretrained_weights, embed_dim=args.embed_dim, gem_p=args.p,
                              trust=args.trust_checkpoint).to(ctx.device)
    logger.info("model: %s", embedder.description)
    extractor = PartExtractor(embedder.multi if args.multiscale else embedder.single, ctx, args,
                              model_components(args) if args.feature_cache else {},
                              label=f"the model ({embedder.description})")
    transform = T.Compose([T.ToTensor(), imagenet_normalize()])
    datasets = [RevisitedDataset(args.data_path, name) for name in args.dataset]
    parts = {}
    for ds in datasets:
        queries = ds.queries(transform, args.imsize, crop=args.crop_queries)
        boxes = [g["bbx"] for g in ds.gnd] if args.crop_queries else None
        parts[ds.name] = {"query": Part(f"{ds.name} queries", queries, ds.qimlist,
                                              image_protocol(args, args.crop_queries, boxes)),
                          "database": Part(f"{ds.name} database", ds.database(transform, args.imsize),
                                                 ds.imlist, image_protocol(args))}
    distractors = None
    if args.plus1m:
        images = distractor_images(args.data_path, transform, args.imsize)
        distractors = Part("revisitop1m distractors", images, images.names, image_protocol(args))
    every_part = [part for group in parts.values() for part in group.values()] + ([distractors] if distractors else [])
    for part in every_part:  # before hours of extraction (1M parallel stats take seconds)
        require_images(part.dataset, part.name)
    k = args.visualize_top if args.visualize else None
    runs = [start_dataset(ds, extractor, parts[ds.name], k, ctx) for ds in datasets]
    if distractors is not None:  # one pass over the distractors scores every dataset's queries
        for shard in extractor.shards(distractors):
            feats = F.normalize(shard.feats, dim=1)
            for run in runs:
                block = run.queries @ feats.T
                run.distractors.add(block)
                if run.best is not None:
                    run.best.add(block, run.dataset.n_database + shard.start)
    records = []
    for run in runs:
        positions, best = finish_dataset(run, ctx)
        if not ctx.is_main:
            continue
        ds = run.dataset
        result = result_from_positions(run.items, positions, ds.gnd, ds.name, KAPPAS)
        for line in result.lines():
            print(line, flush=True)
        protocol = {"crop_queries": args.crop_queries, "imsize": args.imsize, "multiscale": args.multiscale,
                    "scales": list(PAPER_SCALES) if args.multiscale else [1.0], "plus1m": args.plus1m,
                    "model": embedder.description, "gem_p": args.p, "embed_dim": embedder.embed_dim,
                    "amp": args.amp, "world_size": ctx.world_size}
        record = result.to_json(ds.n_queries, ds.n_database, len(distractors.names) if distractors else 0, protocol)
        record["feature_store"] = {"dir": args.feature_cache, "dtype": args.cache_dtype,
                                   "extracted": extractor.report.extracted, "read": extractor.report.read}
        records.append(record)
        if args.visualize:
            written = save_query_strips(args.visualize, ds, best, args.crop_queries,
                                        distractors.dataset if distractors else None)
            logger.info("%d retrieval pictures written to %s", len(written), args.visualize)
    if ctx.is_main and args.output_json:
        write_json(args.output_json, records[0] if len(records) == 1 else records)
        logger.info("results written to %s", args.output_json)
    barrier()
    return records
