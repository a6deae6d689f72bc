"""Multi-teacher distillation on SVD video frames (the paper's svd_distill.py, which crashes as released).

Example (the paper's README):
python svd_distill.py -a resnet18 -ts mocov3 barlowtwins -c CKPT -dm config/svd.yaml --path_to_pretrained_weights W
Each epoch visits every training video once with one uniformly random frame; the two distillation views are two
augmentations of that frame. Uses every visible GPU (one process each), or the CPU; torchrun works as well.
"""
from __future__ import annotations

import argparse
from typing import Any

from engine.params import SVDTrainParams, get_parser, parse
from engine.run import run


def get_args_parser() -> argparse.ArgumentParser:
    return get_parser(SVDTrainParams)


def parse_args(argv: list[str] | None = None) -> SVDTrainParams:
    return parse(SVDTrainParams, argv)


def main(argv: list[str] | None = None) -> Any:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
