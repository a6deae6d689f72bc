"""Check the downloaded weights: the 7 teachers (or timm ones), their PCA files and the released students.

    python tools/check_weights.py --path_to_pretrained_weights W [--checkpoints CKPTS] [--embed_dim 512]
    python tools/check_weights.py --path_to_pretrained_weights W --teachers resnet101_dolg timm:vit_base_patch14_dinov2

For each file: present or missing, whether it loads strictly in the published layout (a timm teacher: every key of
the model), its output dimension and its SHA-256, as a table. For a missing PCA file, the command that learns it. A
timm teacher's PCA files are learned per data: those present are checked (gldv2 for the image flows, svd for the
video ones), and none present is a missing file. Exit code 1 when something asked for (``--teachers``, default the
paper's 7; the students when ``--checkpoints`` is given) is missing or broken.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.pca_layer import PCA_DATA, load_pca_layer, pca_learn_command, pca_weight_path  # noqa: E402
from models.released import RELEASED_STUDENTS, released_checkpoint  # noqa: E402
from models.students import load_student  # noqa: E402
from models.teachers import (  # noqa: E402
    TEACHER_POOLS,
    TEACHERS,
    build_teacher,
    check_teacher_name,
    descriptor_dim,
    teacher_file,
)
from models.timm_names import is_timm_name  # noqa: E402
from utils.argtypes import checked_by, existing_dir, positive_float, positive_int  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.files import sha256_file  # noqa: E402
from utils.launch import run_tool  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--path_to_pretrained_weights", required=True, type=existing_dir, metavar="W",
                        help="folder of the teacher files and pca_weights/")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), type=checked_by(check_teacher_name),
                        metavar="NAME", help="teachers to check: the paper's or timm:<model name> (default: the "
                                             "paper's 7)")
    parser.add_argument("--teacher_pool", default="pre_logits", choices=TEACHER_POOLS,
                        help="the pooling of the timm teachers whose PCA files are checked")
    parser.add_argument("-p", type=positive_float, default=None,
                        help="GeM power of --teacher_pool gem (default: the scripts', 3 for gldv2 and 1 for svd)")
    parser.add_argument("--embed_dim", nargs="+", type=positive_int, default=[512],
                        help="PCA output dimensions to check (default 512)")
    parser.add_argument("--checkpoints", default=None, type=existing_dir, metavar="CKPTS",
                        help="folder of the released students (<name>.pth, <name>.pt or <name>/checkpoint*.pt*)")
    parser.add_argument("--trust_checkpoint", action="store_true", help="full unpickling, for files you trust")
    return parser


def check(path: Path, load) -> dict:
    """One row: present, loads (and its output dimension), SHA-256, the error when it does not load."""
    row = {"file": str(path), "present": path.is_file(), "loads": False, "dim": None, "sha256": None, "error": None}
    if not row["present"]:
        row["error"] = "missing"
        return row
    row["sha256"] = sha256_file(path)
    try:
        row["dim"] = load(path)
        row["loads"] = True
    except (CheckpointError, ValueError) as exc:
        row["error"] = " ".join(str(exc).split())[:200]
    return row


def pca_rows(name: str, weights: Path, dim: int, in_dim: int, pool: str, args: argparse.Namespace) -> list[dict]:
    """The rows of a teacher's PCA files for ``dim``: the paper's one file, or a timm teacher's file per data."""
    namings = [{"data": "svd" if "_svd_" in pca_weight_path(weights, name, dim).name else "gldv2"}]
    if is_timm_name(name):
        namings = [{"data": data, "pool": pool, "gem_p": args.p or {"gldv2": 3.0, "svd": 1.0}[data]}
                   for data in PCA_DATA]
        present = [n for n in namings if pca_weight_path(weights, name, dim, **n).is_file()]
        namings = present or namings[:1]
    rows = []
    for naming in namings:
        pca = check(pca_weight_path(weights, name, dim, **naming),
                    lambda p, d=dim: load_pca_layer(p, trust=args.trust_checkpoint, in_dim=in_dim, out_dim=d).out_dim)
        if not pca["present"]:
            pca["error"] = f"missing; learn it: {pca_learn_command(name, dim, weights, **naming)}"
        data = f" {naming['data']}" if is_timm_name(name) else ""
        rows.append({"what": f"PCA {name} {dim}-d{data}", **pca})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    weights = Path(args.path_to_pretrained_weights)
    rows = []
    for name in dict.fromkeys(args.teachers):
        pool = args.teacher_pool if is_timm_name(name) else "pre_logits"
        row = check(teacher_file(name, weights),
                    lambda p, n=name, how=pool: int(build_teacher(n, weights, trust=args.trust_checkpoint,
                                                                     pool=how).embed_dim))
        rows.append({"what": f"teacher {name}", **row})
        in_dim = descriptor_dim(name, pool)
        for dim in args.embed_dim:
            if dim > in_dim:
                continue
            rows += pca_rows(name, weights, dim, in_dim, pool, args)
    if args.checkpoints:
        for name, (arch, _) in RELEASED_STUDENTS.items():
            row = check(released_checkpoint(args.checkpoints, name),
                        lambda p, a=arch: int(load_student(p, a, trust=args.trust_checkpoint).embed_dim))
            rows.append({"what": f"student {name} ({arch})", **row})
    print("| file | present | loads | dim | sha256 |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {'yes' if row['present'] else 'NO'} | {'yes' if row['loads'] else 'NO'} | "
              f"{row['dim'] or '-'} | {row['sha256'][:16] + '...' if row['sha256'] else '-'} |")
    broken = [row for row in rows if not row["loads"]]
    for row in broken:
        print(f"{row['what']}: {row['file']}: {row['error']}")
    print(f"{len(rows) - len(broken)} of {len(rows)} files present and loading")
    if broken:
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    run_tool(main)
