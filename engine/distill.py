"""Distillation training, shared by gld_distill.py and svd_distill.py.

A script parses its flags (``engine.cli.add_distill_args`` + its own data and temperature flags), then calls
``run_distillation(args, ctx, build_data)`` on every rank; ``build_data(args, ctx)`` returns a ``TrainData``
whose loader yields ``(x1, x2)``: two views of the same items, the positives of the loss.

As the paper: the student and the frozen whitened teachers, Adam over the student only, CosineAnnealingLR to
1e-6 stepped every iteration, the multi-teacher similarity KL loss, checkpoints with ``epoch``/``state_dict``/
``optimizer``/``lr_scheduler``/``loss_fn``. Added: CPU and any world size, SyncBatchNorm and DDP only when
distributed, AMP, a stop on a NaN loss, metrics.jsonl, atomic checkpoints and exact resume (sampler, RNG and scaler
states; ``engine.resume`` says what a resume may change).
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engine.cli import check_weight_files
from engine.resume import adjust_to_flags, check_run_dir, newest_checkpoint, prepare_run_dir, read_training_checkpoint
from models.distill_model import DistillationLoss, DistillModel, WhitenedTeachers
from models.loss import MultiTeacherDistillLoss
from models.students import CHECKPOINT_PREFIX, build_student, student_checkpoint_state
from utils.checkpoint import CheckpointError, load_state_strict, save_atomic
from utils.config import to_plain
from utils.distributed import DistContext, barrier, broadcast_object, gather_objects
from utils.log import MetricsWriter, Throughput, get_logger, log_run_header, progress, setup_logging
from utils.run_dir import LAST_CHECKPOINT, LOG_FILE, METRICS_FILE, snapshot_name
from utils.runtime import autocast, check_amp, rng_state, seed_everything, set_rng_state


@dataclass
class TrainData:
    """What a script supplies: the dataset, a batch sampler with ``set_epoch``/``state_dict``/``load_state_dict``,
    a collate function producing ``(x1, x2)``, and a fingerprint of the training list (names and order), by which a
    resumed run notices that its data changed."""

    dataset: Dataset
    batch_sampler: Any
    collate_fn: Callable | None = None
    fingerprint: str = ""


def preflight(args: argparse.Namespace, pca_script: str) -> None:
    """Everything a training run checks before it starts (``launch`` runs it in the launching process)."""
    check_weight_files(args, pca_script)
    check_run_dir(args)


# ----------------------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, ctx: DistContext
                ) -> tuple[nn.Module, nn.Module, DistillationLoss]:
    """(module to call, bare student, criterion with the frozen teachers), on ``ctx.device``."""
    try:
        student = build_student(args.arch, embed_dim=args.embed_dim, gem_p=args.p,
                                pretrained=args.student_init == "imagenet")
    except (OSError, RuntimeError) as exc:  # offline ImageNet weights
        hint = "" if "--student_init" in str(exc) else " To train without ImageNet weights pass --student_init random."
        raise SystemExit(f"{exc}{hint}") from exc
    teachers = WhitenedTeachers(args.teachers, args.path_to_pretrained_weights, gem_p=args.p,
                                embed_dim=args.embed_dim, trust=args.trust_checkpoint)
    loss = MultiTeacherDistillLoss(st=args.st, tt=args.tt, strategy=args.strategy, teachers=args.teachers)
    criterion = DistillationLoss(teachers, loss, student_dim=args.embed_dim).to(ctx.device)
    model, student = wrap_distributed(DistillModel(student), ctx)
    return model, student, criterion


def wrap_distributed(model: DistillModel, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """Move to the device; when distributed: SyncBatchNorm (GPU) and DDP. Returns (module to call, bare student)."""
    if ctx.distributed and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
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


def distill_step(model: nn.Module, criterion: DistillationLoss, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, x1: torch.Tensor, x2: torch.Tensor, amp: str,
                 device: torch.device) -> torch.Tensor:
    """One optimisation step on a batch of pairs (forwards under ``--amp``, the loss in float32); the detached
    loss."""
    with autocast(amp, device):
        s1, s2 = model(x1, x2)
        loss = sum(criterion(x1, x2, s1.float(), s2.float()).values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# --------------------------------------------------------------------------------------------------- the trainer
@dataclass
class Trainer:
    """Everything a checkpoint holds, with the step and epoch loops."""

    args: argparse.Namespace
    ctx: DistContext
    model: nn.Module
    student: nn.Module
    criterion: DistillationLoss
    data: TrainData
    loader: DataLoader
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    metrics: MetricsWriter
    iteration: int = 0

    @property
    def pos_win_count(self) -> torch.Tensor:
        return self.criterion.loss.pos_win_count

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
            "loss_fn": {"pos_win_count": self.pos_win_count.detach().cpu()},
            "sampler": samplers,
            "rng": rngs,
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "iters_per_epoch": len(self.loader),
            "world_size": self.ctx.world_size,
            "data_fingerprint": self.data.fingerprint,
            "args": to_plain(self.args),
        }

    def save(self, epoch: int) -> None:
        """The snapshot first, then checkpoint_last.pt: a kill between the two leaves the newest state in the
        snapshot, which ``-r auto`` picks."""
        ckpt = self.checkpoint(epoch)
        if ckpt is not None:
            ckpt_dir = Path(self.args.ckpt_dir)
            if (epoch + 1) % self.args.snapshot_step == 0:
                save_atomic(ckpt, ckpt_dir / snapshot_name(epoch + 1))
            save_atomic(ckpt, ckpt_dir / LAST_CHECKPOINT)
        barrier()

    def resume(self, ckpt: dict[str, Any], path: Path) -> int:
        """Restore everything from ``ckpt`` (read from ``path``); returns the epoch (0-based) to start from."""
        logger = get_logger()
        state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                 if k.startswith(CHECKPOINT_PREFIX)}
        load_state_strict(self.student, state, f"-r/--resume {path}", "the checkpoint belongs to another -a/"
                          "--embed_dim")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["lr_scheduler"])
            self.pos_win_count.copy_(ckpt["loss_fn"]["pos_win_count"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"-r/--resume {path}: its optimizer/scheduler/loss state does not fit this run "
                                  f"({exc}); it belongs to another -a/-ts") from None
        saved = ckpt.get("args") or {}
        epoch = int(ckpt["epoch"])
        if ckpt.get("scaler") and saved.get("amp", self.args.amp) == self.args.amp:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt.get("iteration", 0))
        if ckpt.get("world_size") == self.ctx.world_size and "sampler" in ckpt and "rng" in ckpt:
            self.data.batch_sampler.load_state_dict(ckpt["sampler"][self.ctx.rank])
            set_rng_state(ckpt["rng"][self.ctx.rank], self.ctx.device)
        notes = adjust_to_flags(self.args, ckpt, self.optimizer, self.scheduler, len(self.loader),
                                self.ctx.world_size, self.data.fingerprint)
        for note in notes:
            logger.warning("resume: %s", note)
        logger.info("resumed from %s at epoch %d (iteration %d)", path, epoch, self.iteration)
        self.metrics.write({"type": "resume", "epoch": epoch, "iteration": self.iteration, "checkpoint": str(path)})
        if self.ctx.is_main and epoch % self.args.snapshot_step == 0:
            snapshot = Path(self.args.ckpt_dir) / snapshot_name(epoch)
            if not snapshot.exists():  # killed before it was written (older runs wrote it after checkpoint_last)
                save_atomic(ckpt, snapshot)
                logger.info("wrote the missing snapshot %s", snapshot)
        return epoch

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        args, ctx = self.args, self.ctx
        self.model.train()
        self.data.batch_sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(args.seed, epoch, ctx.rank))
        n_iters = len(self.loader)
        log_every = args.log_every if args.log_every > 0 else max(1, n_iters // 16)
        epoch_meter, window_meter = Throughput(), Throughput()
        epoch_loss, window_loss, window_n = 0.0, 0.0, 0
        epoch_wins = self.pos_win_count.clone()
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
                          "pos_win_share": self.pos_win_shares_since(window_wins)}
                self.metrics.write(record)
                get_logger().info("epoch %d iter %d/%d loss %.5f lr %.3e %.1f img/s wins %s", epoch + 1, it + 1,
                                  n_iters, record["loss"], lr, record["images_per_s"], record["pos_win_share"])
                window_loss, window_n = 0.0, 0
                window_wins = self.pos_win_count.clone()
                window_meter.reset()
        return {"type": "epoch", "epoch": epoch + 1, "iteration": self.iteration, "loss": epoch_loss / n_iters,
                "lr": self.scheduler.get_last_lr()[0], "images_per_s": epoch_meter.rate,
                "pos_win_share": self.pos_win_shares_since(epoch_wins)}

    def step(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        loss = distill_step(self.model, self.criterion, self.optimizer, self.scaler, x1, x2, self.args.amp,
                            self.ctx.device)
        self.scheduler.step()
        self.iteration += 1
        return loss

    def pos_win_shares_since(self, counts: torch.Tensor) -> dict[str, float] | None:
        """Each teacher's share of the positive wins since the counts were ``counts`` (None for the strategies
        that do not count: mean, rand)."""
        delta = (self.pos_win_count - counts).tolist()
        total = sum(delta)
        if total == 0:
            return None
        return {name: c / total for name, c in zip(self.criterion.loss.teachers, delta)}


def tail_note(sampler: Any) -> str:
    """Says when the sampler's last batch holds one pair more (a single leftover pair joins it)."""
    bounds = sampler.batch_bounds() if hasattr(sampler, "batch_bounds") else []
    if bounds and bounds[-1][1] - bounds[-1][0] > sampler.batch_size:
        return f" (the last holds {bounds[-1][1] - bounds[-1][0]} per process: a single leftover pair joins it)"
    return ""


def run_distillation(args: argparse.Namespace, ctx: DistContext,
                     build_data: Callable[[argparse.Namespace, DistContext], TrainData]) -> Trainer:
    """Train on every rank (called from the script's ``main_worker``); returns the trainer (tests inspect it)."""
    ckpt_dir = Path(args.ckpt_dir)
    resume_from = broadcast_object(newest_checkpoint(args) if ctx.is_main else None)  # rank 0 decides for all
    ckpt = read_training_checkpoint(resume_from, args.trust_checkpoint) if resume_from is not None else None
    notes = prepare_run_dir(args, ckpt, resume_from) if ctx.is_main else []
    barrier()
    logger = setup_logging(ctx.is_main, ckpt_dir / LOG_FILE)
    log_run_header(logger, args)
    for note in notes:
        logger.info(note)
    if args.resume == "auto" and resume_from is None:
        logger.info("-r auto: no checkpoint in %s yet, starting from scratch", ckpt_dir)
    logger.info("world size %d, device %s", ctx.world_size, ctx.device)
    seed_everything(args.seed)  # identical initialisation on every rank
    data = build_data(args, ctx)
    loader, generator = make_loader(data, args, ctx)
    check_amp(args.amp, ctx.device)
    model, student, criterion = build_model(args, ctx)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    logger.info("student %s: %d trainable parameters; teachers %s", args.arch, n_train, args.teachers)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_iters = len(loader)
    logger.info("%d iterations per epoch, %d pairs per iteration over %d process(es)%s", n_iters,
                args.batch_size * ctx.world_size, ctx.world_size, tail_note(data.batch_sampler))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * n_iters, eta_min=1e-6)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
    trainer = Trainer(args, ctx, model, student, criterion, data, loader, generator, optimizer, scheduler, scaler,
                      MetricsWriter(ckpt_dir / METRICS_FILE if ctx.is_main else None))
    seed_everything(args.seed + ctx.rank)  # per-rank stream for in-process augmentation and random strategies
    start_epoch = args.start_epoch
    if ckpt is not None:
        start_epoch = trainer.resume(ckpt, resume_from)
    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        record = trainer.train_epoch(epoch)
        record["seconds"] = time.perf_counter() - start
        trainer.save(epoch)
        trainer.metrics.write(record)
        logger.info("epoch %d/%d done: loss %.5f, %.1f img/s, %.0f s, wins %s", epoch + 1, args.epochs,
                    record["loss"], record["images_per_s"], record["seconds"], record["pos_win_share"])
    return trainer
