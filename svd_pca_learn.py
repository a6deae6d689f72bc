"""Learn a teacher's PCA-whitening on SVD training frames (the paper's svd_pca_learn.py).

Example: python svd_pca_learn.py -t mocov3 -dm config/svd.yaml --path_to_pretrained_weights W
writes W/pca_weights/mocov3_pca_512d_svd_224x224_p1.pt (or --dump_to FILE).
Frames: up to 60 random frames of every training video (one seeded RNG, the same on every rank).
"""
from __future__ import annotations

import argparse
from typing import Any

from engine.params import SVDPCAParams, get_parser, parse
from engine.run import run


def get_args_parser() -> argparse.ArgumentParser:
    return get_parser(SVDPCAParams)


def parse_args(argv: list[str] | None = None) -> SVDPCAParams:
    return parse(SVDPCAParams, argv)


def main(argv: list[str] | None = None) -> Any:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
