"""Embedding cost: parameters, GFLOPs per image and images/s of the students, every teacher and the paper's
teacher ensembles (an ensemble embeds an image with each member, so its cost is the sum of its members').

Random-init models (no weights needed), batch 1 by default, ``torch.inference_mode``; each model is timed in the
default (contiguous) and in ``channels_last`` memory format, interleaved, and the faster one is reported. FLOPs are
counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs); achieved GFLOP/s is compared
with the matmul peak of the compute dtype (float32, or bf16/fp16 under ``--amp``), timed in the same interleaved
rounds as each model.

    python benchmarks/embedding_cost.py                         # 224 and 512 px
    python benchmarks/embedding_cost.py --sizes 224 512 1024    # also 1024 px (several minutes on 2 cores)
    python benchmarks/embedding_cost.py --device cuda --amp bf16 --batch 32 --sizes 224 512 1024   # a GPU
    # a timm teacher (random weights) beside a paper teacher, each at its own size (NAME@SIZE)
    python benchmarks/embedding_cost.py --models resnet101_dolg@512 timm:vit_base_patch14_dinov2@224 \
        timm:vit_base_patch14_dinov2@518
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks import common
from models.students import build_student
from models.teachers import TEACHERS, build_teacher, check_teacher_name
from utils.runtime import AMP_DTYPES, autocast, check_amp, count_gflops

STUDENTS = ("resnet18", "resnet34")
ENSEMBLES = {"GeM+AP-GeM+SOLAR": ("resnet101_gem", "resnet101_ap_gem", "resnet101_solar"),
             "DELG+DOLG": ("resnet101_delg", "resnet101_dolg"),
             "MoCoV3+BarlowTwins": ("mocov3", "barlowtwins")}


def time_model(model: nn.Module, x: torch.Tensor, args: argparse.Namespace, device: torch.device
               ) -> tuple[dict[str, float], float]:
    """Median seconds per batch, contiguous vs channels_last, and the matmul peak (GFLOP/s), interleaved."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # a copy: .to() converts in place

    def run(m: nn.Module, inp: torch.Tensor):
        def call():
            with torch.inference_mode(), autocast(args.amp, device):
                return m(inp)
        return call

    probe, probe_flop = common.matmul_probe(device, AMP_DTYPES[args.amp])
    times = common.time_interleaved({"contiguous": run(model, x), "channels_last": run(model_cl, x_cl),
                                     "matmul peak": probe}, repeats=args.repeats, warmup=args.warmup, device=device)
    peak = probe_flop / common.median(times.pop("matmul peak")) / 1e9
    return {k: common.median(v) for k, v in times.items()}, peak


def bench_model(name: str, model: nn.Module, size: int, args: argparse.Namespace, device: torch.device) -> dict:
    model = model.eval().to(device)
    x = torch.randn(args.batch, 3, size, size, device=device)
    gflops = count_gflops(model, x)
    with common.stage(f"{name} @ {size}"):
        seconds, peak = time_model(model, x, args, device)
    best = min(seconds, key=seconds.get)
    per_image = seconds[best] / args.batch
    return {"model": name, "size": size, "amp": args.amp, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops_per_image": gflops, "images_per_s": 1 / per_image, "seconds_per_image": per_image,
            "contiguous_s": seconds["contiguous"], "channels_last_s": seconds["channels_last"], "faster": best,
            "achieved_gflops": gflops / per_image, "matmul_peak_gflops": peak, "peak_frac": gflops / per_image / peak}


def ensemble_rows(rows: list[dict], size: int) -> list[dict]:
    by_name = {r["model"]: r for r in rows if r["size"] == size}
    students = [s for s in STUDENTS if s in by_name]
    out = []
    for ens, members in ENSEMBLES.items():
        if not all(m in by_name for m in members):
            continue
        seconds = sum(by_name[m]["seconds_per_image"] for m in members)
        gflops = sum(by_name[m]["gflops_per_image"] for m in members)
        peak = common.median([by_name[m]["matmul_peak_gflops"] for m in members])
        row = {"model": f"ensemble {ens}", "size": size, "params_m": sum(by_name[m]["params_m"] for m in members),
               "gflops_per_image": gflops, "images_per_s": 1 / seconds, "seconds_per_image": seconds,
               "achieved_gflops": gflops / seconds, "matmul_peak_gflops": peak, "peak_frac": gflops / seconds / peak,
               "faster": "-"}
        for s in students:
            row[f"speedup_{s}"] = seconds / by_name[s]["seconds_per_image"]
        out.append(row)
    return out


def model_at_sizes(value: str) -> str:
    """``NAME`` or ``NAME@SIZE``: a student, a paper teacher or ``timm:<model>``, optionally at its own size."""
    name, _, size = value.partition("@")
    if size and not (size.isdigit() and int(size) > 0):
        raise argparse.ArgumentTypeError(f"{value}: the size after @ must be a positive integer (px)")
    if name not in STUDENTS:
        try:
            check_teacher_name(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; or a student: {', '.join(STUDENTS)}") from None
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="square image sizes in px")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    parser.add_argument("--models", nargs="+", default=[*STUDENTS, *TEACHERS], type=model_at_sizes,
                        metavar="NAME[@SIZE]",
                        help="models to time: the students, the paper's teachers or timm:<model name> (random "
                             "weights); NAME@SIZE times it at that size only, instead of --sizes (default: both "
                             "students and the paper's teachers)")
    parser.add_argument("--amp", default="none", choices=sorted(AMP_DTYPES),
                        help="autocast dtype of the forward (bf16 on CPU or GPU, fp16 on GPU; default float32)")
    common.add_common_args(parser, repeats=2, warmup=1)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    device = common.setup(args)
    machine = common.machine_info(device)
    check_amp(args.amp, device)
    rows: list[dict] = []
    models: dict[str, list[int]] = {}
    for entry in args.models:
        name, _, size = entry.partition("@")
        models.setdefault(name, []).extend([int(size)] if size else args.sizes)
    for name, sizes in models.items():
        model = build_student(name) if name in STUDENTS else build_teacher(name)
        rows += [bench_model(name, model, size, args, device) for size in dict.fromkeys(sizes)]
        del model
    for size in sorted({row["size"] for row in rows}):
        rows += ensemble_rows(rows, size)
    columns = [("model", "model", ""), ("size", "px", "d"), ("params_m", "params (M)", ".1f"),
               ("gflops_per_image", "GFLOPs/img", ".1f"), ("images_per_s", "img/s", ".2f"),
               ("faster", "faster format", ""), ("achieved_gflops", "GFLOP/s", ".1f"),
               ("matmul_peak_gflops", "matmul peak", ".0f"), ("peak_frac", "of matmul peak", ".0%"),
               *[(f"speedup_{s}", f"{s} speed-up", ".1f") for s in STUDENTS]]
    rows.sort(key=lambda r: (r["size"], r["model"].startswith("ensemble")))
    dtype = {"none": "float32"}.get(args.amp, args.amp)
    common.print_table(f"Embedding cost, batch {args.batch}, {dtype}, medians of {args.repeats}; {dtype} matmul peak "
                       f"timed alongside each model [{common.describe_machine(machine)}]", rows, columns)
    common.write_json(args.json, "embedding_cost", args, machine, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
