"""SOLAR teacher: ResNet101 with second-order attention (SOA) after conv4_x and conv5_x, then GeM -> L2 -> whiten.

The published file keeps cirtorch's names: ``features.*`` (the trunk, split into ``conv1``/``conv2_x``/... as in
SOLAR's ``ResNetSOAs``), ``pool.p`` (a learned GeM exponent, discarded) and ``whiten.*`` (the final Linear).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet101

from models.gem import GeM
from models.teachers.spec import TeacherSpec, meta_int


class SOABlock(nn.Module):
    """Second-order (non-local) attention: x + v(softmax(mid^-0.5 f(x)^T g(x)) h(x)), all 1x1 convs with bias."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.mid = channels // reduction
        self.f = nn.Sequential(nn.Conv2d(channels, self.mid, 1), nn.BatchNorm2d(self.mid), nn.ReLU())
        self.g = nn.Sequential(nn.Conv2d(channels, self.mid, 1), nn.BatchNorm2d(self.mid), nn.ReLU())
        self.h = nn.Conv2d(channels, self.mid, 1)
        self.v = nn.Conv2d(self.mid, channels, 1)
        # SOLAR's init: Kaiming for f, g, h and zeros for v, so a fresh block is the identity.
        for conv in (self.f[0], self.g[0], self.h):
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.v.weight)
        nn.init.zeros_(self.v.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        query = self.f(x).flatten(2)  # (B, mid, N)
        key = self.g(x).flatten(2)
        value = self.h(x).flatten(2)
        attn = torch.softmax(self.mid ** -0.5 * query.transpose(1, 2) @ key, dim=-1)  # (B, N, N)
        out = (attn @ value.transpose(1, 2)).transpose(1, 2).reshape(b, self.mid, h, w)
        return x + self.v(out)


class ResNetSOAs(nn.Module):
    """torchvision ResNet101 regrouped as SOLAR names it, with SOA blocks on conv4_x (k=4) and conv5_x (k=2).

    SOLAR runs conv1..conv4_x under ``no_grad``; the teacher is frozen and run without gradients anyway, so this
    module keeps autograd intact instead."""

    def __init__(self) -> None:
        super().__init__()
        base = resnet101(weights=None)
        self.conv1 = nn.Sequential(base.conv1, base.bn1)
        self.conv2_x = nn.Sequential(base.relu, base.maxpool, base.layer1)
        self.conv3_x = base.layer2
        self.conv4_x = base.layer3
        self.conv5_x = base.layer4
        self.soa4 = SOABlock(1024, 4)
        self.soa5 = SOABlock(2048, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4_x(self.conv3_x(self.conv2_x(self.conv1(x))))
        return self.soa5(self.conv5_x(self.soa4(x)))


class SolarTeacher(nn.Module):
    """backbone -> GeM(p) -> L2 -> fc (SOLAR's learned whitening)."""

    def __init__(self, gem_p: float = 3.0, out_dim: int = 2048) -> None:
        super().__init__()
        self.backbone = ResNetSOAs()
        self.pool = GeM(gem_p)
        self.fc = nn.Linear(2048, out_dim)
        self.embed_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.normalize(self.pool(self.backbone(x)), dim=-1))


def _file_key(key: str) -> str:
    if key.startswith("fc."):
        return "whiten." + key[len("fc."):]
    return "features." + key[len("backbone."):]


def _read_dims(checkpoint: Any, source: str) -> dict[str, int]:
    return {"out_dim": meta_int(checkpoint, "meta", "outputdim", source)}


RESNET101_SOLAR = TeacherSpec(
    file="resnet101-solar-best.pth",
    descriptor_dim=2048,
    container="state_dict",
    module_type=SolarTeacher,
    build=SolarTeacher,
    file_key=_file_key,
    extra_keys={"pool.p": ((1,), torch.float32)},
    required_extra=frozenset({"pool.p"}),  # popped without a default by the paper's loader
    read_dims=_read_dims,
    write_meta=lambda teacher: {"meta": {"outputdim": teacher.embed_dim}},
)
