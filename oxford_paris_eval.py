"""Image retrieval evaluation on revisited Oxford/Paris (+ R1M), the paper's ``oxford_paris_eval.py``.

    python oxford_paris_eval.py -a resnet18 -r CKPT -dp DATA --embed_dim 512 -ms -p 3
    python oxford_paris_eval.py -t resnet101_delg --pca --path_to_pretrained_weights W -dp DATA -ms
    torchrun --nproc_per_node=4 oxford_paris_eval.py ...

Faithful to the paper by default: queries are not cropped (``--crop_queries`` for the standard protocol), images
at full resolution unless ``--imsize``. Prints E/M/H mAP and mP@k in percent like revisitop/cirtorch.
"""
from __future__ import annotations

import argparse
from typing import Any

from engine.params import ImageEvalParams, get_parser, parse
from engine.run import run


def get_args_parser() -> argparse.ArgumentParser:
    return get_parser(ImageEvalParams)


def parse_args(argv: list[str] | None = None) -> ImageEvalParams:
    return parse(ImageEvalParams, argv)


def main(argv: list[str] | None = None) -> Any:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
