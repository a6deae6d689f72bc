"""Distillation training, shared by gld_distill.py and svd_distill.py.

``train(params, ctx)`` runs on every rank (``engine.run`` starts the ranks): ``params`` are a dataset's
``engine.params.TrainParams``, whose ``dataset_name`` picks the data (``engine.training_data``); its loader yields
``(x1, x2)``: two views of the same items, the positives of the loss. ``preflight(params)`` checks the data, the
weight files and the run folder before any rank starts.

As the paper: the student and the frozen whitened teachers, Adam over the student only, CosineAnnealingLR to
1e-6 stepped every iteration, the multi-teacher similarity KL loss, checkpoints with ``epoch``/``state_dict``/
``optimizer``/``lr_scheduler``/``loss_fn``. Added: CPU and any world size, SyncBatchNorm and DDP only when
distributed, AMP, a stop on a NaN loss, metrics.jsonl, atomic checkpoints and exact resume (sampler, RNG and scaler
states; ``engine.resume`` says what a resume may change).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets.sampler import SeededBatches, SeededItems
from engine.params import TrainParams
from engine.resume import (
    adjust_to_flags,
    check_run_dir,
    newest_checkpoint,
    prepare_run_dir,
    read_training_checkpoint,
    settle_run_dir,
)
from engine.teacher_cache import CachedItems, TeacherCache
from engine.training_data import TRAINING_DATA, TrainData
from models.distill_model import DistillationLoss, DistillModel, WhitenedTeachers
from models.loss import MultiTeacherDistillLoss
from models.pca_layer import load_teacher_pca, pca_weight_path
from models.students import CHECKPOINT_PREFIX, build_student, student_checkpoint_state
from models.teachers import check_teacher_file, descriptor_dim
from utils.checkpoint import CheckpointError, load_state_strict, save_atomic
from utils.config import to_plain
from utils.distributed import DistContext, barrier, broadcast_object, gather_objects
from utils.errors import UsageError, UserError
from utils.files import sha256_file
from utils.locks import lock_for_job
from utils.log import FILE_ONLY, MetricsWriter, Throughput, get_logger, log_run_header, setup_logging
from utils.log import progress as progress_bar
from utils.preemption import StopRequest, ignore_stop_signals, interrupted
from utils.run_dir import LAST_CHECKPOINT, LOG_FILE, METRICS_FILE, TENSORBOARD_DIR, snapshot_name
from utils.runtime import autocast, configure_backends, rng_state, seed_everything, set_rng_state

PREFETCH_BATCHES = 4  # per loader worker: enough to ride out a slow JPEG decode without holding much memory


def preflight(params: TrainParams) -> None:
    """Everything a training run checks before it starts, in the launching process: the training data, the weight
    files (their SHA-256 recorded in ``params.weight_sha256``), the run folder and a resume's compatibility."""
    TRAINING_DATA[params.dataset_name][0](params)
    params.weight_sha256 = check_weight_files(params)
    check_run_dir(params)


def check_weight_files(params: TrainParams) -> dict[str, str]:
    """Every teacher file exists and looks like a checkpoint; every PCA file exists and whitens its teacher's
    descriptor to --embed_dim. Returns the files' SHA-256 by path under --path_to_pretrained_weights: a resumed run
    and a teacher cache must use the same bytes."""
    root = Path(params.path_to_pretrained_weights)
    digests = {}
    naming = {"data": params.dataset_name, "pool": params.teacher_pool, "gem_p": params.p}
    for name in params.teachers:
        teacher_file = check_teacher_file(name, root, trust=params.trust_checkpoint)
        load_teacher_pca(root, name, params.embed_dim, trust=params.trust_checkpoint,
                         in_dim=descriptor_dim(name, params.teacher_pool), **naming)
        for path in (teacher_file, pca_weight_path(root, name, params.embed_dim, **naming)):
            digests[str(path.relative_to(root))] = sha256_file(path)
    return digests


# ----------------------------------------------------------------------------------------------------------- model
def build_teachers(params: TrainParams) -> WhitenedTeachers:
    return WhitenedTeachers(params.teachers, params.path_to_pretrained_weights, gem_p=params.p,
                            embed_dim=params.embed_dim, trust=params.trust_checkpoint, pool=params.teacher_pool,
                            pca_data=params.dataset_name)


def build_model(params: TrainParams, ctx: DistContext, with_teachers: bool = True
                ) -> tuple[nn.Module, nn.Module, DistillationLoss]:
    """(module to call, bare student, criterion with the frozen teachers), on ``ctx.device``; training from a
    teacher cache builds no teacher."""
    try:
        student = build_student(params.arch, embed_dim=params.embed_dim, gem_p=params.p,
                                pretrained=params.student_init == "imagenet")
    except (OSError, RuntimeError) as exc:  # offline ImageNet weights
        hint = "" if "--student_init" in str(exc) else " To train without ImageNet weights pass --student_init random."
        raise UserError(f"{exc}{hint}") from exc
    loss = MultiTeacherDistillLoss(st=params.st, tt=params.tt, strategy=params.strategy, teachers=params.teachers,
                                   ctx=ctx)
    teachers = build_teachers(params) if with_teachers else None
    criterion = DistillationLoss(teachers, loss, student_dim=params.embed_dim).to(ctx.device)
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


def make_loader(data: TrainData, params: TrainParams, ctx: DistContext) -> tuple[DataLoader, SeededBatches]:
    """Every item is loaded with its own seed (``SeededBatches``): the augmentations do not depend on the number of
    workers and a run resumed in the middle of an epoch sees exactly the rest of it. Workers leave SIGTERM/SIGUSR1
    to the training process, which saves before it stops. The workers live as long as the run (the paper's schedule
    is 3,000 epochs of about 158 iterations: forking 8 workers per GPU every epoch would cost more than an
    iteration each time) and keep ``PREFETCH_BATCHES`` batches ready each; batches go to pinned memory for
    asynchronous copies to the GPU."""
    batches = SeededBatches(data.batch_sampler, params.seed)
    workers = params.num_workers > 0
    # The loader draws a base seed; from its own generator, not the global one, so that the random fusion
    # strategies' stream does not depend on where a run was resumed.
    loader = DataLoader(SeededItems(data.dataset), batch_sampler=batches, num_workers=params.num_workers,
                        collate_fn=data.collate_fn, pin_memory=ctx.device.type == "cuda",
                        persistent_workers=workers, prefetch_factor=PREFETCH_BATCHES if workers else None,
                        worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(params.seed))
    return loader, batches


def distill_step(model: nn.Module, criterion: DistillationLoss, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, x1: torch.Tensor, x2: torch.Tensor, amp: str,
                 device: torch.device, cached: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
                 ) -> torch.Tensor:
    """One optimisation step on a batch of pairs (forwards under ``--amp``, the loss in float32); the detached
    loss. ``cached``: the teachers' embeddings of both views, from a teacher cache."""
    with autocast(amp, device):
        s1, s2 = model(x1, x2)
        loss = sum(criterion(x1, x2, s1.float(), s2.float(), cached).values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# --------------------------------------------------------------------------------------------------- the trainer
@dataclass
class EpochProgress:
    """What a checkpoint written in the middle of an epoch keeps of it: where the epoch stopped, the epoch's loss
    so far and the win counts at its start (the epoch's metrics record continues from them)."""

    iteration: int = 0
    loss_sum: float = 0.0
    wins_at_start: list[int] | None = None


@dataclass
class Trainer:
    """Everything a checkpoint holds, with the step and epoch loops."""

    params: TrainParams
    ctx: DistContext
    model: nn.Module
    student: nn.Module
    criterion: DistillationLoss
    data: TrainData
    loader: DataLoader
    batches: SeededBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    metrics: MetricsWriter
    iteration: int = 0
    stop: StopRequest | None = None

    @property
    def pos_win_count(self) -> torch.Tensor:
        return self.criterion.loss.pos_win_count

    def checkpoint(self, epoch: int, progress: EpochProgress | None = None) -> dict[str, Any] | None:
        """The paper's five entries + resume extras; gathered from every rank, returned on rank 0 only.

        At the end of epoch ``epoch`` (0-based) it says ``epoch + 1`` epochs are complete. In the middle of it, it says
        ``epoch`` epochs are complete and ``epoch_iteration`` iterations of the next, and keeps the samplers' states
        of that epoch's start (a resumed run draws the epoch again and skips what was done)."""
        mid_epoch = progress is not None and progress.iteration > 0
        sampler = self.batches.epoch_start_state if mid_epoch else self.batches.state_dict()
        samplers = gather_objects(sampler, self.ctx)
        rngs = gather_objects(rng_state(self.ctx.device), self.ctx)
        if not self.ctx.is_main:
            return None
        return {
            "epoch": epoch if mid_epoch else epoch + 1,
            "state_dict": {k: v.detach().cpu() for k, v in student_checkpoint_state(self.student).items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "loss_fn": {"pos_win_count": self.pos_win_count.detach().cpu()},
            "sampler": samplers,
            "rng": rngs,
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch_iteration": progress.iteration if mid_epoch else 0,
            "epoch_progress": to_plain(vars(progress)) if mid_epoch else None,
            "iters_per_epoch": len(self.loader),
            "world_size": self.ctx.world_size,
            "data_fingerprint": self.data.fingerprint,
            "args": to_plain(vars(self.params)),  # every flag, as the paper's
        }

    def save(self, epoch: int, progress: EpochProgress | None = None) -> None:
        """At an epoch's end the snapshot first, then checkpoint_last.pt: a kill between the two leaves the newest
        state in the snapshot, which ``-r auto`` picks. In the middle of an epoch, checkpoint_last.pt only."""
        ckpt = self.checkpoint(epoch, progress)
        if ckpt is not None:
            ckpt_dir = Path(self.params.ckpt_dir)
            if ckpt["epoch_iteration"] == 0 and (epoch + 1) % self.params.snapshot_step == 0:
                save_atomic(ckpt, ckpt_dir / snapshot_name(epoch + 1))
            save_atomic(ckpt, ckpt_dir / LAST_CHECKPOINT)
        barrier()

    def saves_after(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (0-based) writes checkpoint_last.pt when no stop was requested: every
        ``--save_every`` epochs, at each snapshot and at the last epoch."""
        done = epoch + 1
        return done % self.params.save_every == 0 or done % self.params.snapshot_step == 0 or done == self.params.epochs

    def resume(self, ckpt: dict[str, Any], path: Path) -> tuple[int, EpochProgress]:
        """Restore everything from ``ckpt`` (read from ``path``); returns the epoch (0-based) to start from and where
        in it (``EpochProgress.iteration`` > 0 for a checkpoint written in the middle of an epoch)."""
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
        progress = EpochProgress(**ckpt["epoch_progress"]) if ckpt.get("epoch_iteration") else EpochProgress()
        if progress.iteration:
            same = (ckpt.get("world_size") == self.ctx.world_size and saved.get("batch_size") == self.params.batch_size
                    and ckpt.get("data_fingerprint") == self.data.fingerprint)
            if not same:
                raise CheckpointError(f"-r/--resume {path} was written in the middle of epoch {epoch + 1}: it resumes "
                                      "with the same -b, number of processes and training list only (resume from an "
                                      "epoch-end snapshot to change them)")
        if ckpt.get("scaler") and saved.get("amp", self.params.amp) == self.params.amp:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt.get("iteration", 0))
        if ckpt.get("world_size") == self.ctx.world_size and "sampler" in ckpt and "rng" in ckpt:
            self.batches.load_state_dict(ckpt["sampler"][self.ctx.rank])
            set_rng_state(ckpt["rng"][self.ctx.rank], self.ctx.device)
        notes = adjust_to_flags(self.params, ckpt, self.optimizer, self.scheduler, len(self.loader),
                                self.ctx.world_size, self.data.fingerprint)
        for note in notes:
            logger.warning("resume: %s", note)
        where = f", iteration {progress.iteration} of epoch {epoch + 1}" if progress.iteration else ""
        logger.info("resumed from %s at epoch %d%s (iteration %d)", path, epoch, where, self.iteration)
        if self.ctx.is_main and not progress.iteration and epoch % self.params.snapshot_step == 0:
            snapshot = Path(self.params.ckpt_dir) / snapshot_name(epoch)
            if not snapshot.exists():  # killed before it was written (older runs wrote it after checkpoint_last)
                save_atomic(ckpt, snapshot)
                logger.info("wrote the missing snapshot %s", snapshot)
        return epoch, progress

    def train_epoch(self, epoch: int, progress: EpochProgress | None = None) -> dict[str, Any]:
        """One epoch, from ``progress.iteration`` (a resumed epoch); stops after any iteration at which a stop was
        requested, having saved checkpoint_last.pt (``Stopped``)."""
        progress = progress or EpochProgress()
        self.model.train()
        self.batches.set_epoch(epoch, skip=progress.iteration)
        n_iters = len(self.loader)
        batches = iter(self.loader)  # with persistent workers: the same workers, told the new epoch's batches
        try:
            return self._run_epoch(epoch, progress, batches, n_iters)
        except BaseException:
            self.stop_workers()
            raise

    def stop_workers(self) -> None:
        """End the loader's worker processes. They ignore SIGTERM (the training process handles it), and persistent
        workers outlive an epoch: a stop, an error, Ctrl-C or the run's end must tell them, or the exit waits."""
        batches = getattr(self.loader, "_iterator", None)
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _run_epoch(self, epoch: int, progress: EpochProgress, batches: Any, n_iters: int) -> dict[str, Any]:
        params, ctx = self.params, self.ctx
        log_every = params.log_every or max(1, n_iters // 16)
        shown = {} if params.log_every is not None else FILE_ONLY  # iteration lines on the console when asked
        epoch_meter, window_meter = Throughput(), Throughput()
        window_loss, window_n = 0.0, 0
        if progress.wins_at_start is None:
            progress.wins_at_start = self.pos_win_count.tolist()
        window_wins = self.pos_win_count.tolist()
        bar = progress_bar(batches, enabled=ctx.is_main and not params.no_progress,
                           total=n_iters - progress.iteration, desc=f"epoch {epoch + 1}/{params.epochs}", unit="it")
        for it, (x1, x2, *cached) in enumerate(bar, start=progress.iteration):
            lr = self.scheduler.get_last_lr()[0]
            to = lambda t: t.to(ctx.device, non_blocking=True)  # noqa: E731
            loss = self.step(to(x1), to(x2), ([to(t) for t in cached[0]], [to(t) for t in cached[1]])
                             if cached else None)
            interrupted()  # a Ctrl-C swallowed by a finaliser during the step still stops here
            value = float(loss) / ctx.world_size  # the loss is scaled by the world size for DDP's averaging
            if not math.isfinite(value):
                last = Path(params.ckpt_dir) / LAST_CHECKPOINT
                where = (f"resume from the last good checkpoint with -r {last}" if last.is_file() else
                         "no checkpoint was written yet: check the inputs (teacher and PCA files) first")
                raise UserError(f"the loss became {value} at epoch {epoch + 1}, iteration {it + 1}: training "
                                f"diverged, or an input holds NaN. Try a lower --lr, --amp none (or bf16 instead of "
                                f"fp16); {where}.")
            n_images = 2 * x1.shape[0] * ctx.world_size
            epoch_meter.update(n_images)
            window_meter.update(n_images)
            progress.loss_sum += value
            progress.iteration = it + 1
            window_loss += value
            window_n += 1
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{window_meter.rate:.1f}", refresh=False)
            if (it + 1) % log_every == 0 or it + 1 == n_iters:
                record = {"type": "iter", "epoch": epoch + 1, "iter": it + 1, "iteration": self.iteration,
                          "loss": window_loss / window_n, "lr": lr, "images_per_s": window_meter.rate,
                          "pos_win_share": self.pos_win_shares_since(window_wins)}
                self.metrics.write(record)
                get_logger().info("epoch %d iter %d/%d loss %.5f lr %.3e %.1f img/s wins %s", epoch + 1, it + 1,
                                  n_iters, record["loss"], lr, record["images_per_s"], record["pos_win_share"],
                                  extra=shown)
                window_loss, window_n = 0.0, 0
                window_wins = self.pos_win_count.tolist()
                window_meter.reset()
            if it + 1 < n_iters and self.stop is not None and self.stop.agreed(ctx):
                self.save(epoch, progress)
                raise Stopped(epoch, it + 1)
        return {"type": "epoch", "epoch": epoch + 1, "iteration": self.iteration,
                "loss": progress.loss_sum / n_iters, "lr": self.scheduler.get_last_lr()[0],
                "images_per_s": epoch_meter.rate,
                "pos_win_share": self.pos_win_shares_since(progress.wins_at_start)}

    def step(self, x1: torch.Tensor, x2: torch.Tensor,
             cached: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        loss = distill_step(self.model, self.criterion, self.optimizer, self.scaler, x1, x2, self.params.amp,
                            self.ctx.device, cached)
        self.scheduler.step()
        self.iteration += 1
        return loss

    def pos_win_shares_since(self, counts: list[int]) -> dict[str, float] | None:
        """Each teacher's share of the positive wins since the counts were ``counts`` (None for the strategies
        that do not count: mean, rand). On the host: the counts live on the device, ``counts`` are Python ints."""
        delta = [now - before for now, before in zip(self.pos_win_count.tolist(), counts)]
        total = sum(delta)
        if total == 0:
            return None
        return {name: c / total for name, c in zip(self.criterion.loss.teachers, delta)}


def from_teacher_cache(data: TrainData, params: TrainParams, ctx: DistContext) -> TrainData:
    """The training items read from the teacher cache, which the first run that names it builds (with the
    teachers, which are then dropped)."""
    if data.load_item is None or not data.views or data.cached_collate is None:
        raise UsageError("--teacher_cache: this script's training data does not support a teacher cache")
    n_items = len(data.dataset)
    cache = TeacherCache(params, n_items, data.fingerprint, data.load_item, data.views)
    if not broadcast_object(cache.complete if ctx.is_main else None):  # one decision for all ranks
        with StopRequest() as stop:  # a build takes hours: a cluster's stop keeps the finished shards
            get_logger().info("teacher cache %s: building %d view(s) of %d items", params.teacher_cache,
                              params.teacher_views, n_items)
            state = rng_state(ctx.device)  # the build leaves the RNGs as it found them: the student starts the same
            teachers = build_teachers(params).to(ctx.device)
            cache.build(teachers, ctx, stop)
            if stop.agreed(ctx):
                get_logger().warning("stopped on signal %s while building the teacher cache %s: its finished shards "
                                     "are kept; the same command (with -r auto) continues it", stop.received,
                                     params.teacher_cache)
                stop.exit_preempted()
        del teachers
        set_rng_state(state, ctx.device)
    else:
        get_logger().info("teacher cache %s: reading %d view(s) of %d items (no teacher runs)", params.teacher_cache,
                          params.teacher_views, n_items)
    return replace(data, dataset=CachedItems(cache), collate_fn=data.cached_collate)


class Stopped(Exception):
    """Training stopped on request (SIGTERM/SIGUSR1) after saving checkpoint_last.pt."""

    def __init__(self, epoch: int, iteration: int) -> None:
        super().__init__(f"epoch {epoch + 1}, iteration {iteration}")
        self.epoch, self.iteration = epoch, iteration


def tail_note(sampler: Any) -> str:
    """Says when the sampler's last batch holds one pair more (a single leftover pair joins it)."""
    bounds = sampler.batch_bounds() if hasattr(sampler, "batch_bounds") else []
    if bounds and bounds[-1][1] - bounds[-1][0] > sampler.batch_size:
        return f" (the last holds {bounds[-1][1] - bounds[-1][0]} per process: a single leftover pair joins it)"
    return ""


def train(params: TrainParams, ctx: DistContext) -> Trainer:
    """Train on every rank; returns the trainer (tests inspect it).

    SIGTERM/SIGUSR1 stop every rank after the same iteration: checkpoint_last.pt is written (in the middle of the
    epoch), a handler installed before (submitit's requeue) runs, and the processes exit with ``EXIT_PREEMPTED``;
    ``-r auto`` resumes at the next iteration."""
    ckpt_dir = Path(params.ckpt_dir)
    run_lock = lock_for_job(ckpt_dir, "the run folder -c/--ckpt_dir", ctx.is_main)  # one job writes a run
    try:
        return _train(params, ctx)
    finally:
        if run_lock is not None:
            run_lock.release()


def _train(params: TrainParams, ctx: DistContext) -> Trainer:
    ckpt_dir = Path(params.ckpt_dir)
    resume_from = broadcast_object(newest_checkpoint(params) if ctx.is_main else None)  # rank 0 decides for all
    ckpt = read_training_checkpoint(resume_from, params.trust_checkpoint) if resume_from is not None else None
    notes = prepare_run_dir(params, ckpt, resume_from) if ctx.is_main else []
    barrier()
    logger = setup_logging(ctx.is_main, ckpt_dir / LOG_FILE)
    log_run_header(logger, params, ctx.launch)
    for note in notes:
        logger.info(note)
    if params.resume == "auto" and resume_from is None:
        logger.info("-r auto: no checkpoint in %s yet, starting from scratch", ckpt_dir)
    seed_everything(params.seed)  # identical initialisation on every rank
    data = TRAINING_DATA[params.dataset_name][1](params, ctx)
    configure_backends(ctx.device, params.amp, params.deterministic, fixed_input_size=True)
    cache = getattr(params, "teacher_cache", None)
    if cache:
        data = from_teacher_cache(data, params, ctx)
    loader, batches = make_loader(data, params, ctx)
    model, student, criterion = build_model(params, ctx, with_teachers=not cache)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    logger.info("student %s (%s init, %.1fM trainable parameters); teachers %s whitened to %d-d, %s", params.arch,
                params.student_init, n_train / 1e6, " ".join(params.teachers), params.embed_dim,
                f"from the cache {cache}" if cache else f"from {params.path_to_pretrained_weights}")
    optimizer = torch.optim.Adam(student.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    n_iters = len(loader)
    logger.info("%d iterations per epoch, %d pairs per iteration over %d process(es)%s", n_iters,
                params.batch_size * ctx.world_size, ctx.world_size, tail_note(data.batch_sampler))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs * n_iters, eta_min=1e-6)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=params.amp == "fp16")
    trainer = Trainer(params, ctx, model, student, criterion, data, loader, batches, optimizer, scheduler, scaler,
                      MetricsWriter(ckpt_dir / METRICS_FILE if ctx.is_main else None,
                                    ckpt_dir / TENSORBOARD_DIR if ctx.is_main and params.tensorboard else None))
    seed_everything(params.seed + ctx.rank)  # per-rank stream for the random fusion strategies
    start_epoch, progress = params.start_epoch, EpochProgress()
    if ckpt is not None:
        start_epoch, progress = trainer.resume(ckpt, resume_from)
    if ctx.is_main:
        for note in settle_run_dir(params, ckpt):
            logger.info(note)
    if ckpt is not None:
        trainer.metrics.write({"type": "resume", "epoch": start_epoch, "iteration": trainer.iteration,
                               "checkpoint": str(resume_from)})
    try:
        with StopRequest() as stop:
            trainer.stop = stop
            try:
                for epoch in range(start_epoch, params.epochs):
                    start = time.perf_counter()
                    record = trainer.train_epoch(epoch, progress if epoch == start_epoch else None)
                    record["seconds"] = time.perf_counter() - start
                    stopping = epoch + 1 < params.epochs and stop.agreed(ctx)
                    if stopping or trainer.saves_after(epoch):
                        trainer.save(epoch)
                    trainer.metrics.write(record)
                    logger.info("epoch %d/%d done: loss %.5f, %.1f img/s, %.0f s, wins %s", epoch + 1, params.epochs,
                                record["loss"], record["images_per_s"], record["seconds"], record["pos_win_share"])
                    if stopping:
                        raise Stopped(epoch + 1, 0)
            except Stopped as where:
                logger.warning("stopped on signal %s after %s: %s holds the run; resume with -r auto",
                               stop.received, where, ckpt_dir / LAST_CHECKPOINT)
                stop.exit_preempted()
    finally:
        trainer.stop_workers()
        trainer.metrics.close()
    return trainer
