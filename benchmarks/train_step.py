"""Distillation training step: images/s of one step (frozen teachers + PCA-whitening, student forward/backward,
multi-teacher loss, Adam update) with the paper's 2- and 3-teacher sets, and the share of the step spent in the
teachers; against it, the step from a teacher cache (``--teacher_cache``: the teachers' embeddings are read, no
teacher runs), what building the cache costs per image, and the teachers' cost of the paper's whole schedule online
and cached for K = 4, 8, 16 views per image. Random-init models; PCA layers carry a random orthogonal projection
(no fitting needed for timing).

The step is the training scripts' own (``engine.distill.distill_step`` on the model
``engine.distill.wrap_distributed`` returns, with the criterion that owns the frozen teachers). With
``--procs 1 2`` the same global batch is also split over 2 processes (gloo on CPU, one GPU each
with nccl), each with its share of the CPU threads, and images/s counts the whole step of all processes.

    python benchmarks/train_step.py                   # 224 px, 4 pairs, fp32 and bf16 autocast, 1 process
    python benchmarks/train_step.py --procs 1 2       # also 2 gloo processes sharing the cores
    python benchmarks/train_step.py --size 224 512 --amp none   # online vs cached at the paper's resolution too
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks import common
from engine.distill import distill_step, wrap_distributed
from models.distill_model import DistillationLoss, DistillModel, WhitenedTeachers
from models.loss import MultiTeacherDistillLoss
from models.pca_layer import PCAWhitening
from models.students import build_student
from models.teachers import build_teacher
from utils.distributed import DistContext
from utils.launch import free_port, init_distributed
from utils.runtime import autocast, check_amp

TEACHER_SETS = {2: ("resnet101_delg", "resnet101_dolg"),
                3: ("resnet101_gem", "resnet101_ap_gem", "resnet101_solar")}
# the paper's GLDv2 schedule: 3,000 epochs, each drawing 2 images from every one of 81,313 landmarks (per teacher)
PAPER_EPOCHS, PAPER_LANDMARKS, GLD_CLEAN_IMAGES = 3000, 81_313, 1_580_470
CACHE_VIEWS = (4, 8, 16)


def random_pca(dim1: int, dim2: int, g: torch.Generator) -> PCAWhitening:
    """A PCA layer whose projection is a random orthogonal (dim2, dim1) matrix."""
    layer = PCAWhitening(dim1, dim2)
    q, _ = torch.linalg.qr(torch.randn(dim1, dim2, generator=g))
    layer.dvt.copy_(q.T)
    return layer


def build(names: tuple[str, ...], args: argparse.Namespace, ctx: DistContext):
    """(module to call, criterion with the frozen teachers, optimizer) as the training scripts set them up."""
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # identical student initialisation on every rank
    teachers = {n: build_teacher(n) for n in names}
    pcas = {n: random_pca(t.embed_dim, args.embed_dim, g) for n, t in teachers.items()}
    model, student = wrap_distributed(DistillModel(build_student(args.arch, embed_dim=args.embed_dim)), ctx)
    model.train()
    criterion = DistillationLoss(WhitenedTeachers.from_modules(teachers, pcas),
                                 MultiTeacherDistillLoss(teachers=list(names)), args.embed_dim).to(ctx.device)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3, weight_decay=1e-6)
    return model, criterion, optimizer


def cached_criterion(criterion: DistillationLoss, x1: torch.Tensor, x2: torch.Tensor
                     ) -> tuple[DistillationLoss, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The criterion of a run from the teacher cache (no teachers) and the embeddings it reads, as stored
    (L2-normalised, float16), here computed once."""
    with torch.no_grad():
        cached = tuple([F.normalize(t, dim=-1).half().float() for t in criterion.teachers(x)] for x in (x1, x2))
    return DistillationLoss(None, criterion.loss), cached


def measure(args: argparse.Namespace, n_teachers: int, ctx: DistContext) -> list[dict]:
    """Every size of ``--size`` for one teacher set (built once)."""
    names = TEACHER_SETS[n_teachers]
    with common.stage(f"building {n_teachers} teachers" + (f" (rank {ctx.rank})" if ctx.distributed else "")):
        model, criterion, optimizer = build(names, args, ctx)
    return [row for size in args.size for row in measure_size(args, size, names, model, criterion, optimizer, ctx)]


def measure_size(args: argparse.Namespace, size: int, names: tuple[str, ...], model: torch.nn.Module,
                 criterion: DistillationLoss, optimizer: torch.optim.Optimizer, ctx: DistContext) -> list[dict]:
    """Time the online step, the teachers alone and the step from the cache, for every ``--amp`` mode,
    interleaved, on this rank's share of the batch; every timed call ends with a barrier, so a time is that of the
    slowest process."""
    pairs = args.pairs // ctx.world_size
    sync = dist.barrier if ctx.distributed else (lambda: None)
    x1 = torch.randn(pairs, 3, size, size, device=ctx.device)
    x2 = torch.randn(pairs, 3, size, size, device=ctx.device)
    from_cache, cached = cached_criterion(criterion, x1, x2)
    scalers = {amp: torch.amp.GradScaler(ctx.device.type, enabled=amp == "fp16") for amp in args.amp}
    fns = {}
    for amp in args.amp:
        def step(amp: str = amp) -> None:
            distill_step(model, criterion, optimizer, scalers[amp], x1, x2, amp, ctx.device)
            sync()

        def teachers_only(amp: str = amp) -> None:
            with torch.no_grad(), autocast(amp, ctx.device):
                criterion.teachers(x1), criterion.teachers(x2)
            sync()

        def cached_step(amp: str = amp) -> None:
            distill_step(model, from_cache, optimizer, scalers[amp], x1, x2, amp, ctx.device, cached)
            sync()

        fns[f"step/{amp}"], fns[f"teachers/{amp}"], fns[f"cached/{amp}"] = step, teachers_only, cached_step
    times = common.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=ctx.device)
    rows = []
    for amp in args.amp:
        step_s, teach_s = common.median(times[f"step/{amp}"]), common.median(times[f"teachers/{amp}"])
        cached_s = common.median(times[f"cached/{amp}"])
        per_image = teach_s / (2 * pairs)  # one view of one image through every teacher, in one process
        online_h = PAPER_EPOCHS * 2 * PAPER_LANDMARKS * per_image / 3600
        rows.append({"teachers": "+".join(names), "n_teachers": len(names), "amp": amp, "size": size,
                     "procs": ctx.world_size, "threads": torch.get_num_threads(), "pairs": args.pairs,
                     "step_s": step_s, "images_per_s": 2 * args.pairs / step_s, "teacher_s": teach_s,
                     "teacher_share": teach_s / step_s, "cached_step_s": cached_s,
                     "cached_images_per_s": 2 * args.pairs / cached_s, "speedup": step_s / cached_s,
                     "build_s_per_image": {k: k * per_image for k in CACHE_VIEWS},
                     "schedule_teacher_hours": {"online": online_h, **{
                         f"cached K={k}": GLD_CLEAN_IMAGES * k * per_image / 3600 for k in CACHE_VIEWS}},
                     "step_runs_s": times[f"step/{amp}"], "teacher_runs_s": times[f"teachers/{amp}"],
                     "cached_runs_s": times[f"cached/{amp}"]})
    return rows


def _rank_main(local_rank: int, args: argparse.Namespace, n_teachers: int, procs: int, dist_url: str,
               threads: int, use_cuda: bool, result: str) -> None:
    torch.set_num_threads(threads)
    ctx = init_distributed(local_rank, use_cuda, dist_url, 0, procs)
    try:
        rows = measure(args, n_teachers, ctx)
        if ctx.is_main:
            Path(result).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def bench(args: argparse.Namespace, n_teachers: int, procs: int, device: torch.device) -> list[dict]:
    """One process in this one, or ``procs`` spawned processes sharing this process's threads (or one GPU each)."""
    if procs == 1:
        return measure(args, n_teachers, DistContext(device=device))
    use_cuda = device.type == "cuda"
    if use_cuda and procs > torch.cuda.device_count():
        raise SystemExit(f"--procs {procs} needs {procs} GPUs; {torch.cuda.device_count()} visible")
    threads = max(1, torch.get_num_threads() // (1 if use_cuda else procs))
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.json")
        torch.multiprocessing.spawn(_rank_main, nprocs=procs, args=(args, n_teachers, procs,
                                    f"tcp://127.0.0.1:{free_port()}", threads, use_cuda, result))
        return json.loads(Path(result).read_text())


COLUMNS = [("teachers", "teachers", ""), ("amp", "amp", ""), ("size", "px", "d"), ("pairs", "pairs", "d"),
           ("procs", "processes", "d"), ("threads", "threads/process", "d"), ("step_s", "step (s)", ".2f"),
           ("images_per_s", "img/s", ".2f"), ("teacher_s", "teachers (s)", ".2f"),
           ("teacher_share", "teacher share", ".0%"), ("cached_step_s", "cached step (s)", ".2f"),
           ("speedup", "speed-up", ".1f")]


def schedule_rows(rows: list[dict]) -> list[dict]:
    """The paper's schedule: the teachers' hours online and cached (this machine's per-image teacher time)."""
    out = []
    for row in rows:
        hours = row["schedule_teacher_hours"]
        out.append({"teachers": row["teachers"], "amp": row["amp"], "size": row["size"],
                    "build_k8_s": row["build_s_per_image"][8], **{k: v for k, v in hours.items()},
                    **{f"ratio K={k}": hours["online"] / hours[f"cached K={k}"] for k in CACHE_VIEWS}})
    return out


SCHEDULE_COLUMNS = [("teachers", "teachers", ""), ("amp", "amp", ""), ("size", "px", "d"),
                    ("build_k8_s", "cache build, K=8 (s/image)", ".2f"), ("online", "online (teacher h)", ",.0f"),
                    *[(f"cached K={k}", f"cached K={k} (h)", ",.0f") for k in CACHE_VIEWS],
                    *[(f"ratio K={k}", f"online/cached K={k}", ".0f") for k in CACHE_VIEWS]]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[224],
                        help="image sizes in px (the paper trains GLDv2 at 512, SVD at 224)")
    parser.add_argument("--pairs", type=int, default=4, help="positive pairs per step over all processes")
    parser.add_argument("--teachers", type=int, nargs="+", default=[2, 3], choices=sorted(TEACHER_SETS),
                        help="teacher sets: 2 = DELG+DOLG, 3 = GeM+AP-GeM+SOLAR")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16", "fp16"],
                        help="autocast modes to compare (fp16 needs a GPU)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1],
                        help="process counts to compare (gloo on CPU); the batch is split between them")
    parser.add_argument("-a", "--arch", default="resnet18", help="student architecture")
    parser.add_argument("--embed_dim", type=int, default=512, help="student / PCA output dimension")
    common.add_common_args(parser, repeats=2, warmup=1)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    device = common.setup(args)
    for procs in args.procs:
        if procs < 1 or args.pairs % procs or args.pairs // procs < 2:
            raise SystemExit(f"--procs {procs}: --pairs {args.pairs} must split into >= 2 pairs per process "
                             "(BatchNorm needs 2 samples)")
    for amp in args.amp:
        check_amp(amp, device)
    machine = common.machine_info(device)
    rows = [row for n in args.teachers for procs in args.procs for row in bench(args, n, procs, device)]
    common.print_table(f"Distillation step, online and from the teacher cache, student {args.arch}, medians of "
                       f"{args.repeats} [{common.describe_machine(machine)}]", rows, COLUMNS)
    common.print_table(f"Teachers over the paper's schedule ({PAPER_EPOCHS} epochs x 2 x {PAPER_LANDMARKS:,} "
                       f"landmarks online; {GLD_CLEAN_IMAGES:,} images x K views cached), per process",
                       schedule_rows([r for r in rows if r["procs"] == 1] or rows), SCHEDULE_COLUMNS)
    common.write_json(args.json, "train_step", args, machine, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
