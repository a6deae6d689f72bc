"""Write the small synthetic datasets (exact on-disk formats) used by the demo and the tests.

    python tools/make_toy_data.py --out toy_data [--seed 0 --size 64] [--parts gld revisitop svd]

Layout: ``<out>/gldv2`` (``--gld_root_path``), ``<out>/revisitop`` (``-dp/--data_path``: roxford5k, rparis6k and
revisitop1m), ``<out>/svd`` (``-dm <out>/svd/svd.yaml``: metadata files, frame folders, frame counts).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

from datasets.toy import make_toy_gld, make_toy_revisitop, make_toy_revisitop1m, make_toy_svd  # noqa: E402
from utils.launch import run_tool  # noqa: E402


def write_gld(args: argparse.Namespace) -> Path:
    root = Path(args.out) / "gldv2"
    make_toy_gld(root, args.gld_landmarks, args.gld_images, args.size, args.seed)
    return root


def write_revisitop(args: argparse.Namespace) -> Path:
    root = Path(args.out) / "revisitop"
    for name in ("roxford5k", "rparis6k"):
        make_toy_revisitop(root, name, args.queries, args.database, args.size, args.seed)
    if args.distractors > 0:
        make_toy_revisitop1m(root, args.distractors, args.size, args.seed)
    return root


def write_svd(args: argparse.Namespace) -> Path:
    root = Path(args.out) / "svd"
    make_toy_svd(root, n_queries=args.svd_queries, n_train_queries=args.svd_queries, n_unlabeled=args.svd_unlabeled,
                 size=args.size, seed=args.seed)
    return root


PARTS = {"gld": write_gld, "revisitop": write_revisitop, "svd": write_svd}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write toy GLDv2 / revisited Oxford-Paris (+R1M) datasets.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="long side of the images in pixels")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="what to write")
    parser.add_argument("--gld_landmarks", type=int, default=8)
    parser.add_argument("--gld_images", type=int, default=4, help="images per landmark")
    parser.add_argument("--queries", type=int, default=6, help="queries per revisited dataset")
    parser.add_argument("--database", type=int, default=30, help="database images per revisited dataset")
    parser.add_argument("--distractors", type=int, default=20, help="revisitop1m distractor images")
    parser.add_argument("--svd_queries", type=int, default=6, help="SVD test (and training) query videos")
    parser.add_argument("--svd_unlabeled", type=int, default=12, help="SVD unlabeled distractor videos")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    for part in args.parts:
        start = time.perf_counter()
        root = PARTS[part](args)
        print(f"{part}: {root} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    run_tool(main)
