"""Self-supervised ResNet50 teachers (MoCo v3, Barlow Twins): the trunk -> GeM -> L2, heads discarded.

The paper's loaders keep only the online backbone (``module.base_encoder.*`` minus its projector ``fc``, or
``module.backbone.*``) and silently drop every other key of the file (predictor, momentum encoder, projector).
"""
from __future__ import annotations

import torch

from models.teachers.resnet_gem import ResNetGeM
from models.teachers.spec import TeacherSpec, prefixed


def build_resnet50_trunk(gem_p: float = 3.0) -> ResNetGeM:
    return ResNetGeM(50, None, gem_p)


def _mocov3_dropped(key: str) -> bool:
    return not key.startswith("module.base_encoder") or key.startswith("module.base_encoder.fc")


def _barlowtwins_dropped(key: str) -> bool:
    return not key.startswith("module.backbone")


# The extra keys are the ones listed in the published layout description (the real files hold the full heads,
# which the loader drops all the same).
MOCOV3 = TeacherSpec(
    file="mocov3_1000ep.pth.tar",
    descriptor_dim=2048,
    container="state_dict",
    module_type=ResNetGeM,
    build=build_resnet50_trunk,
    file_key=prefixed("module.base_encoder."),
    dropped=_mocov3_dropped,
    extra_keys={
        "module.base_encoder.fc.0.weight": ((16, 2048), torch.float32),
        "module.predictor.0.weight": ((16, 256), torch.float32),
        "module.momentum_encoder.conv1.weight": ((64, 3, 7, 7), torch.float32),
    },
)

BARLOWTWINS = TeacherSpec(
    file="barlowtwins_full.pth.tar",
    descriptor_dim=2048,
    container="model",
    module_type=ResNetGeM,
    build=build_resnet50_trunk,
    file_key=prefixed("module.backbone."),
    dropped=_barlowtwins_dropped,
    extra_keys={
        "module.projector.0.weight": ((16, 2048), torch.float32),
        "module.bn.running_mean": ((16,), torch.float32),
    },
)
