"""Learn a teacher's PCA-whitening on GLDv2 images (the paper's gld_pca_learn.py).

Example: python gld_pca_learn.py -t resnet101_delg --gld_root_path GLD --path_to_pretrained_weights W
writes W/pca_weights/resnet101_delg_pca_512d_gldv2_512x512_p3_randcrop.pt (or --dump_to FILE).
"""
from __future__ import annotations

import argparse
from typing import Any

from engine.params import GLDPCAParams, get_parser, parse
from engine.run import run


def get_args_parser() -> argparse.ArgumentParser:
    return get_parser(GLDPCAParams)


def parse_args(argv: list[str] | None = None) -> GLDPCAParams:
    return parse(GLDPCAParams, argv)


def main(argv: list[str] | None = None) -> Any:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
