"""Checkpoint I/O: atomic writes and safe (``weights_only``) reads with clear errors.

Every file this project reads (published teachers, PCA files, students, its own checkpoints) goes through
``load_file`` so that a downloaded file can never run code unless the user explicitly trusts it.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or has an unexpected layout."""


def _safe_numpy_globals() -> list:
    """Numpy scalar/dtype classes that older checkpoints pickle for plain numbers (e.g. a saved best score)."""
    import numpy as np

    found = []
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["scalar"])
            found.append(mod.scalar)
            break
        except (ImportError, AttributeError):
            continue
    found.append(np.dtype)
    found.extend(type(np.dtype(t)) for t in ("float32", "float64", "int32", "int64", "bool"))
    return found


def load_file(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu",
              what: str = "checkpoint") -> Any:
    """Load a ``torch.save`` file. ``weights_only=True`` unless ``trust`` (the user's ``--trust_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}. Check the path (and --path_to_pretrained_weights).")
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{what} file {path} holds Python objects that a safe load refuses ({_unpickler_reason(exc)}). If you "
            "trust this file, pass --trust_checkpoint to load it with full unpickling.") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {what} file {path}: {exc}. The file may be truncated or not a "
                              "torch.save file; download or write it again.") from exc


def _unpickler_reason(exc: Exception) -> str:
    """The informative part of torch's long weights-only refusal (which global, or which opcode)."""
    paragraphs = [" ".join(p.split()) for p in str(exc).split("\n\n") if p.strip()]
    useful = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation",
                                                         "Please file an issue"))]
    return "; ".join(useful) or paragraphs[0]


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def check_keys(expected: set[str], got: set[str], source: str, hint: str = "") -> None:
    """Raise a CheckpointError naming the missing/unexpected keys (a few of each) of a strict load."""
    missing = sorted(expected - got)
    unexpected = sorted(got - expected)
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    raise CheckpointError(f"{source}: layout mismatch: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def check_shapes(module_state: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str,
                 hint: str = "") -> None:
    """Raise a CheckpointError naming the keys whose shapes differ between a module and a loaded state dict."""
    bad = [f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
           for k, v in module_state.items() if k in loaded and tuple(loaded[k].shape) != tuple(v.shape)]
    if bad:
        suffix = f". {hint}" if hint else ""
        raise CheckpointError(f"{source}: {len(bad)} shape mismatch(es), e.g. {bad[:3]}{suffix}")


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Strict ``load_state_dict`` whose failures name the file and the offending keys."""
    own = module.state_dict()
    check_keys(set(own), set(state), source, hint)
    check_shapes(own, state, source, hint)
    module.load_state_dict(state, strict=True)
