"""Distillation training step: images/s of one step (frozen teachers + PCA-whitening, student forward/backward,
multi-teacher loss, Adam update) with the paper's 2- and 3-teacher sets, and the share of the step spent in the
teachers. Random-init models; PCA layers carry a random orthogonal projection (no fitting needed for timing).

    python benchmarks/train_step.py                   # 224 px, 4 pairs, fp32 and bf16 autocast
    python benchmarks/train_step.py --size 512        # the paper's GLDv2 resolution
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    add_common_args,
    describe_machine,
    machine_info,
    median,
    print_table,
    setup,
    stage,
    time_interleaved,
    write_json,
)
from models.distill_model import DistillModel, WhitenedTeachers
from models.loss import MultiTeacherDistillLoss
from models.pca_layer import PCAWhitening
from models.students import build_student
from models.teachers import build_teacher
from utils.runtime import autocast

TEACHER_SETS = {2: ("resnet101_delg", "resnet101_dolg"),
                3: ("resnet101_gem", "resnet101_ap_gem", "resnet101_solar")}


def random_pca(dim1: int, dim2: int, g: torch.Generator) -> PCAWhitening:
    """A PCA layer whose projection is a random orthogonal (dim2, dim1) matrix."""
    layer = PCAWhitening(dim1, dim2)
    q, _ = torch.linalg.qr(torch.randn(dim1, dim2, generator=g))
    layer.dvt.copy_(q.T)
    return layer


def build(names: tuple[str, ...], arch: str, embed_dim: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    teachers = {n: build_teacher(n) for n in names}
    pcas = {n: random_pca(t.embed_dim, embed_dim, g) for n, t in teachers.items()}
    model = DistillModel(build_student(arch, embed_dim=embed_dim), WhitenedTeachers.from_modules(teachers, pcas))
    model = model.to(device).train()
    loss_fn = MultiTeacherDistillLoss(teachers=list(names)).to(device)
    optimizer = torch.optim.Adam(model.base_encoder.parameters(), lr=1e-3, weight_decay=1e-6)
    return model, loss_fn, optimizer


def bench(args: argparse.Namespace, n_teachers: int, device: torch.device) -> list[dict]:
    names = TEACHER_SETS[n_teachers]
    with stage(f"building {n_teachers} teachers"):
        model, loss_fn, optimizer = build(names, args.arch, args.embed_dim, device, args.seed)
    x1 = torch.randn(args.pairs, 3, args.size, args.size, device=device)
    x2 = torch.randn(args.pairs, 3, args.size, args.size, device=device)
    fns = {}
    for amp in args.amp:
        def step(amp: str = amp) -> None:
            with autocast(amp, device):
                s1, s2, t1, t2 = model(x1, x2)
                loss = sum(loss_fn(s1, s2, t1, t2).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def teachers_only(amp: str = amp) -> None:
            with torch.no_grad(), autocast(amp, device):
                model.teacher_encoders(x1), model.teacher_encoders(x2)

        fns[f"step/{amp}"], fns[f"teachers/{amp}"] = step, teachers_only
    times = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    rows = []
    for amp in args.amp:
        step_s, teach_s = median(times[f"step/{amp}"]), median(times[f"teachers/{amp}"])
        rows.append({"teachers": "+".join(names), "n_teachers": n_teachers, "amp": amp, "size": args.size,
                     "pairs": args.pairs, "step_s": step_s, "images_per_s": 2 * args.pairs / step_s,
                     "teacher_s": teach_s, "teacher_share": teach_s / step_s,
                     "step_runs_s": times[f"step/{amp}"], "teacher_runs_s": times[f"teachers/{amp}"]})
    return rows


COLUMNS = [("teachers", "teachers", ""), ("amp", "amp", ""), ("size", "px", "d"), ("pairs", "pairs", "d"),
           ("step_s", "step (s)", ".2f"), ("images_per_s", "img/s", ".2f"), ("teacher_s", "teachers (s)", ".2f"),
           ("teacher_share", "teacher share", ".0%")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="image size in px (the paper trains at 512)")
    parser.add_argument("--pairs", type=int, default=4, help="positive pairs per step (2 x pairs images)")
    parser.add_argument("--teachers", type=int, nargs="+", default=[2, 3], choices=sorted(TEACHER_SETS),
                        help="teacher sets: 2 = DELG+DOLG, 3 = GeM+AP-GeM+SOLAR")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16", "fp16"],
                        help="autocast modes to compare (fp16 needs a GPU)")
    parser.add_argument("-a", "--arch", default="resnet18", help="student architecture")
    parser.add_argument("--embed_dim", type=int, default=512, help="student / PCA output dimension")
    add_common_args(parser, repeats=2, warmup=1)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    device = setup(args)
    machine = machine_info(device)
    rows = [row for n in args.teachers for row in bench(args, n, device)]
    print_table(f"Distillation step, student {args.arch}, medians of {args.repeats} "
                f"[{describe_machine(machine)}]", rows, COLUMNS)
    write_json(args.json, "train_step", args, machine, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
