"""What the teacher cache costs in quality, on the toy data: online teachers vs ``--teacher_cache`` with K = 4 and 8
views per image, the same number of steps, through the real scripts.

Toy GLDv2 (training) and a held-out toy GLDv2 (other landmarks), random-init ResNet50 teachers whose PCA-whitening
is learned on the toy images (``gld_pca_learn.py``), ``gld_distill.py`` with each setting, then per student:
- the held-out distillation loss: the training objective on fresh views of held-out landmark pairs, with the
  online teachers' targets (student in eval mode, the same views for every student);
- toy ROxford mAP (``oxford_paris_eval.py``);
and, on the same held-out batches, the float16 storage's effect on the loss value (teachers' embeddings rounded to
float16 as the cache stores them, against float32).

    python benchmarks/teacher_cache_quality.py               # about 10 minutes on 2 CPU cores
    python benchmarks/teacher_cache_quality.py --epochs 4 --landmarks 16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import common
from datasets.gld import GLDPairDataset
from datasets.sampler import SeededItems
from datasets.toy import make_toy_gld, make_toy_revisitop
from datasets.transforms import gld_train_transform
from models.distill_model import WhitenedTeachers
from models.loss import MultiTeacherDistillLoss
from models.students import load_student
from models.teachers import TEACHER_FILES, build_teacher, write_published_layout

ROOT = common.REPO_ROOT
TEACHERS = ("mocov3", "barlowtwins")


def run(script: str, *flags: object) -> None:
    cmd = [sys.executable, str(ROOT / script), *map(str, flags), "--no_progress"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexited with {res.returncode}:\n{res.stderr[-3000:]}")


def held_out_batches(root: Path, imsize: int, pairs: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed views of held-out pairs (the first two images of each landmark), seeded per image."""
    data = GLDPairDataset(root, gld_train_transform(imsize))
    items = SeededItems(data)
    groups = [g for g in data.groups][: pairs * n_batches]
    batches = []
    for b in range(0, len(groups), pairs):
        chunk = groups[b:b + pairs]
        x1 = torch.stack([items[(g[0], 1000 + g[0])] for g in chunk])
        x2 = torch.stack([items[(g[1], 2000 + g[1])] for g in chunk])
        batches.append((x1, x2))
    return batches


@torch.no_grad()
def held_out_loss(student: torch.nn.Module, targets: list, batches: list, loss: MultiTeacherDistillLoss) -> float:
    values = []
    for (x1, x2), (t1, t2) in zip(batches, targets):
        values.append(float(sum(loss(student(x1), student(x2), t1, t2).values())))
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landmarks", type=int, default=32, help="training landmarks (4 images each)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every setting (the same steps)")
    parser.add_argument("--imsize", type=int, default=64)
    parser.add_argument("--embed_dim", type=int, default=32)
    parser.add_argument("--views", type=int, nargs="+", default=[4, 8], help="K of the cached settings")
    common.add_common_args(parser, repeats=1, warmup=0)
    args = parser.parse_args(argv)
    common.setup(args)
    machine = common.machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gld, held, rev, weights = work / "gld", work / "held_out", work / "rev", work / "w"
        with common.stage("toy data, random teachers, PCA learning"):
            make_toy_gld(gld, n_landmarks=args.landmarks, imgs_per_landmark=4, size=args.imsize, seed=args.seed)
            make_toy_gld(held, n_landmarks=32, imgs_per_landmark=2, size=args.imsize, seed=args.seed + 100)
            make_toy_revisitop(rev, "roxford5k", n_queries=12, n_db=60, size=args.imsize, seed=args.seed)
            for i, name in enumerate(TEACHERS):
                torch.manual_seed(args.seed + i)
                write_published_layout(name, build_teacher(name), weights / TEACHER_FILES[name])
                run("gld_pca_learn.py", "-t", name, "--gld_root_path", gld, "--path_to_pretrained_weights", weights,
                    "--imsize", args.imsize, "--num_samples", -1, "-b", 32, "--embed_dim", args.embed_dim,
                    "--num_workers", 0, "--device", "cpu")
        settings = {"online": []} | {f"cached K={k}": ["--teacher_cache", work / "cache", "--teacher_views", k]
                                     for k in args.views}
        common_flags = ["-a", "resnet18", "-ts", *TEACHERS, "--gld_root_path", gld, "--path_to_pretrained_weights",
                        weights, "--student_init", "random", "--imsize", args.imsize, "--epochs", args.epochs,
                        "-b", 16, "--lr", 1e-3, "--embed_dim", args.embed_dim, "--num_workers", 1, "--device",
                        "cpu", "--seed", args.seed, "--snapshot_step", args.epochs]
        for label, flags in settings.items():
            with common.stage(f"gld_distill.py, {label}"):
                run("gld_distill.py", *common_flags, "-c", work / label.replace(" ", "_"), *flags)

        teachers = WhitenedTeachers(list(TEACHERS), str(weights), gem_p=3.0, embed_dim=args.embed_dim).eval()
        batches = held_out_batches(held, args.imsize, pairs=8, n_batches=4)
        with torch.no_grad():
            exact = [tuple([F.normalize(t, dim=-1) for t in teachers(x)] for x in pair) for pair in batches]
        rounded = [tuple([t.half().float() for t in side] for side in pair) for pair in exact]
        loss = MultiTeacherDistillLoss(teachers=list(TEACHERS))
        rows = []
        for label in settings:
            ckpt = work / label.replace(" ", "_") / "checkpoint_last.pt"
            student = load_student(ckpt, "resnet18", embed_dim=args.embed_dim)
            out = work / f"{label.replace(' ', '_')}.json"
            run("oxford_paris_eval.py", "-a", "resnet18", "-r", ckpt, "-dp", rev, "--imsize", args.imsize,
                "--embed_dim", args.embed_dim, "--num_workers", 0, "--device", "cpu", "--output_json", out)
            mAP = json.loads(out.read_text())["map"]
            fp32, fp16 = held_out_loss(student, exact, batches, loss), held_out_loss(student, rounded, batches, loss)
            rows.append({"setting": label, "held_out_loss": fp32, "loss_fp16_targets": fp16,
                         "fp16_rel_change": abs(fp16 - fp32) / fp32, **{f"mAP {k}": v for k, v in mAP.items()}})
    columns = [("setting", "setting", ""), ("held_out_loss", "held-out loss", ".5f"),
               ("loss_fp16_targets", "same, float16 targets", ".5f"), ("fp16_rel_change", "relative change", ".1e"),
               ("mAP E", "toy mAP E", ".2f"), ("mAP M", "toy mAP M", ".2f"), ("mAP H", "toy mAP H", ".2f")]
    common.print_table(f"Online vs teacher cache, {args.epochs} epochs of {args.landmarks} toy landmarks, seed "
                       f"{args.seed} [{common.describe_machine(machine)}]", rows, columns)
    common.write_json(args.json, "teacher_cache_quality", args, machine, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
