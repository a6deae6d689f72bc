"""Image retrieval evaluation on revisited Oxford/Paris (+ R1M), the paper's ``oxford_paris_eval.py``.

    python oxford_paris_eval.py -a resnet18 -r CKPT -dp DATA --embed_dim 512 -ms -p 3
    python oxford_paris_eval.py -t resnet101_delg --pca --path_to_pretrained_weights W -dp DATA -ms
    torchrun --nproc_per_node=4 oxford_paris_eval.py ...

Faithful to the paper by default: queries are not cropped (``--crop_queries`` for the standard protocol), images
at full resolution unless ``--imsize``. Prints E/M/H mAP and mP@k in percent like revisitop/cirtorch.
"""
from __future__ import annotations

import argparse

import torch
import torchvision.transforms as T

from datasets.oxford_paris import (
    DATASETS,
    KAPPAS,
    DatasetError,
    ImageList,
    RevisitedDataset,
    distractor_images,
    evaluate_scores,
    save_query_strips,
    similarity,
)
from datasets.transforms import imagenet_normalize
from engine.cli import add_eval_args, check_eval_args, make_parser
from models.embedder import EmbedderConfigError, build_embedder
from utils.argtypes import existing_dir, output_dir, positive_int
from utils.checkpoint import CheckpointError
from utils.distributed import DistContext, barrier, launch
from utils.features import PAPER_SCALES, distributed_loader, extract_features
from utils.files import write_json
from utils.log import get_logger, log_run_header, setup_logging
from utils.runtime import seed_everything

USER_ERRORS = (CheckpointError, DatasetError, EmbedderConfigError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser("Evaluation on roxford5k or rparis6k (+1M distractors).")
    data, evaluation = add_eval_args(parser, p_default=3)
    data.add_argument("-dp", "--data_path", default="/path/to/datasets", type=existing_dir,
                      help="root holding <dataset>/gnd_<dataset>.pkl, <dataset>/jpg/ and revisitop1m/")
    data.add_argument("-d", "--dataset", default="roxford5k", type=str, choices=list(DATASETS))
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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    return check_eval_args(parser, parser.parse_args(argv))


def require_images(images: ImageList, what: str) -> None:
    """Fail before extraction (which may take hours) when images are missing."""
    missing = images.missing()
    if missing:
        raise DatasetError(f"{len(missing)} of {len(images)} {what} image(s) not found, e.g. {missing[0]}. "
                                f"{images.where}")


def evaluate(args: argparse.Namespace, ctx: DistContext) -> None:
    logger = get_logger()
    embedder = build_embedder(arch=args.arch, resume=args.resume, teacher=args.teacher, pca=args.pca,
                              weights_dir=args.path_to_pretrained_weights, embed_dim=args.embed_dim, gem_p=args.p,
                              trust=args.trust_checkpoint).to(ctx.device)
    logger.info("model: %s", embedder.description)
    dataset = RevisitedDataset(args.data_path, args.dataset)
    transform = T.Compose([T.ToTensor(), imagenet_normalize()])
    parts = {"query": dataset.queries(transform, args.imsize, crop=args.crop_queries),
             "database": dataset.database(transform, args.imsize)}
    if args.plus1m:
        parts["distractor"] = distractor_images(args.data_path, transform, args.imsize)
    for name, images in parts.items():  # before hours of extraction (1M parallel stats take seconds)
        require_images(images, name)
        logger.info("%s: %d images", name, len(images))

    embed = embedder.multi if args.multiscale else embedder.single
    feats = {}
    for name, images in parts.items():
        loader = distributed_loader(images, ctx, batch_size=1, num_workers=args.num_workers)
        feats[name] = extract_features(embed, loader, len(images), ctx, amp=args.amp,
                                       show_progress=not args.no_progress, desc=name)
    if ctx.is_main:
        database = feats["database"]
        if args.plus1m:
            database = torch.cat([database, feats["distractor"]])
        scores = similarity(database.to(ctx.device), feats["query"].to(ctx.device))
        result = evaluate_scores(scores, dataset.gnd, args.dataset, KAPPAS)
        for line in result.lines():
            print(line, flush=True)
        if args.output_json:
            protocol = {"crop_queries": args.crop_queries, "imsize": args.imsize, "multiscale": args.multiscale,
                        "scales": list(PAPER_SCALES) if args.multiscale else [1.0], "plus1m": args.plus1m,
                        "model": embedder.description, "gem_p": args.p, "embed_dim": embedder.embed_dim,
                        "amp": args.amp, "world_size": ctx.world_size}
            record = result.to_json(dataset.n_queries, dataset.n_database,
                                    len(parts["distractor"]) if args.plus1m else 0, protocol)
            write_json(args.output_json, record)
            logger.info("results written to %s", args.output_json)
        if args.visualize:
            written = save_query_strips(args.visualize, dataset, scores, args.visualize_top, args.crop_queries,
                                        parts.get("distractor"))
            logger.info("%d retrieval pictures written to %s", len(written), args.visualize)
    barrier()


def main_worker(args: argparse.Namespace, ctx: DistContext) -> None:
    setup_logging(ctx.is_main)
    if ctx.is_main:
        log_run_header(get_logger(), args)
    seed_everything(args.seed)
    evaluate(args, ctx)


def main(argv: list[str] | None = None) -> None:
    launch(main_worker, parse_args(argv), user_errors=USER_ERRORS)


if __name__ == "__main__":
    main()
