"""Check the downloaded weights: the 7 teachers, their PCA files and the released students.

    python tools/check_weights.py --path_to_pretrained_weights W [--checkpoints CKPTS] [--embed_dim 512]

For each file: present or missing, whether it loads strictly in the published layout, its output dimension and
its SHA-256, as a table. For a missing PCA file, the command that learns it. Exit code 1 when something asked for
(``--teachers``, default all; the students when ``--checkpoints`` is given) is missing or broken.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.pca_layer import load_pca_layer, pca_weight_path  # noqa: E402
from models.released import RELEASED_STUDENTS, released_checkpoint  # noqa: E402
from models.students import load_student  # noqa: E402
from models.teachers import TEACHER_FILES, TEACHERS, build_teacher  # noqa: E402
from utils.argtypes import existing_dir, positive_int  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.files import sha256_file  # noqa: E402
from utils.launch import run_tool  # noqa: E402

SVD_TEACHERS = ("mocov3", "barlowtwins")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--path_to_pretrained_weights", required=True, type=existing_dir, metavar="W",
                        help="folder of the teacher files and pca_weights/")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS), metavar="NAME",
                        help="teachers to check (default: all 7)")
    parser.add_argument("--embed_dim", nargs="+", type=positive_int, default=[512],
                        help="PCA output dimensions to check (default 512)")
    parser.add_argument("--checkpoints", default=None, type=existing_dir, metavar="CKPTS",
                        help="folder of the released students (<name>.pth, <name>.pt or <name>/checkpoint*.pt*)")
    parser.add_argument("--trust_checkpoint", action="store_true", help="full unpickling, for files you trust")
    return parser


def learn_command(teacher: str, weights: Path, embed_dim: int) -> str:
    if teacher in SVD_TEACHERS:
        return (f"python svd_pca_learn.py -t {teacher} -dm config/svd.yaml --path_to_pretrained_weights {weights} "
                f"--embed_dim {embed_dim}")
    return (f"python gld_pca_learn.py -t {teacher} --gld_root_path GLD --path_to_pretrained_weights {weights} "
            f"--embed_dim {embed_dim} --imsize 512 --num_samples -1")


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


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    weights = Path(args.path_to_pretrained_weights)
    rows = []
    for name in args.teachers:
        row = check(weights / TEACHER_FILES[name],
                    lambda p, n=name: int(build_teacher(n, weights, trust=args.trust_checkpoint).embed_dim))
        rows.append({"what": f"teacher {name}", **row})
        for dim in args.embed_dim:
            if dim > TEACHERS[name].descriptor_dim:
                continue
            pca = check(pca_weight_path(weights, name, dim),
                        lambda p, n=name, d=dim: load_pca_layer(p, trust=args.trust_checkpoint,
                                                                in_dim=TEACHERS[n].descriptor_dim, out_dim=d).out_dim)
            if not pca["present"]:
                pca["error"] = f"missing; learn it: {learn_command(name, weights, dim)}"
            rows.append({"what": f"PCA {name} {dim}-d", **pca})
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
