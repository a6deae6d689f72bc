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

from datasets.sampler import MIN_BATCH
from models.distill_model import DistillModel, WhitenedTeachers
from models.loss import STRATEGIES, MultiTeacherDistillLoss
from models.pca_layer import load_pca_layer, pca_weight_path
from models.students import CHECKPOINT_PREFIX, build_student, check_student_arch, student_checkpoint_state
from models.teachers import TEACHER_FILES, TEACHERS
from utils.argtypes import (
    checked_by,
    existing_file,
    int_at_least,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
)
from utils.checkpoint import CheckpointError, describe_non_checkpoint, load_file, load_state_strict, save_atomic
from utils.config import dump_args, to_plain
from utils.distributed import DistContext, barrier, broadcast_object
from utils.files import sha256_file, stale_temporaries
from utils.log import MetricsWriter, Throughput, get_logger, log_run_header, progress, setup_logging
from utils.run_dir import (
    CONFIG_FILE,
    LAST_CHECKPOINT,
    LOG_FILE,
    METRICS_FILE,
    clear_run,
    run_files,
    snapshot_name,
    snapshots,
    truncate_metrics,
)
from utils.runtime import add_runtime_args, autocast, check_amp, seed_everything


@dataclass
class TrainData:
    """What a script supplies: the dataset, a batch sampler with ``set_epoch``/``state_dict``/``load_state_dict``,
    a collate function producing ``(x1, x2)``, and a fingerprint of the training list (names and order), by which a
    resumed run notices that its data changed."""

    dataset: Dataset
    batch_sampler: Any
    collate_fn: Callable | None = None
    fingerprint: str = ""


def add_distill_args(parser: argparse.ArgumentParser, *, arch_default: str = "resnet18", lr_default: float = 1e-3,
                     p_default: float = 3.0, dist_url: str = "env://") -> None:
    """Flags both training scripts share (the paper's names, short forms and defaults) + runtime flags."""
    parser.add_argument("-a", "--arch", default=arch_default, metavar="ARCH", type=checked_by(check_student_arch),
                        help=f"student: resnet18, resnet34 or timm:<model name> (default {arch_default})")
    parser.add_argument("-ts", "--teachers", required=True, nargs="+", choices=list(TEACHERS), metavar="NAME",
                        help=f"teachers to distill: {', '.join(TEACHERS)}")
    parser.add_argument("-c", "--ckpt_dir", required=True, metavar="DIR", type=output_dir,
                        help="output folder (config, log, metrics, checkpoints); a folder that holds a run is "
                             "resumed with -r auto, never overwritten unless --overwrite")
    parser.add_argument("-b", "--batch_size", type=int_at_least(MIN_BATCH), default=64,
                        help=f"pairs per process and iteration (default 64, >= {MIN_BATCH}: BatchNorm and the "
                             "negatives need two)")
    parser.add_argument("--num_workers", type=nonnegative_int, default=8,
                        help="data loader workers per process (default 8)")
    parser.add_argument("-r", "--resume", default=None, metavar="PATH", type=resume_path,
                        help=f"checkpoint to resume, or 'auto' for the newest checkpoint in CKPT_DIR "
                             f"({LAST_CHECKPOINT} or a newer snapshot) when there is one")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a -c folder that holds a run: its checkpoints, metrics, log and config "
                             "are deleted first")
    parser.add_argument("--path_to_pretrained_weights", default="/path/to/pretrained_weights", metavar="DIR",
                        help="folder of the teacher files and pca_weights/")
    parser.add_argument("--start_epoch", type=nonnegative_int, default=0,
                        help="first epoch (0-based) when not resuming (default 0)")
    parser.add_argument("--epochs", type=positive_int, default=200, help="number of training epochs (default 200)")
    parser.add_argument("--lr", type=positive_float, default=lr_default, help=f"Adam learning rate (default "
                                                                            f"{lr_default:g})")
    parser.add_argument("--wd", "--weight-decay", type=nonnegative_float, default=1e-6, dest="weight_decay",
                        help="Adam weight decay (default 1e-6)")
    parser.add_argument("--snapshot_step", type=positive_int, default=10,
                        help="write checkpoint_{epoch}.pt every N epochs (default 10)")
    parser.add_argument("--embed_dim", type=positive_int, default=512,
                        help="student / PCA output dimension (default 512)")
    parser.add_argument("-p", type=positive_float, default=p_default,
                        help=f"GeM power of student and teachers (default {p_default:g})")
    parser.add_argument("-s", "--strategy", default="maxmin", choices=list(STRATEGIES),
                        help="teacher similarity fusion (default maxmin)")
    parser.add_argument("--student_init", default="imagenet", choices=["imagenet", "random"],
                        help="imagenet: torchvision ImageNet weights (the paper; needs them downloaded or cached); "
                             "random: from scratch")
    parser.add_argument("--log_every", type=nonnegative_int, default=0,
                        help="iterations between log/metrics lines (0: 16 per epoch, as the paper)")
    add_runtime_args(parser, dist_url=dist_url)


def resume_path(value: str) -> str:
    """``-r``: ``auto`` or a checkpoint file that exists."""
    return value if value == "auto" else existing_file(value)


def check_distill_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks that involve several flags, as argparse errors."""
    if args.start_epoch >= args.epochs:
        parser.error(f"--start_epoch {args.start_epoch} must be below --epochs {args.epochs}")
    if len(set(args.teachers)) != len(args.teachers):
        parser.error(f"-ts/--teachers lists a teacher twice: {' '.join(args.teachers)}")
    for name in args.teachers:
        dim = TEACHERS[name].descriptor_dim
        if args.embed_dim > dim:
            parser.error(f"--embed_dim {args.embed_dim} is larger than the {dim}-d descriptor of teacher {name}; "
                         "a PCA-whitening can only reduce it")
    if args.overwrite and args.resume is not None:
        inside = args.resume == "auto" or Path(args.resume).resolve().parent == Path(args.ckpt_dir).resolve()
        if inside:
            parser.error("--overwrite with -r would delete the run it resumes; drop one of them")
    return args


def check_weight_files(args: argparse.Namespace, pca_script: str) -> None:
    """Before any process starts: every teacher file exists and looks like a checkpoint, every PCA file exists and
    whitens the teacher's descriptor to --embed_dim. Records the files' SHA-256 in ``args.weight_sha256`` (a
    resumed run must use the same bytes)."""
    root = Path(args.path_to_pretrained_weights)
    digests = {}
    for name in args.teachers:
        teacher_file = root / TEACHER_FILES[name]
        if not teacher_file.is_file():
            raise SystemExit(f"teacher {name}: weight file not found: {teacher_file}. Download the published "
                             "teacher weights into --path_to_pretrained_weights.")
        not_torch = describe_non_checkpoint(teacher_file)
        if not_torch is not None:
            raise SystemExit(f"teacher {name}: weight file {teacher_file} is not a PyTorch checkpoint: it is "
                             f"{not_torch}. Download it again.")
        pca_file = pca_weight_path(root, name, args.embed_dim)
        if not pca_file.is_file():
            raise SystemExit(f"teacher {name}: PCA-whitening file not found: {pca_file}. Learn it with: python "
                             f"{pca_script} -t {name} --embed_dim {args.embed_dim} --path_to_pretrained_weights "
                             f"{root} (or download the published pca_weights/).")
        try:
            load_pca_layer(pca_file, trust=args.trust_checkpoint, in_dim=TEACHERS[name].descriptor_dim,
                           out_dim=args.embed_dim)
        except CheckpointError as exc:
            raise SystemExit(f"teacher {name}: {exc}") from None
        for path in (teacher_file, pca_file):
            digests[str(path.relative_to(root))] = sha256_file(path)
    args.weight_sha256 = digests


# --------------------------------------------------------------------------------------------------- run folder
# What a resumed run does with each flag whose value differs from the run it resumes (every flag of both training
# scripts is in exactly one set; a test checks it):
# - RESUME_MUST_MATCH change the model, the objective or the data order: refused, naming the checkpoint's value;
# - RESUME_ADJUSTS continue correctly from the resumed state and are logged: --epochs re-plans the cosine schedule
#   from the current epoch (the lr jumps to the new curve, as timm's resume does), --lr/--wd take effect at the same
#   point of the schedule, another -b, world size or training list keeps the schedule's position in epochs (the
#   iterations per epoch change; the data order then differs from an uninterrupted run), --amp switches precision;
# - RESUME_NO_EFFECT do not change the result (where things are, logging, launch).
# The teacher and PCA files' bytes (``weight_sha256``, recorded at the start of every run) must match too.
RESUME_MUST_MATCH = frozenset({"arch", "teachers", "embed_dim", "p", "strategy", "st", "tt", "seed", "imsize",
                               "crop_size"})
RESUME_ADJUSTS = frozenset({"epochs", "lr", "weight_decay", "batch_size", "amp", "gld_root_path", "dataset_meta"})
RESUME_NO_EFFECT = frozenset({"ckpt_dir", "resume", "overwrite", "num_workers", "path_to_pretrained_weights",
                              "snapshot_step", "log_every", "no_progress", "trust_checkpoint", "device", "dist_url",
                              "rank", "world_size", "start_epoch", "student_init", "warmup_epochs", "t",
                              "weight_sha256"})
TRAINING_STATE = ("epoch", "state_dict", "optimizer", "lr_scheduler", "loss_fn")


def read_training_checkpoint(path: Path, trust: bool) -> dict[str, Any]:
    """A checkpoint this project's training wrote (or the paper's), with a clear error for anything else."""
    ckpt = load_file(path, trust=trust, what="training checkpoint (-r/--resume)")
    missing = [k for k in TRAINING_STATE if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        found = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"-r/--resume {path} is not a training checkpoint: it lacks {missing} (it holds "
                              f"{found}). A released student checkpoint holds weights only: evaluate it with "
                              "oxford_paris_eval.py / svd_eval.py; resume from the checkpoint_last.pt of a run.")
    return ckpt


def newest_checkpoint(args: argparse.Namespace) -> Path | None:
    """``-r PATH``, or for ``-r auto`` the newest of checkpoint_last.pt and the snapshots (None: nothing yet)."""
    if args.resume is None:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    folder = Path(args.ckpt_dir)
    candidates = snapshots(folder)
    last = folder / LAST_CHECKPOINT
    best_epoch, best = -1, None
    if last.is_file():
        try:
            best_epoch, best = int(read_training_checkpoint(last, args.trust_checkpoint)["epoch"]), last
        except CheckpointError as exc:
            hint = (f"; resume from a snapshot instead: -r {candidates[max(candidates)]}" if candidates else "")
            raise CheckpointError(f"{exc}{hint}") from None
    for epoch in sorted(candidates):
        if epoch > best_epoch:  # a snapshot is written first: a kill before checkpoint_last.pt leaves it newer
            best_epoch, best = epoch, candidates[epoch]
    return best


def check_run_dir(args: argparse.Namespace) -> None:
    """Before any work: a fresh run never writes into a folder that holds a run, and a resume is refused here (before
    anything is written) when the checkpoint's run differs in a flag of RESUME_MUST_MATCH or in its weight files."""
    ckpt_dir = Path(args.ckpt_dir)
    path = newest_checkpoint(args)
    outside = path is not None and path.resolve().parent != ckpt_dir.resolve()
    if (path is None and args.resume is None) or outside:
        existing = run_files(ckpt_dir)
        if existing and not args.overwrite:
            what = "resume it with -r auto" if path is None else "continue -r in another folder"
            names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise SystemExit(f"-c/--ckpt_dir {ckpt_dir} already holds a training run ({names}): {what}, choose a "
                             "new -c folder, or pass --overwrite to delete that run and start afresh.")
    if path is None:
        return
    ckpt = read_training_checkpoint(path, args.trust_checkpoint)
    saved = ckpt.get("args") or {}
    for key in sorted(RESUME_MUST_MATCH):
        if key in saved and hasattr(args, key) and saved[key] != to_plain(getattr(args, key)):
            shown = " ".join(map(str, saved[key])) if isinstance(saved[key], list) else saved[key]
            raise SystemExit(f"-r/--resume {path} was trained with --{key} {shown}, this run has --{key} "
                             f"{_shown(getattr(args, key))}: a resumed run keeps its model, objective and data "
                             f"order. Resume with --{key} {shown}, or train afresh in a new -c folder.")
    old_files, new_files = saved.get("weight_sha256") or {}, getattr(args, "weight_sha256", {}) or {}
    changed = sorted(k for k in old_files.keys() & new_files.keys() if old_files[k] != new_files[k])
    if changed:
        raise SystemExit(f"-r/--resume {path}: the weight file(s) {changed} under --path_to_pretrained_weights "
                         "differ from those the run was trained with (another SHA-256); resume with the original "
                         "files, or train afresh in a new -c folder.")
    epoch = int(ckpt["epoch"])
    if epoch > args.epochs:
        raise SystemExit(f"-r/--resume {path} has already trained {epoch} epochs, more than --epochs "
                         f"{args.epochs}; pass --epochs {epoch} or more.")
    if epoch == args.epochs:
        print(f"{path} has already trained all {epoch} epochs: nothing to do (raise --epochs to train longer).",
              flush=True)
        raise SystemExit(0)


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def preflight(args: argparse.Namespace, pca_script: str) -> None:
    """Everything a training run checks before it starts (run by ``launch`` in the launching process)."""
    check_weight_files(args, pca_script)
    check_run_dir(args)


def prepare_run_dir(args: argparse.Namespace, ckpt: dict[str, Any] | None, resumed_from: Path | None
                    ) -> list[str]:
    """Rank 0, after the checks: --overwrite's clean-up, config.yaml, and metrics consistent with the resumed
    state (records of iterations that will run again are dropped). Returns what it did, for the log."""
    ckpt_dir = Path(args.ckpt_dir)
    notes = []
    if args.overwrite and (resumed_from is None or resumed_from.resolve().parent != ckpt_dir.resolve()):
        deleted = clear_run(ckpt_dir)
        if deleted:
            notes.append(f"--overwrite: deleted the previous run's {len(deleted)} file(s) in {ckpt_dir}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(ckpt_dir):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    dump_args(args, ckpt_dir / CONFIG_FILE)
    epoch = int(ckpt["epoch"]) if ckpt else 0
    newer = [snapshots(ckpt_dir)[e].name for e in sorted(snapshots(ckpt_dir)) if e > epoch]
    if newer:
        notes.append(f"resuming at epoch {epoch}: the newer snapshot(s) {', '.join(newer)} are replaced as training "
                     "reaches them")
    dropped = truncate_metrics(ckpt_dir, int(ckpt.get("iteration", 0)) if ckpt else 0)
    if dropped:
        notes.append(f"{METRICS_FILE}: dropped {dropped} record(s) of iterations after the resumed state "
                     "(they run again)")
    return notes


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
        """Restore everything from ``ckpt`` (read from ``path``); returns the epoch (0-based) to start from.

        Flags of RESUME_ADJUSTS that changed are applied here and logged; the others were checked before launch.
        """
        logger = get_logger()
        state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                 if k.startswith(CHECKPOINT_PREFIX)}
        load_state_strict(self.student, state, f"-r/--resume {path}", "the checkpoint belongs to another -a/"
                          "--embed_dim")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["lr_scheduler"])
            self.loss_fn.pos_win_count.copy_(ckpt["loss_fn"]["pos_win_count"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"-r/--resume {path}: its optimizer/scheduler/loss state does not fit this run "
                                  f"({exc}); it belongs to another -a/-ts") from None
        saved = ckpt.get("args") or {}
        epoch = int(ckpt["epoch"])
        if ckpt.get("scaler") and saved.get("amp", self.args.amp) == self.args.amp:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt.get("iteration", 0))
        rank = self.ctx.rank
        same_world = ckpt.get("world_size") == self.ctx.world_size and "sampler" in ckpt and "rng" in ckpt
        if same_world:
            self.data.batch_sampler.load_state_dict(ckpt["sampler"][rank])
            set_rng_state(ckpt["rng"][rank], self.ctx.device)
        for note in self.adjust_to_flags(ckpt, saved, epoch):
            logger.warning("resume: %s", note)
        logger.info("resumed from %s at epoch %d (iteration %d)", path, epoch, self.iteration)
        self.metrics.write({"type": "resume", "epoch": epoch, "iteration": self.iteration, "checkpoint": str(path)})
        if self.ctx.is_main and epoch % self.args.snapshot_step == 0:
            snapshot = Path(self.args.ckpt_dir) / snapshot_name(epoch)
            if not snapshot.exists():  # killed before it was written (older runs wrote it after checkpoint_last)
                save_atomic(ckpt, snapshot)
                logger.info("wrote the missing snapshot %s", snapshot)
        return epoch

    def adjust_to_flags(self, ckpt: dict[str, Any], saved: dict[str, Any], epoch: int) -> list[str]:
        """Apply the RESUME_ADJUSTS flags that differ from the checkpoint's run; returns what changed, in words."""
        args, notes = self.args, []
        n_iters = len(self.loader)
        old_iters = ckpt.get("iters_per_epoch") or (self.scheduler.T_max // max(1, saved.get("epochs", args.epochs)))
        if ckpt.get("world_size") != self.ctx.world_size:
            notes.append(f"world size {ckpt.get('world_size')} -> {self.ctx.world_size}: the sampler and RNG states "
                         "are per process, so the data order and augmentations differ from an uninterrupted run")
        if saved.get("batch_size", args.batch_size) != args.batch_size:
            notes.append(f"-b {saved['batch_size']} -> {args.batch_size} pairs per process")
        if ckpt.get("data_fingerprint", self.data.fingerprint) != self.data.fingerprint:
            notes.append("the training list changed since the checkpoint (other images/videos or order)")
        if old_iters != n_iters:
            notes.append(f"{old_iters} -> {n_iters} iterations per epoch: the cosine schedule keeps its position "
                         f"(epoch {epoch} of {args.epochs}); the data order differs from an uninterrupted run")
        if saved.get("epochs", args.epochs) != args.epochs:
            notes.append(f"--epochs {saved['epochs']} -> {args.epochs}: the cosine schedule is re-planned for "
                         f"{args.epochs} epochs from epoch {epoch}")
        if saved.get("lr", args.lr) != args.lr:
            notes.append(f"--lr {saved['lr']:g} -> {args.lr:g}: the new base lr at the same point of the schedule")
        replan = bool(notes) and (old_iters != n_iters or saved.get("epochs", args.epochs) != args.epochs
                                  or saved.get("lr", args.lr) != args.lr)
        if replan:
            before = self.scheduler.get_last_lr()[0]
            after = set_cosine_position(self.optimizer, self.scheduler, args.lr, epoch * n_iters,
                                        args.epochs * n_iters)
            notes.append(f"lr {before:.3e} -> {after:.3e}")
        if saved.get("weight_decay", args.weight_decay) != args.weight_decay:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = args.weight_decay
            notes.append(f"--wd {saved['weight_decay']:g} -> {args.weight_decay:g}")
        if saved.get("amp", args.amp) != args.amp:
            notes.append(f"--amp {saved['amp']} -> {args.amp}"
                         + (" (the fp16 loss scale starts afresh)" if args.amp == "fp16" else ""))
        for key in ("gld_root_path", "dataset_meta"):
            if key in saved and hasattr(args, key) and saved[key] != getattr(args, key):
                notes.append(f"--{key} {saved[key]} -> {getattr(args, key)}")
        return notes

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


def tail_note(sampler: Any) -> str:
    """Says when the sampler's last batch holds one pair more (a single leftover pair joins it)."""
    bounds = sampler.batch_bounds() if hasattr(sampler, "batch_bounds") else []
    if bounds and bounds[-1][1] - bounds[-1][0] > sampler.batch_size:
        return f" (the last holds {bounds[-1][1] - bounds[-1][0]} per process: a single leftover pair joins it)"
    return ""


def set_cosine_position(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.CosineAnnealingLR,
                        base_lr: float, position: int, total: int) -> float:
    """Put the cosine schedule at iteration ``position`` of ``total`` with base ``base_lr``; returns the lr there.

    CosineAnnealingLR updates recursively from the current lr, so setting the closed-form lr at ``position``
    continues the closed-form curve exactly."""
    lr = scheduler.eta_min + (base_lr - scheduler.eta_min) * (1 + math.cos(math.pi * position / total)) / 2
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
        group["lr"] = lr
    scheduler.base_lrs = [base_lr] * len(optimizer.param_groups)
    scheduler.T_max = total
    scheduler.last_epoch = position
    scheduler._last_lr = [lr] * len(optimizer.param_groups)
    return lr


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
    model, student = build_model(args, ctx)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    logger.info("student %s: %d trainable parameters; teachers %s", args.arch, n_train, args.teachers)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_iters = len(loader)
    logger.info("%d iterations per epoch, %d pairs per iteration over %d process(es)%s", n_iters,
                args.batch_size * ctx.world_size, ctx.world_size, tail_note(data.batch_sampler))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * n_iters, eta_min=1e-6)
    loss_fn = MultiTeacherDistillLoss(st=args.st, tt=args.tt, strategy=args.strategy,
                                      teachers=args.teachers).to(ctx.device)
    check_amp(args.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
    trainer = Trainer(args, ctx, model, student, data, loader, generator, optimizer, scheduler, loss_fn, scaler,
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
