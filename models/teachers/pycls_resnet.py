"""The pycls ResNet trunk used by the DELG and DOLG teachers (key names ``stem``, ``s1..s4``, ``bK``, ``f.a``...).

Same network as torchvision's ResNet v1.5 (stride on the 3x3 conv, BN eps 1e-5, ReLU), but with pycls names and
pycls initialisation (zero-initialised final BN gamma of each residual branch).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class BottleneckTransform(nn.Module):
    """1x1, BN, ReLU, 3x3 (stride), BN, ReLU, 1x1, BN."""

    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out)
        self.c_bn.final_bn = True
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.a_bn(self.a(x)))
        x = self.relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    """relu(shortcut(x) + f(x)); the shortcut is a strided 1x1 conv + BN when the shape changes."""

    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int) -> None:
        super().__init__()
        if w_in != w_out or stride != 1:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        else:
            self.proj = None
        self.f = BottleneckTransform(w_in, w_out, stride, w_b)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.bn(self.proj(x))
        return self.relu(shortcut + self.f(x))


def _stage(w_in: int, w_out: int, stride: int, depth: int, w_b: int) -> nn.Sequential:
    blocks = [(f"b{i + 1}", ResBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, w_b))
              for i in range(depth)]
    return nn.Sequential(OrderedDict(blocks))


class Stem(nn.Module):
    """7x7/2 conv, BN, ReLU, 3x3/2 max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


def pycls_init_(module: nn.Module) -> None:
    """pycls ResNet init: conv N(0, sqrt(2/fan_out)), BN 1/0 (final BN gamma 0), Linear N(0, 0.01) with zero bias."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 0.0 if getattr(module, "final_bn", False) else 1.0)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.01)
        nn.init.zeros_(module.bias)


class PyclsResNet(nn.Module):
    """stem -> s1..s4 (widths 256..2048); returns the s4 map, or ``head(s4)`` when a head is given (DELG keeps its
    global head inside this module, so its keys read ``globalmodel.head.*``)."""

    def __init__(self, depth: int = 101, head: nn.Module | None = None) -> None:
        super().__init__()
        d1, d2, d3, d4 = _DEPTHS[depth]
        self.stem = Stem()
        self.s1 = _stage(64, 256, 1, d1, 64)
        self.s2 = _stage(256, 512, 2, d2, 128)
        self.s3 = _stage(512, 1024, 2, d3, 256)
        self.s4 = _stage(1024, 2048, 2, d4, 512)
        self.head = head
        self.apply(pycls_init_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s4(self.s3(self.s2(self.s1(self.stem(x)))))
        return x if self.head is None else self.head(x)
