"""torchvision ResNet trunks with GeM -> L2 -> fc: the GeM (cirtorch gl18) and AP-GeM (naver) teachers.

The self-supervised teachers in ``ssl.py`` use the same module without fc. Key names are torchvision's, as in the
paper's ``models/resnet.py`` (a copy of torchvision 0.12's ResNet v1.5 whose forward L2-normalises before fc).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from models.gem import GeM
from models.teachers.spec import TeacherSpec, identity_key, meta_int, prefixed

_LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class ResNetGeM(ResNet):
    """torchvision ResNet{50,101} -> GeM(p) -> L2 -> fc (``Linear(2048, out_dim)``, or Identity when ``out_dim`` is
    None). The GeM exponent is fixed (never read from a file), as every teacher in the paper's code."""

    def __init__(self, depth: int = 101, out_dim: int | None = None, gem_p: float = 3.0) -> None:
        super().__init__(Bottleneck, _LAYERS[depth], num_classes=out_dim or 1)
        self.avgpool = GeM(gem_p)
        if out_dim is None:
            self.fc = nn.Identity()
        self.embed_dim = out_dim or 512 * Bottleneck.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.normalize(self.avgpool(x), dim=-1))


def build_resnet101_fc(gem_p: float = 3.0, out_dim: int = 2048) -> ResNetGeM:
    return ResNetGeM(101, out_dim, gem_p)


def _gem_dims(checkpoint: Any, source: str) -> dict[str, int]:
    return {"out_dim": meta_int(checkpoint, "meta", "outputdim", source)}


def _ap_gem_dims(checkpoint: Any, source: str) -> dict[str, int]:
    return {"out_dim": meta_int(checkpoint, "model_options", "out_dim", source)}


def _ap_gem_dropped(key: str) -> bool:
    # The paper keeps keys starting with "module" (stripping "module."), except the learned GeM exponent.
    return not key.startswith("module") or key == "module.adpool.p"


# The gl18 file is already re-keyed to torchvision names plus fc.*: module and file keys coincide.
RESNET101_GEM = TeacherSpec(
    file="gl18-tl-resnet101-gem-w-a4d43db.pt",
    descriptor_dim=2048,
    container="state_dict",
    module_type=ResNetGeM,
    build=build_resnet101_fc,
    file_key=identity_key,
    read_dims=_gem_dims,
    write_meta=lambda teacher: {"meta": {"outputdim": teacher.embed_dim}},
)

RESNET101_AP_GEM = TeacherSpec(
    file="Resnet101-AP-GeM-LM18.pt",
    descriptor_dim=2048,
    container="state_dict",
    module_type=ResNetGeM,
    build=build_resnet101_fc,
    file_key=prefixed("module."),
    dropped=_ap_gem_dropped,
    extra_keys={"module.adpool.p": ((1,), torch.float32)},
    read_dims=_ap_gem_dims,
    write_meta=lambda teacher: {"model_options": {"out_dim": teacher.embed_dim}},
)
