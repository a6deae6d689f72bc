"""Checkpoint I/O: atomic writes and safe (``weights_only``) reads with clear errors.

Every file this project reads (published teachers, PCA files, students, its own checkpoints) goes through
``load_file`` so that a downloaded file can never run code unless the user explicitly trusts it.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError
from utils.files import atomic_write


class CheckpointError(UserError, RuntimeError):
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


# The first bytes of the files torch.save writes: a zip archive (torch >= 1.6), or a pickle (the legacy format).
_ZIP_MAGIC = b"PK\x03\x04"


def describe_non_checkpoint(path: Path) -> str | None:
    """What ``path`` is when its first bytes show it cannot be a ``torch.save`` file (``None``: it may be one)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file (an interrupted download or copy?)"
    if head.startswith(_ZIP_MAGIC) or head.startswith(b"\x80"):  # zip archive, or a pickle (protocol >= 2)
        return None
    try:  # incremental: a character cut at the end of the 512 bytes is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = ""
    if not text or not all(c.isprintable() or c in "\r\n\t" for c in text.rstrip("\x00")):
        return f"not a PyTorch file (unknown binary format, first bytes {head[:8]!r})"
    lowered = text.lower()
    if "<html" in lowered or "<!doctype" in lowered:
        return ("an HTML page, not the weights (a download that saved a web page, e.g. Google Drive's "
                "confirmation page, instead of the file)")
    first_line = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"a text file, not the weights (it starts with {first_line!r})"


# Modules whose functions a weight file never needs: a pickle that calls them is an attack, not a checkpoint.
_DANGEROUS_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "shutil", "socket", "runpy", "importlib",
                      "pty", "code", "webbrowser"}


def _refused_global(exc: pickle.UnpicklingError) -> str | None:
    """The Python global a safe load refused (``None``: the file is broken, not merely unsafe)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else None


def load_file(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu",
              what: str = "checkpoint") -> Any:
    """Load a ``torch.save`` file. ``weights_only=True`` unless ``trust`` (the user's ``--trust_checkpoint``).

    A file that is not a checkpoint (text, an HTML page, empty, truncated) is a ``CheckpointError`` saying so;
    ``--trust_checkpoint`` is suggested only for a readable checkpoint that pickles Python objects.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "not found"
        raise CheckpointError(f"{what} file {problem}: {path}. Check the path (and --path_to_pretrained_weights).")
    not_torch = describe_non_checkpoint(path)
    if not_torch is not None:
        raise CheckpointError(f"{what} file {path} is not a PyTorch checkpoint: it is {not_torch}. Check the path, "
                              "or download the file again.")
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        name = None if trust else _refused_global(exc)
        if name is not None and name.split(".")[0] in _DANGEROUS_MODULES:
            raise CheckpointError(f"{what} file {path} would call {name} when loaded: a weight file never needs "
                                  "that. Do not load it; download the file from its official source.") from exc
        if name is not None:
            raise CheckpointError(
                f"{what} file {path} holds Python objects that a safe load refuses (it pickles {name}). If you "
                "trust this file, pass --trust_checkpoint to load it with full unpickling.") from exc
        raise _unreadable(path, what, exc) from exc
    except Exception as exc:  # torch reports torn archives and pickles with many exception types
        raise _unreadable(path, what, exc) from exc


def _unreadable(path: Path, what: str, exc: BaseException) -> CheckpointError:
    reason = " ".join(str(exc).split()).split(". ")[0][:160] or type(exc).__name__
    return CheckpointError(f"{what} file {path} is truncated or corrupt, not a readable PyTorch checkpoint "
                           f"({reason}). Download or write it again.")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``: a crash never leaves a torn file. Serialised in memory first, then
    written: torch's writer turns a full disk into a ``RuntimeError`` ("unexpected pos"), a plain write into the
    ``OSError`` that ``atomic_write`` reports in one line (the previous file kept)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())


def check_state_dict(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, Any], source: str,
                     hint: str = "") -> None:
    """The checks of a strict load, before it: one ``CheckpointError`` naming (a few of) the missing keys, the
    unexpected ones, the entries that are not tensors and the shapes that differ, then ``hint``."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    not_tensors = sorted(k for k in expected if k in loaded and not isinstance(loaded[k], torch.Tensor))
    shapes = [f"{k}: file {tuple(loaded[k].shape)} vs expected {tuple(v.shape)}" for k, v in expected.items()
              if isinstance(loaded.get(k), torch.Tensor) and tuple(loaded[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    if not_tensors:
        parts.append(f"{len(not_tensors)} entries that are not tensors, e.g. {not_tensors[:5]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    if parts:
        raise CheckpointError(f"{source}: layout mismatch: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Strict ``load_state_dict`` whose failures name the file and the offending keys."""
    check_state_dict(module.state_dict(), state, source, hint)
    module.load_state_dict(state, strict=True)
