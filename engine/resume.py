"""Resuming a training run: which checkpoint, what a resume may change and what it must keep, and a run folder
that stays consistent (``utils.run_dir`` knows its files).

Checked before launch (``check_run_dir``): a fresh run never writes into a folder that holds a run, and a resume
that changes the model, the objective, the data order or the weight files is refused before anything is written.
After the checks, rank 0 prepares the folder (``prepare_run_dir``); ``engine.distill.Trainer.resume`` restores the
state and applies the flags that may change.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from engine.params import TrainParams
from utils.checkpoint import CheckpointError, load_file
from utils.config import dump_args, to_plain
from utils.errors import UserError
from utils.files import read_jsonl, stale_temporaries
from utils.flags import MAY_CHANGE, MUST_MATCH, record, resume_policy, spec_of
from utils.run_dir import (
    CONFIG_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    clear_run,
    run_files,
    snapshots,
    truncate_metrics,
)

# What a resumed run does with each flag whose value differs from the run it resumes is declared with the flag
# (``engine.params``, ``resume=``):
# - MUST_MATCH flags change the model, the objective or the data order: refused, naming the checkpoint's value;
# - MAY_CHANGE flags continue correctly from the resumed state and are logged: --epochs re-plans the cosine schedule
#   from the current epoch (the lr jumps to the new curve, as timm's resume does), --lr/--wd take effect at the same
#   point of the schedule, another -b, world size or training list keeps the schedule's position in epochs (the
#   iterations per epoch change; the data order then differs from an uninterrupted run), --amp switches precision;
# - FREE flags do not change the result (where things are, logging, launch).
# The teacher and PCA files' bytes (``weight_sha256``, recorded at the start of every run) must match too.
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


def newest_checkpoint(params: TrainParams) -> Path | None:
    """``-r PATH``, or for ``-r auto`` the newest of checkpoint_last.pt and the snapshots (None: nothing yet)."""
    if params.resume is None:
        return None
    if params.resume != "auto":
        return Path(params.resume)
    folder = Path(params.ckpt_dir)
    candidates = snapshots(folder)
    last = folder / LAST_CHECKPOINT
    best_epoch, best = -1, None
    if last.is_file():
        try:
            best_epoch, best = int(read_training_checkpoint(last, params.trust_checkpoint)["epoch"]), last
        except CheckpointError as exc:
            hint = (f"; resume from a snapshot instead: -r {candidates[max(candidates)]}" if candidates else "")
            raise CheckpointError(f"{exc}{hint}") from None
    for epoch in sorted(candidates):
        if epoch > best_epoch:  # a snapshot is written first: a kill before checkpoint_last.pt leaves it newer
            best_epoch, best = epoch, candidates[epoch]
    return best


def training_script(flags: dict[str, Any]) -> str:
    """Which training script a run's flags are of: SVD runs read a metadata yaml, GLDv2 runs a data root."""
    return "svd_distill.py" if "dataset_meta" in flags else "gld_distill.py"


def check_run_dir(params: TrainParams) -> None:
    """Before any work: a fresh run never writes into a folder that holds a run, and a resume is refused here (before
    anything is written) when the checkpoint's run differs in a MUST_MATCH flag or in its weight files."""
    ckpt_dir = Path(params.ckpt_dir)
    try:
        read_jsonl(ckpt_dir / METRICS_FILE)
    except ValueError as exc:
        raise UserError(f"{exc}: the run's metrics are damaged (its checkpoints are not): delete or mend that line, "
                         "then run again") from None
    path = newest_checkpoint(params)
    outside = path is not None and path.resolve().parent != ckpt_dir.resolve()
    if (path is None and params.resume is None) or outside:
        existing = run_files(ckpt_dir)
        if existing and not params.overwrite:
            what = "resume it with -r auto" if path is None else "continue -r in another folder"
            names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise UserError(f"-c/--ckpt_dir {ckpt_dir} already holds a training run ({names}): {what}, choose a "
                             "new -c folder, or pass --overwrite to delete that run and start afresh.")
    if path is None:
        return
    ckpt = read_training_checkpoint(path, params.trust_checkpoint)
    saved = ckpt.get("args") or {}
    if saved and training_script(saved) != training_script(vars(params)):  # their data flags never meet
        raise UserError(f"-r/--resume {path} was written by {training_script(saved)}: resume it with that script, "
                         "or train afresh in a new -c folder.")
    for key in sorted(resume_policy(type(params), MUST_MATCH)):
        if key in saved and saved[key] != to_plain(getattr(params, key)):
            shown, flag = _shown(saved[key]), spec_of(params, key).names[-1]
            raise UserError(f"-r/--resume {path} was trained with {flag} {shown}, this run has {flag} "
                            f"{_shown(getattr(params, key))}: a resumed run keeps its model, objective and data "
                            f"order. Resume with {flag} {shown}, or train afresh in a new -c folder.")
    old_files, new_files = saved.get("weight_sha256") or {}, params.weight_sha256
    changed = sorted(k for k in old_files.keys() & new_files.keys() if old_files[k] != new_files[k])
    if changed:
        raise UserError(f"-r/--resume {path}: the weight file(s) {changed} under --path_to_pretrained_weights "
                         "differ from those the run was trained with (another SHA-256); resume with the original "
                         "files, or train afresh in a new -c folder.")
    epoch = int(ckpt["epoch"])
    if epoch > params.epochs:
        raise UserError(f"-r/--resume {path} has already trained {epoch} epochs, more than --epochs "
                        f"{params.epochs}; pass --epochs {epoch} or more.")
    if epoch == params.epochs:
        print(f"{path} has already trained all {epoch} epochs: nothing to do (raise --epochs to train longer).",
              flush=True)
        raise SystemExit(0)


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)



def prepare_run_dir(params: TrainParams, ckpt: dict[str, Any] | None, resumed_from: Path | None
                    ) -> list[str]:
    """Rank 0, after the checks: --overwrite's clean-up and the temporaries of a killed write. Returns what it did,
    for the log. The run's record (config.yaml, metrics) is left as it is until the resume has been accepted
    (``settle_run_dir``): a refused resume changes nothing."""
    ckpt_dir = Path(params.ckpt_dir)
    notes = []
    if params.overwrite and (resumed_from is None or resumed_from.resolve().parent != ckpt_dir.resolve()):
        deleted = clear_run(ckpt_dir)
        if deleted:
            notes.append(f"--overwrite: deleted the previous run's {len(deleted)} file(s) in {ckpt_dir}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(ckpt_dir):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    epoch = int(ckpt["epoch"]) if ckpt else 0
    newer = [snapshots(ckpt_dir)[e].name for e in sorted(snapshots(ckpt_dir)) if e > epoch]
    if newer:
        notes.append(f"resuming at epoch {epoch}: the newer snapshot(s) {', '.join(newer)} are replaced as training "
                     "reaches them")
    return notes


def settle_run_dir(params: TrainParams, ckpt: dict[str, Any] | None) -> list[str]:
    """Rank 0, once the run starts or its resume has been accepted: config.yaml with the flags the run goes on with,
    and metrics consistent with the resumed state (records of iterations that will run again are dropped, a torn
    last line mended). Returns what it did, for the log."""
    ckpt_dir = Path(params.ckpt_dir)
    dump_args({**record(params), "weight_sha256": params.weight_sha256}, ckpt_dir / CONFIG_FILE)
    dropped = truncate_metrics(ckpt_dir, int(ckpt.get("iteration", 0)) if ckpt else 0)
    if dropped:
        return [f"{METRICS_FILE}: dropped {dropped} record(s) of iterations after the resumed state (they run again)"]
    return []


def adjust_to_flags(params: TrainParams, ckpt: dict[str, Any], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, n_iters: int, world_size: int,
                    fingerprint: str) -> list[str]:
    """Apply the MAY_CHANGE flags that differ from the checkpoint's run (the optimizer and scheduler are
    already restored); returns what changed, in words, for the log."""
    saved, epoch, notes = ckpt.get("args") or {}, int(ckpt["epoch"]), []
    old_iters = ckpt.get("iters_per_epoch") or (scheduler.T_max // max(1, saved.get("epochs", params.epochs)))
    if ckpt.get("world_size") != world_size:
        notes.append(f"world size {ckpt.get('world_size')} -> {world_size}: the sampler and RNG states are per "
                     "process, so the data order and augmentations differ from an uninterrupted run")
    if saved.get("batch_size", params.batch_size) != params.batch_size:
        notes.append(f"-b {saved['batch_size']} -> {params.batch_size} pairs per process")
    if ckpt.get("data_fingerprint", fingerprint) != fingerprint:
        notes.append("the training list changed since the checkpoint (other images/videos or order)")
    if old_iters != n_iters:
        notes.append(f"{old_iters} -> {n_iters} iterations per epoch: the cosine schedule keeps its position "
                     f"(epoch {epoch} of {params.epochs}); the data order differs from an uninterrupted run")
    if saved.get("epochs", params.epochs) != params.epochs:
        notes.append(f"--epochs {saved['epochs']} -> {params.epochs}: the cosine schedule is re-planned for "
                     f"{params.epochs} epochs from epoch {epoch}")
    if saved.get("lr", params.lr) != params.lr:
        notes.append(f"--lr {saved['lr']:g} -> {params.lr:g}: the new base lr at the same point of the schedule")
    if (old_iters != n_iters or saved.get("epochs", params.epochs) != params.epochs
            or saved.get("lr", params.lr) != params.lr):
        before = scheduler.get_last_lr()[0]
        after = set_cosine_position(optimizer, scheduler, params.lr, epoch * n_iters, params.epochs * n_iters)
        notes.append(f"lr {before:.3e} -> {after:.3e}")
    if saved.get("weight_decay", params.weight_decay) != params.weight_decay:
        for group in optimizer.param_groups:
            group["weight_decay"] = params.weight_decay
        notes.append(f"--wd {saved['weight_decay']:g} -> {params.weight_decay:g}")
    if saved.get("amp", params.amp) != params.amp:
        notes.append(f"--amp {saved['amp']} -> {params.amp}"
                     + (" (the fp16 loss scale starts afresh)" if params.amp == "fp16" else ""))
    for key in sorted(resume_policy(type(params), MAY_CHANGE) - _ADJUSTED_ABOVE):
        if key in saved and saved[key] != to_plain(getattr(params, key)):
            notes.append(f"{spec_of(params, key).names[-1]} {_shown(saved[key])} -> {_shown(getattr(params, key))}")
    return notes


_ADJUSTED_ABOVE = frozenset({"epochs", "lr", "weight_decay", "batch_size", "amp"})  # with their own notes


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
