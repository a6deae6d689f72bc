"""The teachers: the paper's seven, loadable from the published weight files unchanged, and any timm model.

A teacher is named by a key of ``TEACHERS`` or by ``timm:<model name>`` (``models.teachers.timm_teacher``: a local
file of timm's own keys under ``<weights_dir>/timm/``); ``teacher_file(name, weights_dir)`` says where its file is.
For the paper's, ``build_teacher(name, weights_dir)`` reads ``<weights_dir>/<TEACHER_FILES[name]>`` and applies
the paper's key remapping: the keys its loader discards are discarded, every other key must match the module exactly
(a missing, unexpected or misshapen key is a ``CheckpointError`` naming the file and the keys), and the file's
learned GeM exponents are replaced by ``gem_p``. ``write_published_layout`` is the inverse: it writes a teacher as a
file in the published container and key layout, including the keys the loader ignores, for tests and the demo.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.teachers import timm_teacher
from models.teachers.delg import RESNET101_DELG
from models.teachers.dolg import RESNET101_DOLG
from models.teachers.resnet_gem import RESNET101_AP_GEM, RESNET101_GEM
from models.teachers.solar import RESNET101_SOLAR
from models.teachers.spec import TeacherSpec, random_tensor
from models.teachers.ssl import BARLOWTWINS, MOCOV3
from models.timm_names import is_timm_name
from utils.checkpoint import CheckpointError, check_state_dict, describe_non_checkpoint, load_file, save_atomic
from utils.errors import UsageError

__all__ = ["TEACHERS", "TEACHER_FILES", "TEACHER_POOLS", "TeacherSpec", "build_teacher", "check_teacher_file",
           "check_teacher_name", "check_teacher_pool", "descriptor_dim", "teacher_file", "teacher_from_checkpoint",
           "published_checkpoint", "write_published_layout"]

TEACHERS: dict[str, TeacherSpec] = {
    "resnet101_gem": RESNET101_GEM,
    "resnet101_ap_gem": RESNET101_AP_GEM,
    "resnet101_solar": RESNET101_SOLAR,
    "resnet101_delg": RESNET101_DELG,
    "resnet101_dolg": RESNET101_DOLG,
    "mocov3": MOCOV3,
    "barlowtwins": BARLOWTWINS,
}
TEACHER_FILES: dict[str, str] = {name: spec.file for name, spec in TEACHERS.items()}
# How a timm teacher's descriptor is pooled (--teacher_pool); the paper's teachers have their own (GeM).
TEACHER_POOLS = timm_teacher.POOLS
NAMES_HELP = f"{', '.join(TEACHERS)}, or timm:<model name> (any timm model, e.g. timm:vit_base_patch14_dinov2)"


def check_teacher_name(name: str) -> None:
    """``ValueError`` unless ``name`` is one of the paper's teachers or ``timm:<a model timm knows>``."""
    if is_timm_name(name):
        timm_teacher.model_name(name)
    elif name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; valid names: {NAMES_HELP}")


def teacher_file(name: str, weights_dir: str | os.PathLike) -> Path:
    """Where the weights of teacher ``name`` are read under ``weights_dir``."""
    if is_timm_name(name):
        return timm_teacher.weight_file(name, weights_dir)
    return Path(weights_dir) / _spec(name).file


def descriptor_dim(name: str, pool: str = "pre_logits") -> int:
    """The size of the teacher's raw descriptor (the input of its PCA-whitening); ``pool`` matters for timm ones."""
    if is_timm_name(name):
        return timm_teacher.descriptor_dim(name, pool)
    return _spec(name).descriptor_dim


def check_teacher_pool(teachers: list[str], pool: str) -> None:
    """``--teacher_pool`` other than the default needs a timm teacher to pool (``UsageError`` otherwise)."""
    if pool != "pre_logits" and not any(is_timm_name(name) for name in teachers):
        raise UsageError(f"--teacher_pool {pool} applies to timm: teachers only, and none is given; the paper's "
                         "teachers and the students pool with GeM(-p)")


def check_embed_dim(name: str, embed_dim: int, pool: str = "pre_logits") -> None:
    """A PCA-whitening can only reduce a teacher's descriptor: ``--embed_dim`` at most its size."""
    dim = descriptor_dim(name, pool)
    if embed_dim > dim:
        raise UsageError(f"--embed_dim {embed_dim} is larger than the {dim}-d descriptor of teacher {name}; a "
                         "PCA-whitening can only reduce it")


def check_teacher_file(name: str, weights_dir: str | os.PathLike, trust: bool = False) -> Path:
    """Before any work: the teacher's file exists and looks like its weights (a timm file: every key and shape);
    returns its path."""
    path = teacher_file(name, weights_dir)
    if is_timm_name(name):
        timm_teacher.check_file(name, path, trust)
        return path
    if not path.is_file():
        raise CheckpointError(f"teacher {name}: weight file not found: {path}. Download the published teacher "
                              "weights into --path_to_pretrained_weights.")
    not_torch = describe_non_checkpoint(path)
    if not_torch is not None:
        raise CheckpointError(f"teacher {name}: weight file {path} is not a PyTorch checkpoint: it is {not_torch}. "
                              "Download it again.")
    return path


def _spec(name: str) -> TeacherSpec:
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; valid names: {NAMES_HELP}")
    return TEACHERS[name]


def build_teacher(name: str, weights_dir: str | os.PathLike | None = None, gem_p: float = 3.0,
                  trust: bool = False, pool: str = "pre_logits") -> nn.Module:
    """The teacher ``name`` in eval mode, with ``.embed_dim``. Input: ImageNet-normalised RGB (B, 3, H, W);
    output: its raw global descriptor (B, embed_dim), before any L2/PCA. ``weights_dir=None``: random
    initialisation (deterministic for torch's global seed), no file read. ``pool``: a timm teacher's descriptor
    (``pre_logits`` or ``gem``); the paper's teachers always pool with GeM(``gem_p``)."""
    if is_timm_name(name):
        if weights_dir is None:
            return timm_teacher.random_teacher(name, pool, gem_p).eval()
        return timm_teacher.teacher_from_file(name, teacher_file(name, weights_dir), pool, gem_p, trust)
    spec = _spec(name)
    if weights_dir is None:
        teacher = spec.build(gem_p=gem_p)
        teacher.teacher_name = name
        return teacher.eval()
    path = Path(weights_dir) / spec.file
    checkpoint = load_file(path, trust=trust, what=f"teacher {name}")
    return teacher_from_checkpoint(name, checkpoint, gem_p=gem_p, source=f"teacher {name} file {path}")


def teacher_from_checkpoint(name: str, checkpoint: Any, gem_p: float = 3.0, source: str | None = None) -> nn.Module:
    """Build teacher ``name`` from an already loaded published checkpoint (the dict ``torch.load`` returns).

    The module is built without initialising its weights (meta device) and takes the checkpoint's tensors."""
    spec = _spec(name)
    source = source or f"teacher {name} checkpoint"
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(spec.container), Mapping):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{source}: expected a dict with the entry '{spec.container}' holding the weights, "
                              f"found {found}. Is this the published {spec.file}?")
    dims = spec.read_dims(checkpoint, source)
    with torch.device("meta"):
        teacher = spec.build(gem_p=gem_p, **dims)
    state = _module_state(spec, teacher, checkpoint[spec.container], source)
    teacher.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in itertools.chain(teacher.named_parameters(), teacher.named_buffers()) if t.is_meta]
    if leftover:  # a tensor outside the state_dict would stay uninitialised: a bug in the module, not the file
        raise RuntimeError(f"teacher {name}: tensors not covered by the checkpoint: {leftover[:5]}")
    teacher.teacher_name = name
    return teacher.eval()


def _module_state(spec: TeacherSpec, teacher: nn.Module, state: Mapping[str, Any], source: str
                  ) -> dict[str, torch.Tensor]:
    """The paper's remap in file-key terms: drop what its loader drops, require everything else to match."""
    own = teacher.state_dict()
    file_to_module = {spec.file_key(key): key for key in own}
    kept = {key: value for key, value in state.items() if not spec.dropped(key)}
    expected = {file_key: own[module_key] for file_key, module_key in file_to_module.items()}
    expected.update({key: torch.empty(spec.extra_keys[key][0], device="meta") for key in spec.required_extra})
    check_state_dict(expected, kept, source, f"The file must have the published layout of {spec.file}.")
    return {module_key: kept[file_key].to(own[module_key].dtype) for file_key, module_key in file_to_module.items()}


def published_checkpoint(name: str, teacher: nn.Module) -> dict[str, Any]:
    """The teacher's weights as the published file holds them: container entry, meta entries, and every published
    key, the ones the loader ignores filled with random values (global torch RNG)."""
    spec = _spec(name)
    built_as = getattr(teacher, "teacher_name", name)
    if not isinstance(teacher, spec.module_type) or built_as != name:
        raise ValueError(f"write_published_layout({name!r}, ...) got a {type(teacher).__name__} built as "
                         f"{built_as!r}; pass the teacher that build_teacher({name!r}) returned")
    state = {spec.file_key(key): value.detach().to("cpu", copy=True) for key, value in teacher.state_dict().items()}
    for key, (shape, dtype) in spec.extra_keys.items():
        state[key] = random_tensor(shape, dtype)
    return {**spec.write_meta(teacher), spec.container: state}


def write_published_layout(name: str, teacher: nn.Module, path: str | os.PathLike) -> None:
    """Write ``teacher`` to ``path`` in the published file layout of ``name`` (atomically; a timm teacher: its
    state_dict as timm keeps it); ``build_teacher(name, W)`` reloads it identically when ``path`` is
    ``teacher_file(name, W)``."""
    if is_timm_name(name):
        if not isinstance(teacher, timm_teacher.TimmTeacher) or teacher.teacher_name != name:
            raise ValueError(f"write_published_layout({name!r}, ...) got a {type(teacher).__name__} built as "
                             f"{getattr(teacher, 'teacher_name', None)!r}; pass the teacher build_teacher({name!r}) "
                             "returned")
        timm_teacher.save_teacher(teacher, path)
        return
    save_atomic(published_checkpoint(name, teacher), path)
