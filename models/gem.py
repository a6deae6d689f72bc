"""Generalized-mean (GeM) pooling with a fixed, non-learned exponent.

The exponent is a plain Python number (never a parameter or buffer), so it never appears in a state_dict; the paper's
code overrides every checkpoint's learned exponent with the run's ``-p`` and this module mirrors that.
"""
from __future__ import annotations

import torch
from torch import nn


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, C). ``p == 1`` is a plain mean without clamping, as in the paper's code."""
    if p == 1:
        return x.mean(dim=(2, 3))
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling; output is (B, C), already flattened."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"
