"""DELG teacher (global branch only): pycls ResNet101 -> GeM(p) -> Linear(2048, 512), no L2, on BGR input.

The published pycls checkpoint also holds the local-feature branch (``localmodel.*``); the paper's loader keeps only
``globalmodel.*`` and overrides the learned exponent ``globalmodel.head.pool.p`` with the run's ``-p``.
"""
from __future__ import annotations

import torch
from torch import nn

from models.gem import GeM
from models.teachers.pycls_resnet import PyclsResNet
from models.teachers.spec import TeacherSpec, identity_key


class GlobalHead(nn.Module):
    """GeM -> Linear. (pycls pools with ``adaptive_avg_pool2d(1)`` of x^p, which equals GeM's mean over H, W.)"""

    def __init__(self, gem_p: float, in_dim: int = 2048, out_dim: int = 512) -> None:
        super().__init__()
        self.pool = GeM(gem_p)
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


class DELGTeacher(nn.Module):
    """Input: ImageNet-normalised RGB; the channels are flipped to BGR here, as the DELG weights expect."""

    def __init__(self, gem_p: float = 3.0) -> None:
        super().__init__()
        self.globalmodel = PyclsResNet(101, head=GlobalHead(gem_p))
        self.embed_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.globalmodel(x[:, [2, 1, 0]])


def _dropped(key: str) -> bool:
    return not key.startswith("globalmodel") or key == "globalmodel.head.pool.p"


RESNET101_DELG = TeacherSpec(
    file="r101_delg_s512.pyth",
    descriptor_dim=512,
    container="model_state",
    module_type=DELGTeacher,
    build=DELGTeacher,
    file_key=identity_key,
    dropped=_dropped,
    # The published layout lists one local-branch key as a stand-in for the whole branch.
    extra_keys={"globalmodel.head.pool.p": ((1,), torch.float32),
                "localmodel.conv1.weight": ((8, 4, 1, 1), torch.float32)},
)
