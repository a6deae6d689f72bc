"""Student networks: a CNN trunk -> GeM -> L2-normalise -> Linear(feat_dim, embed_dim).

The ResNet students keep torchvision's key names, so their state_dict (prefixed ``module.base_encoder.``) is
exactly the layout of the released student checkpoints. The fc input is always the trunk width (512 for
ResNet18/34), which fixes the paper's ``Linear(embed_dim, embed_dim)`` bug (B12) for ``embed_dim != 512``.
Beyond the paper, ``arch='timm:<name>'`` takes any timm CNN trunk with the same head.
"""
from __future__ import annotations

import logging
import os
import re
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.gem import GeM
from models.timm_names import TIMM_PREFIX, timm_model_name
from utils.checkpoint import CheckpointError, load_file, load_state_strict

STUDENT_ARCHS = ("resnet18", "resnet34")
CHECKPOINT_PREFIX = "module.base_encoder."
_RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights"}

logger = logging.getLogger(__name__)


class GeMStudent(nn.Module):
    """Shared head: ``fc(L2(GeM_p(features(x))))``; the fc output is left unnormalised, as in the paper."""

    def _add_head(self, feat_dim: int, embed_dim: int, gem_p: float) -> None:
        """Called after the trunk is registered, so ``fc`` comes last in the state_dict (torchvision order)."""
        self.feat_dim = feat_dim
        self.embed_dim = embed_dim
        self.pool = GeM(gem_p)
        self.fc = nn.Linear(feat_dim, embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.features(x))
        return self.fc(F.normalize(pooled, p=2, dim=1))


class ResNetStudent(GeMStudent):
    """torchvision ResNet18/34 layers registered at the top level so the keys are ``conv1, bn1, layer1..4, fc``."""

    def __init__(self, arch: str, embed_dim: int = 512, gem_p: float = 3.0) -> None:
        super().__init__()
        self.arch = arch
        trunk = getattr(torchvision.models, arch)(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(trunk, name))
        self._add_head(trunk.fc.in_features, embed_dim, gem_p)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TimmStudent(GeMStudent):
    """A timm CNN built with ``num_classes=0, global_pool=''`` (all of its layers run; output is a 4D map)."""

    def __init__(self, name: str, embed_dim: int = 512, gem_p: float = 3.0, pretrained: bool = False) -> None:
        import timm

        super().__init__()
        self.arch = TIMM_PREFIX + name
        timm_model_name(self.arch, "-a")
        try:
            self.trunk = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
        except (OSError, RuntimeError, urllib.error.URLError) as exc:
            if not pretrained:
                raise
            raise _pretrained_error(self.arch, "the Hugging Face hub cache (HF_HOME)", exc) from exc
        self._add_head(_probe_feature_dim(self.trunk, name), embed_dim, gem_p)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def _probe_feature_dim(trunk: nn.Module, name: str) -> int:
    """Run one small image through the trunk to learn its channel count and make sure it keeps a spatial map."""
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.zeros(1, 3, 64, 64))
    trunk.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"-a timm:{name}: the trunk returns {shape}, not a (B, C, H, W) feature map; "
                         "only CNN-style timm models (e.g. timm:mobilenetv3_large_100, timm:efficientnet_b0) work "
                         "with the GeM head.")
    return int(out.shape[1])


def _pretrained_error(arch: str, cache: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot get ImageNet weights for student -a {arch} ({type(exc).__name__}: {exc}). Without network access "
        f"either train from scratch with --student_init random, or place the weight file in {cache}.")


def _load_torchvision_imagenet(student: ResNetStudent, arch: str) -> None:
    """Paper behaviour: torchvision's ImageNet weights (same files as the paper's model_urls) without fc."""
    weights = getattr(torchvision.models, _TORCHVISION_WEIGHTS[arch]).IMAGENET1K_V1
    cache_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except (OSError, urllib.error.URLError, RuntimeError) as exc:
        raise _pretrained_error(arch, f"{cache_file.parent} (as {cache_file.name})", exc) from exc
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = student.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"fc.weight", "fc.bias"}:
        raise CheckpointError(f"torchvision ImageNet weights for {arch} ({cache_file}) do not match the student: "
                              f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    logger.info("student %s initialised from torchvision ImageNet weights (fc left random)", arch)


def check_student_arch(arch: str) -> None:
    """``ValueError`` unless ``arch`` is ``resnet18``, ``resnet34`` or ``timm:<a timm model name>``."""
    if arch in STUDENT_ARCHS:
        return
    if arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX):
        timm_model_name(arch, "-a")
        return
    raise ValueError(f"unknown student architecture '{arch}'; choose one of {', '.join(STUDENT_ARCHS)} "
                     "or timm:<model name> (e.g. timm:mobilenetv3_large_100)")


def build_student(arch: str, embed_dim: int = 512, gem_p: float = 3.0, pretrained: bool = False) -> nn.Module:
    """Student network for ``-a arch``: ``resnet18``, ``resnet34`` or ``timm:<name>``."""
    if embed_dim <= 0:
        raise ValueError(f"--embed_dim must be positive, got {embed_dim}")
    check_student_arch(arch)
    if arch in STUDENT_ARCHS:
        student = ResNetStudent(arch, embed_dim, gem_p)
        if pretrained:
            _load_torchvision_imagenet(student, arch)
        return student
    return TimmStudent(arch[len(TIMM_PREFIX):], embed_dim, gem_p, pretrained)


def student_checkpoint_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights keyed as the released checkpoints' ``state_dict`` (``module.base_encoder.<key>``)."""
    student = getattr(student, "module", student)  # accept a DDP-wrapped student too
    return {CHECKPOINT_PREFIX + k: v for k, v in student.state_dict().items()}


def _describe_resnet_file(state: dict[str, torch.Tensor]) -> str:
    """Guess ``-a``/``--embed_dim`` from a file's keys, for the error message of a mismatching load."""
    hints = []
    fc = state.get("fc.weight")
    if isinstance(fc, torch.Tensor) and fc.dim() == 2:
        hints.append(f"--embed_dim {fc.shape[0]}")
    if any(k.startswith("trunk.") for k in state):
        hints.insert(0, "-a timm:<the model it was trained with>")
        return " ".join(hints)
    if any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in state):
        hints.insert(0, "(a Bottleneck ResNet, not a student arch)")
        return " ".join(hints)
    blocks = []
    for layer in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    for arch, layers in _RESNET_LAYERS.items():
        if tuple(blocks) == layers:
            hints.insert(0, f"-a {arch}")
    return " ".join(hints)


def load_student(path: str | os.PathLike, arch: str, embed_dim: int = 512, gem_p: float = 3.0,
                 trust: bool = False) -> nn.Module:
    """Load a released student checkpoint or this project's training checkpoint; returns the model in eval mode, its
    ``trained_epochs`` attribute the checkpoint's ``epoch`` (None when it has none)."""
    ckpt = load_file(path, trust=trust, what="student checkpoint")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        full_state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and any(str(k).startswith(CHECKPOINT_PREFIX) for k in ckpt):
        full_state = ckpt
    else:
        found = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"student checkpoint {path}: expected a dict with a 'state_dict' entry of "
                              f"'{CHECKPOINT_PREFIX}*' keys (a released or gld_distill/svd_distill checkpoint); "
                              f"found {found}")
    # as the paper's eval scripts: keep the student keys, strip the prefix, drop everything else
    state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in full_state.items() if k.startswith(CHECKPOINT_PREFIX)}
    if not state:
        raise CheckpointError(f"student checkpoint {path}: no '{CHECKPOINT_PREFIX}*' keys in its state_dict "
                              f"(first keys: {list(full_state)[:5]}); is it a teacher or PCA file?")
    student = build_student(arch, embed_dim=embed_dim, gem_p=gem_p, pretrained=False)
    guess = _describe_resnet_file(state)
    load_state_strict(student, state, f"student checkpoint {path} does not match -a {arch} --embed_dim {embed_dim}",
                      f"The file looks like {guess}." if guess else "")
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("state_dict"), dict) else None
    student.trained_epochs = int(epoch) if isinstance(epoch, int) else None
    return student.eval()
