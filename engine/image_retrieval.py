"""Revisited Oxford/Paris (+1M) evaluation of one model on one or more datasets.

Every part goes through ``engine.features`` (embedded once, or read from the store). Scores are streamed: the
queries (70 x D) are on every rank; each rank scores its database shards (all-gathered: a few thousand rows), then
its distractor shards, counting per query how many distractors score above each labelled image (the counts add up
over ranks) and keeping its best rows for the pictures. No rank ever holds the distractors' descriptors or
scores: memory is one shard plus the database scores, whatever the number of distractors. The distractors are
embedded or read once for all datasets of the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms as T

from datasets.oxford_paris import DatasetError, ImageList, RevisitedDataset, distractor_images
from datasets.ranking import HigherCounter, TopK
from datasets.revisitop import KAPPAS, item_positions, labelled_items, padded_items, result_from_positions
from datasets.revisitop_pictures import save_query_strips
from datasets.transforms import imagenet_normalize
from engine.features import Extraction, Part, PartExtractor, evaluated_model, model_key
from engine.params import ImageEvalParams
from models.embedder import Embedder
from utils.distributed import DistContext, barrier, gather_objects
from utils.features import PAPER_SCALES
from utils.files import fingerprint, write_json
from utils.flags import protocol_values, role_values
from utils.log import get_logger
from utils.runtime import configure_backends
from utils.tensorboard import write_evaluation


def require_images(images: ImageList, what: str) -> None:
    """Fail before extraction (which may take hours) when images are missing: parallel stats, seconds at 1M."""
    missing = images.missing()
    if missing:
        raise DatasetError(f"{len(missing)} of {len(images)} {what} image(s) not found, e.g. {missing[0]}. "
                           f"{images.where}")


def query_key(params: ImageEvalParams, boxes: list | None) -> dict:
    """What changes the queries' descriptors beyond the model's key: the flags declared for the queries only and,
    for cropped queries, the boxes read from the ground truth."""
    key = role_values(params, "store", scope="queries")
    if params.crop_queries:
        key["boxes"] = fingerprint([[float(v) for v in box] for box in boxes or []])
    return key


def result_protocol(params: ImageEvalParams, embedder: Embedder, ctx: DistContext) -> dict:
    """The JSON record's protocol: the flags declared with ``protocol``, and what the run made of them."""
    return {**protocol_values(params), "scales": list(PAPER_SCALES) if params.multiscale else [1.0],
            "model": embedder.description, "embed_dim": embedder.embed_dim, "world_size": ctx.world_size}


EVAL_TRANSFORM = T.Compose([T.ToTensor(), imagenet_normalize()])


def dataset_parts(params: ImageEvalParams, ds: RevisitedDataset) -> dict[str, Part]:
    """A dataset's queries and database, as the evaluation embeds them."""
    queries = ds.queries(EVAL_TRANSFORM, params.imsize, crop=params.crop_queries)
    boxes = [g["bbx"] for g in ds.gnd] if params.crop_queries else None
    return {"query": Part(f"{ds.name} queries", queries, ds.qimlist, query_key(params, boxes)),
            "database": Part(f"{ds.name} database", ds.database(EVAL_TRANSFORM, params.imsize), ds.imlist, {})}


def distractor_part(params: ImageEvalParams) -> Part:
    images = distractor_images(params.data_path, EVAL_TRANSFORM, params.imsize)
    return Part("revisitop1m distractors", images, images.names, {})


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
def evaluate_images(params: ImageEvalParams, ctx: DistContext) -> list[dict]:
    """Evaluate ``params.dataset`` (one or more names); prints the revisitop lines, writes JSON and pictures on rank 0
    and returns the JSON records."""
    logger = get_logger()
    configure_backends(ctx.device, params.amp)  # images of varying sizes: no cuDNN autotuning
    embedder = evaluated_model(params).to(ctx.device)
    logger.info("model: %s", embedder.description)
    extractor = PartExtractor(embedder.multi if params.multiscale else embedder.single, ctx, Extraction.of(params),
                              model_key(params) if params.feature_cache else {},
                              label=f"the model ({embedder.description})")
    datasets = [RevisitedDataset(params.data_path, name) for name in params.dataset]
    parts = {ds.name: dataset_parts(params, ds) for ds in datasets}
    distractors = distractor_part(params) if params.plus1m else None
    every_part = [part for group in parts.values() for part in group.values()] + ([distractors] if distractors else [])
    for part in every_part:  # before hours of extraction (1M parallel stats take seconds)
        require_images(part.dataset, part.name)
    k = params.visualize_top if params.visualize else None
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
        protocol = result_protocol(params, embedder, ctx)
        record = result.to_json(ds.n_queries, ds.n_database, len(distractors.names) if distractors else 0, protocol)
        record["feature_store"] = extractor.report.record(params.feature_cache, params.cache_dtype)
        records.append(record)
        if params.visualize:
            written = save_query_strips(params.visualize, ds, best, params.crop_queries,
                                        distractors.dataset if distractors else None)
            logger.info("%d retrieval pictures written to %s", len(written), params.visualize)
    if ctx.is_main and params.output_json:
        write_json(params.output_json, records[0] if len(records) == 1 else records)
        logger.info("results written to %s", params.output_json)
    if ctx.is_main and params.tensorboard:
        write_evaluation(params.tensorboard, embedder.epoch,
                         {f"{r['dataset']}{'+1m' if params.plus1m else ''}/mAP_{mode}": r["map"][mode]
                          for r in records for mode in r["map"]})
    barrier()
    return records
