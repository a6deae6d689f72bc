"""Multi-teacher distillation on GLDv2 landmark pairs (the paper's gld_distill.py).

Example (the paper's README):
python gld_distill.py -a resnet18 -ts resnet101_delg resnet101_dolg -c CKPT --gld_root_path GLD \
    --path_to_pretrained_weights W
Uses every visible GPU (one process each), or the CPU; ``torchrun --nproc_per_node=N`` works as well.
"""
from __future__ import annotations

import argparse
from typing import Any

from engine.params import GLDTrainParams, get_parser, parse
from engine.run import run


def get_args_parser() -> argparse.ArgumentParser:
    return get_parser(GLDTrainParams)


def parse_args(argv: list[str] | None = None) -> GLDTrainParams:
    return parse(GLDTrainParams, argv)


def main(argv: list[str] | None = None) -> Any:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
