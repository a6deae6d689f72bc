"""Distillation training shared by gld_distill.py and svd_distill.py (facts §4.3).

A script parses its flags (``add_distill_args`` + its own data/temperature flags), then calls
``run_distillation(args, ctx, build_data)`` on every rank; ``build_data(args, ctx)`` returns a ``TrainData``
whose loader yields ``(x1, x2)``: two views of the same items, the positives of the loss.

As the paper: student + frozen whitened teachers, Adam over the student only, CosineAnnealingLR to 1e-6 stepped
every iteration, the multi-teacher similarity KL loss, checkpoints with ``epoch``/``state_dict``/``optimizer``/
``lr_scheduler``/``loss_fn``. Added: CPU and any world size, SyncBatchNorm + DDP only when distributed, AMP,
NaN stop, metrics.jsonl, atomic ``checkpoint_last.pt``, and exact resume (sampler, RNG and scaler states).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from models.distill_model import DistillModel, WhitenedTeachers
from models.loss import STRATEGIES, MultiTeacherDistillLoss
from models.pca_layer import pca_weight_path
from models.students import CHECKPOINT_PREFIX, build_student, student_checkpoint_state
from utils.checkpoint import load_file, load_state_strict, save_atomic
from utils.config import dump_args, to_plain
from utils.distributed import DistContext, barrier
from utils.log import MetricsWriter, Throughput, get_logger, log_run_header, progress, setup_logging
from utils.runtime import add_runtime_args, autocast, check_amp, seed_everything

LAST_CHECKPOINT = "checkpoint_last.pt"


@dataclass
class TrainData:
    """What a script supplies: the dataset, a batch sampler with ``set_epoch``/``state_dict``/``load_state_dict``
    and a collate function producing ``(x1, x2)``."""

    dataset: Dataset
    batch_sampler: Any
    collate_fn: Callable | None = None


def add_distill_args(parser: argparse.ArgumentParser, *, arch_default: str = "resnet18", lr_default: float = 1e-3,
                     p_default: float = 3.0, dist_url: str = "env://") -> None:
    """Flags both training scripts share (the paper's names, short forms and defaults) + runtime flags."""
    from models.teachers import TEACHERS

    parser.add_argument("-a", "--arch", default=arch_default, metavar="ARCH",
                        help="student: resnet18, resnet34 or timm:<model name>")
    parser.add_argument("-ts", "--teachers", required=True, nargs="+", choices=list(TEACHERS), metavar="NAME",
                        help=f"teachers to distill: {', '.join(TEACHERS)}")
    parser.add_argument("-c", "--ckpt_dir", required=True, metavar="DIR", help="output folder")
    parser.add_argument("-b", "--batch_size", type=int, default=64, help="pairs per process and iteration")
    parser.add_argument("--num_workers", type=int, default=8, help="data loader workers per process")
    parser.add_argument("-r", "--resume", default=None, metavar="PATH",
                        help=f"checkpoint to resume, or 'auto' for CKPT_DIR/{LAST_CHECKPOINT} when it exists")
    parser.add_argument("--path_to_pretrained_weights", default="/path/to/pretrained_weights", metavar="DIR",
                        help="folder of the teacher files and pca_weights/")
    parser.add_argument("--start_epoch", type=int, default=0, help="first epoch (0-based) when not resuming")
    parser.add_argument("--epochs", type=int, default=200, help="number of training epochs")
    parser.add_argument("--lr", type=float, default=lr_default, help="Adam learning rate")
    parser.add_argument("--wd", "--weight-decay", type=float, default=1e-6, dest="weight_decay",
                        help="Adam weight decay")
    parser.add_argument("--snapshot_step", type=int, default=10, help="write checkpoint_{epoch}.pt every N epochs")
    parser.add_argument("--embed_dim", type=int, default=512, help="student / PCA output dimension")
    parser.add_argument("-p", type=float, default=p_default, help="GeM power of student and teachers")
    parser.add_argument("-s", "--strategy", default="maxmin", choices=list(STRATEGIES),
                        help="teacher similarity fusion")
    parser.add_argument("--student_init", default="imagenet", choices=["imagenet", "random"],
                        help="imagenet: torchvision ImageNet weights (the paper; needs them downloaded or cached); "
                             "random: from scratch")
    parser.add_argument("--log_every", type=int, default=0,
                        help="iterations between log/metrics lines (0: 16 per epoch, as the paper)")
    add_runtime_args(parser, dist_url=dist_url)


def check_weight_files(args: argparse.Namespace, pca_script: str) -> None:
    """Before any process starts: every teacher and PCA file exists, else say which and how to make it."""
    from models.teachers import TEACHER_FILES

    root = Path(args.path_to_pretrained_weights)
    for name in args.teachers:
        teacher_file = root / TEACHER_FILES[name]
        if not teacher_file.is_file():
            raise SystemExit(f"teacher {name}: weight file not found: {teacher_file}. Download the published "
                             "teacher weights into --path_to_pretrained_weights.")
        pca_file = pca_weight_path(root, name, args.embed_dim)
        if not pca_file.is_file():
            raise SystemExit(f"teacher {name}: PCA-whitening file not found: {pca_file}. Learn it with: python "
                             f"{pca_script} -t {name} --embed_dim {args.embed_dim} --path_to_pretrained_weights "
                             f"{root} (or download the published pca_weights/).")
    if len(set(args.teachers)) != len(args.teachers):
        raise SystemExit(f"-ts/--teachers lists a teacher twice: {args.teachers}")


# ----------------------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """(trainable module, bare student): DistillModel, SyncBatchNorm + DDP when distributed."""
    try:
        student = build_student(args.arch, embed_dim=args.embed_dim, gem_p=args.p,
                                pretrained=args.student_init == "imagenet")
    except (OSError, RuntimeError) as exc:  # offline ImageNet weights
        hint = "" if "--student_init" in str(exc) else " To train without ImageNet weights pass --student_init random."
        raise SystemExit(f"{exc}{hint}") from exc
    teachers = WhitenedTeachers(args.teachers, args.path_to_pretrained_weights, gem_p=args.p,
                                embed_dim=args.embed_dim, trust=args.trust_checkpoint)
    return wrap_distributed(DistillModel(student, teachers), ctx)


def wrap_distributed(model: DistillModel, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """Move to the device; when distributed: SyncBatchNorm (GPU) and DDP. Returns (module to call, bare student)."""
    if ctx.distributed and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # converts the student only (teachers are hidden)
    elif ctx.distributed:
        get_logger().warning("SyncBatchNorm runs on GPUs only: on CPU each of the %d processes normalises with "
                             "its own batch statistics", ctx.world_size)
    model = model.to(ctx.device)
    student = model.base_encoder
    if ctx.distributed:
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, student


def make_loader(data: TrainData, args: argparse.Namespace, ctx: DistContext) -> tuple[DataLoader, torch.Generator]:
    """The generator is re-seeded every epoch from (seed, epoch, rank): worker seeds, hence augmentations, are
    reproducible across a resume."""
    generator = torch.Generator()
    loader = DataLoader(data.dataset, batch_sampler=data.batch_sampler, num_workers=args.num_workers,
                        collate_fn=data.collate_fn, pin_memory=ctx.device.type == "cuda", generator=generator)
    return loader, generator


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


# ---------------------------------------------------------------------------------------------------- RNG states
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states in plain types (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """One entry per rank (every rank gets the list)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Trainer:
    """Everything a checkpoint holds, with the step and epoch loops."""

    args: argparse.Namespace
    ctx: DistContext
    model: nn.Module
    student: nn.Module
    data: TrainData
    loader: DataLoader
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: MultiTeacherDistillLoss
    scaler: torch.amp.GradScaler
    metrics: MetricsWriter
    iteration: int = 0

    def checkpoint(self, epoch: int) -> dict[str, Any] | None:
        """The paper's five entries + resume extras; gathered from every rank, returned on rank 0 only."""
        samplers = gather_objects(self.data.batch_sampler.state_dict(), self.ctx)
        rngs = gather_objects(rng_state(self.ctx.device), self.ctx)
        if not self.ctx.is_main:
            return None
        return {
            "epoch": epoch + 1,
            "state_dict": {k: v.detach().cpu() for k, v in student_checkpoint_state(self.student).items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "loss_fn": {"pos_win_count": self.loss_fn.pos_win_count.detach().cpu()},
            "sampler": samplers,
            "rng": rngs,
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "world_size": self.ctx.world_size,
            "args": to_plain(self.args),
        }

    def save(self, epoch: int) -> None:
        ckpt = self.checkpoint(epoch)
        if ckpt is not None:
            ckpt_dir = Path(self.args.ckpt_dir)
            save_atomic(ckpt, ckpt_dir / LAST_CHECKPOINT)
            if (epoch + 1) % self.args.snapshot_step == 0:
                save_atomic(ckpt, ckpt_dir / f"checkpoint_{epoch + 1}.pt")
        barrier()

    def resume(self, path: Path) -> int:
        """Restore everything from ``path``; returns the epoch (0-based) to start from."""
        logger = get_logger()
        ckpt = load_file(path, trust=self.args.trust_checkpoint, what="training checkpoint")
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "epoch" not in ckpt:
            raise SystemExit(f"-r/--resume {path}: not a training checkpoint (expected 'epoch' and 'state_dict')")
        saved = ckpt.get("args") or {}
        for key in ("arch", "teachers", "embed_dim"):
            if key in saved and saved[key] != to_plain(getattr(self.args, key)):
                raise SystemExit(f"-r/--resume {path} was trained with --{key} {saved[key]}, this run has "
                                 f"{getattr(self.args, key)}; use the same value or a fresh -c/--ckpt_dir")
        state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                 if k.startswith(CHECKPOINT_PREFIX)}
        load_state_strict(self.student, state, f"-r/--resume {path}", "the checkpoint belongs to another -a/"
                          "--embed_dim")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        t_max = self.args.epochs * len(self.loader)
        if self.scheduler.T_max != t_max:
            logger.warning("the cosine schedule was planned for %d iterations, now %d (--epochs or data changed)",
                           self.scheduler.T_max, t_max)
            self.scheduler.T_max = t_max
        self.loss_fn.pos_win_count.copy_(ckpt["loss_fn"]["pos_win_count"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt.get("iteration", 0))
        rank = self.ctx.rank
        if ckpt.get("world_size") == self.ctx.world_size and "sampler" in ckpt and "rng" in ckpt:
            self.data.batch_sampler.load_state_dict(ckpt["sampler"][rank])
            set_rng_state(ckpt["rng"][rank], self.ctx.device)
        else:
            logger.warning("checkpoint has no sampler/RNG state for world size %d: model, optimizer and schedule "
                           "resume exactly, the data order does not", self.ctx.world_size)
        logger.info("resumed from %s at epoch %d (iteration %d)", path, int(ckpt["epoch"]), self.iteration)
        self.metrics.write({"type": "resume", "epoch": int(ckpt["epoch"]), "iteration": self.iteration,
                            "checkpoint": str(path)})
        return int(ckpt["epoch"])

    # ------------------------------------------------------------------------------------------------- training
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        args, ctx = self.args, self.ctx
        self.model.train()
        self.data.batch_sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(args.seed, epoch, ctx.rank))
        n_iters = len(self.loader)
        log_every = args.log_every if args.log_every > 0 else max(1, n_iters // 16)
        epoch_meter, window_meter = Throughput(), Throughput()
        epoch_loss, window_loss, window_n = 0.0, 0.0, 0
        epoch_wins = self.loss_fn.pos_win_count.clone()
        window_wins = epoch_wins.clone()
        bar = progress(self.loader, enabled=ctx.is_main and not args.no_progress, total=n_iters,
                       desc=f"epoch {epoch + 1}/{args.epochs}", unit="it")
        for it, (x1, x2) in enumerate(bar):
            lr = self.scheduler.get_last_lr()[0]
            loss = self.step(x1.to(ctx.device, non_blocking=True), x2.to(ctx.device, non_blocking=True))
            value = float(loss) / ctx.world_size  # the loss is scaled by the world size for DDP's averaging
            if not math.isfinite(value):
                raise SystemExit(f"the loss became {value} at epoch {epoch + 1}, iteration {it + 1}: training "
                                 "diverged. Try a lower --lr, --amp none (or bf16 instead of fp16), and resume "
                                 f"from the last good checkpoint with -r {Path(args.ckpt_dir) / LAST_CHECKPOINT}.")
            n_images = 2 * x1.shape[0] * ctx.world_size
            epoch_meter.update(n_images)
            window_meter.update(n_images)
            epoch_loss += value
            window_loss += value
            window_n += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{window_meter.rate:.1f}")
            if (it + 1) % log_every == 0 or it + 1 == n_iters:
                record = {"type": "iter", "epoch": epoch + 1, "iter": it + 1, "iteration": self.iteration,
                          "loss": window_loss / window_n, "lr": lr, "images_per_s": window_meter.rate,
                          "pos_win_share": self.win_shares(window_wins)}
                self.metrics.write(record)
                get_logger().info("epoch %d iter %d/%d loss %.5f lr %.3e %.1f img/s wins %s", epoch + 1, it + 1,
                                  n_iters, record["loss"], lr, record["images_per_s"], record["pos_win_share"])
                window_loss, window_n = 0.0, 0
                window_wins = self.loss_fn.pos_win_count.clone()
                window_meter.reset()
        return {"type": "epoch", "epoch": epoch + 1, "iteration": self.iteration, "loss": epoch_loss / n_iters,
                "lr": self.scheduler.get_last_lr()[0], "images_per_s": epoch_meter.rate,
                "pos_win_share": self.win_shares(epoch_wins)}

    def step(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        loss = distill_step(self.model, self.loss_fn, self.optimizer, self.scaler, x1, x2, self.args.amp,
                            self.ctx.device)
        self.scheduler.step()
        self.iteration += 1
        return loss

    def win_shares(self, since: torch.Tensor) -> dict[str, float] | None:
        """Per-teacher share of positive wins since ``since`` (None for strategies that do not count)."""
        delta = (self.loss_fn.pos_win_count - since).tolist()
        total = sum(delta)
        if total == 0:
            return None
        return {name: c / total for name, c in zip(self.loss_fn.teachers, delta)}


def distill_step(model: nn.Module, loss_fn: MultiTeacherDistillLoss, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, x1: torch.Tensor, x2: torch.Tensor, amp: str,
                 device: torch.device) -> torch.Tensor:
    """One optimisation step on a batch of pairs (forward under ``--amp``, loss in float32); the detached loss."""
    with autocast(amp, device):
        s1, s2, t1, t2 = model(x1, x2)
    loss = sum(loss_fn(s1.float(), s2.float(), [t.float() for t in t1], [t.float() for t in t2]).values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def resolve_resume(args: argparse.Namespace) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.ckpt_dir) / LAST_CHECKPOINT
        if not path.is_file():
            get_logger().info("-r auto: no %s yet, starting from scratch", path)
            return None
        return path
    path = Path(args.resume)
    if not path.is_file():
        raise SystemExit(f"-r/--resume: checkpoint file not found: {path} (use -r auto to resume from "
                         f"{Path(args.ckpt_dir) / LAST_CHECKPOINT} when it exists)")
    return path


def run_distillation(args: argparse.Namespace, ctx: DistContext,
                     build_data: Callable[[argparse.Namespace, DistContext], TrainData]) -> Trainer:
    """Train on every rank (called from the script's ``main_worker``); returns the trainer (tests inspect it)."""
    ckpt_dir = Path(args.ckpt_dir)
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        dump_args(args, ckpt_dir / "config.yaml")
        for stale in ckpt_dir.glob(".checkpoint_*.tmp"):  # left by a run killed while saving
            stale.unlink()
    logger = setup_logging(ctx.is_main, ckpt_dir / "log.log")
    log_run_header(logger, args)
    logger.info("world size %d, device %s", ctx.world_size, ctx.device)
    seed_everything(args.seed)  # identical initialisation on every rank
    data = build_data(args, ctx)
    loader, generator = make_loader(data, args, ctx)
    model, student = build_model(args, ctx)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    logger.info("student %s: %d trainable parameters; teachers %s", args.arch, n_train, args.teachers)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_iters = len(loader)
    logger.info("%d iterations per epoch, %d pairs per iteration over %d process(es)", n_iters,
                args.batch_size * ctx.world_size, ctx.world_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * n_iters, eta_min=1e-6)
    loss_fn = MultiTeacherDistillLoss(st=args.st, tt=args.tt, strategy=args.strategy,
                                      teachers=args.teachers).to(ctx.device)
    check_amp(args.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
    trainer = Trainer(args, ctx, model, student, data, loader, generator, optimizer, scheduler, loss_fn, scaler,
                      MetricsWriter(ckpt_dir / "metrics.jsonl" if ctx.is_main else None))
    seed_everything(args.seed + ctx.rank)  # per-rank stream for in-process augmentation and random strategies
    start_epoch = args.start_epoch
    resume_path = resolve_resume(args)
    if resume_path is not None:
        start_epoch = trainer.resume(resume_path)
    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        record = trainer.train_epoch(epoch)
        record["seconds"] = time.perf_counter() - start
        trainer.save(epoch)
        trainer.metrics.write(record)
        logger.info("epoch %d/%d done: loss %.5f, %.1f img/s, %.0f s, wins %s", epoch + 1, args.epochs,
                    record["loss"], record["images_per_s"], record["seconds"], record["pos_win_share"])
    return trainer
