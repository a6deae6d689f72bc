"""Near-duplicate video retrieval on SVD (the paper's svd_eval.py).

Example (the paper's README): python svd_eval.py -a resnet18 -r CKPT -dm config/svd.yaml --sim_fn cf --embed_dim 512
A teacher: python svd_eval.py -t mocov3 --pca --path_to_pretrained_weights W
Protocol as the paper: the first --max_frames frames of each video (every --stride-th), Resize(256) +
CenterCrop(224) + ToTensor without Normalize (--input_norm imagenet adds it), AP@k normalised by the relevant
videos inside the top k. Prints ``top-100 mAP: 0.xxxx | top-inf mAP: 0.xxxx``.
"""
from __future__ import annotations

import argparse
from typing import Any

from engine.params import VideoEvalParams, get_parser, parse
from engine.run import run


def get_args_parser() -> argparse.ArgumentParser:
    return get_parser(VideoEvalParams)


def parse_args(argv: list[str] | None = None) -> VideoEvalParams:
    return parse(VideoEvalParams, argv)


def main(argv: list[str] | None = None) -> Any:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
