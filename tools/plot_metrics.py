"""Plot a training run: loss and learning rate per iteration, and the teachers' positive-win shares, from the
``metrics.jsonl`` of a ``gld_distill.py``/``svd_distill.py`` checkpoint folder.

    python tools/plot_metrics.py CKPT_DIR                # writes CKPT_DIR/metrics.png
    python tools/plot_metrics.py CKPT_DIR --out run.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.argtypes import PathCheckingParser, existing_dir, output_file  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import read_jsonl  # noqa: E402
from utils.launch import run_tool  # noqa: E402
from utils.training_plot import plot_training_metrics  # noqa: E402

METRICS_FILE = "metrics.jsonl"


def get_args_parser() -> argparse.ArgumentParser:
    parser = PathCheckingParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", type=existing_dir, help="checkpoint folder of a training run (-c)")
    parser.add_argument("--out", type=output_file, default=None, help="PNG to write (default: CKPT_DIR/metrics.png)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = get_args_parser().parse_args(argv)
    metrics = Path(args.ckpt_dir) / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{metrics} not found: give the -c folder of a training run")
    out = Path(args.out) if args.out else Path(args.ckpt_dir) / "metrics.png"
    try:
        records = read_jsonl(metrics)
        plot_training_metrics(records, out, title=Path(args.ckpt_dir).resolve().name)
    except ValueError as exc:
        raise UserError(f"{metrics}: {exc}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_tool(main)
