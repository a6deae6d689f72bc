"""How one teacher's module maps onto its published weight file.

Each family file describes its teachers with a ``TeacherSpec``; ``models.teachers`` turns these into the loader
(published file -> module, every key accounted for) and the writer (module -> published file, extra keys included).
Keys are compared in the file's own names, so error messages name the keys a user sees in the file.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from utils.checkpoint import CheckpointError

Shape = tuple[int, ...]


def _keep_all(key: str) -> bool:
    return False


def _no_dims(checkpoint: Mapping[str, Any], source: str) -> dict[str, int]:
    return {}


def _no_meta(teacher: nn.Module) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher: its file, descriptor size, container entry, module builder and key mapping.

    - ``build(gem_p=..., **dims)`` makes the module with random initialisation (``dims`` from ``read_dims``).
    - ``file_key(module_key)`` names a module tensor in the published file.
    - ``dropped(file_key)``: keys the paper's loader discards whether present or not.
    - ``extra_keys``: every published key that is not a module tensor, with (shape, dtype) as published; the writer
      fills them with random values. Those in ``required_extra`` must be present with that shape (the paper's
      loader pops them or loads them strictly into unused heads); all others must satisfy ``dropped``.
    - ``read_dims(checkpoint, source)`` / ``write_meta(teacher)``: the file's non-tensor entries (output sizes).
    """

    file: str
    descriptor_dim: int  # size of the published file's descriptor (what its PCA-whitening takes as input)
    container: str
    module_type: type[nn.Module]
    build: Callable[..., nn.Module]
    file_key: Callable[[str], str]
    dropped: Callable[[str], bool] = _keep_all
    extra_keys: Mapping[str, tuple[Shape, torch.dtype]] = field(default_factory=dict)
    required_extra: frozenset[str] = frozenset()
    read_dims: Callable[[Mapping[str, Any], str], dict[str, int]] = _no_dims
    write_meta: Callable[[nn.Module], dict[str, Any]] = _no_meta


def prefixed(prefix: str) -> Callable[[str], str]:
    """``file_key`` for files that store the module's keys under one prefix (``module.``, ``module.backbone.``)."""
    return lambda key: prefix + key


def identity_key(key: str) -> str:
    return key


def meta_int(checkpoint: Mapping[str, Any], entry: str, field_name: str, source: str) -> int:
    """A positive int stored as ``checkpoint[entry][field_name]`` (e.g. ``meta.outputdim``), or a clear error."""
    section = checkpoint.get(entry)
    value = section.get(field_name) if isinstance(section, Mapping) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{source}: expected a positive int at ['{entry}']['{field_name}'] (the output size "
                              f"of the published file), found {value!r}. Is this the right file?")
    return value


def random_tensor(shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """Random filler for keys the loader ignores: values in [2, 4) for floats (plausible GeM exponents), small
    counters for integers."""
    if dtype.is_floating_point:
        return 2.0 + 2.0 * torch.rand(shape, dtype=dtype)
    return torch.randint(0, 1000, shape, dtype=dtype)
