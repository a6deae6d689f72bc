"""DOLG teacher as the paper uses it: pycls ResNet101 -> GeM(p) on s4 -> fc_t (2048 -> 1024), no L2, on BGR input.

The paper's DOLG forward returns right after ``fc_t``: the local branch, orthogonal fusion, final ``fc`` and ArcFace
classifier are commented out. Those unused modules are not built here, but their keys must still be present in
the file with the right shapes (the paper loads them strictly), and ``pool1.p`` must exist (the loader pops it).
"""
from __future__ import annotations

import torch
from torch import nn

from models.gem import GeM
from models.teachers.pycls_resnet import PyclsResNet
from models.teachers.spec import TeacherSpec, identity_key


class DOLGTeacher(nn.Module):
    """Input: ImageNet-normalised RGB; the channels are flipped to BGR here, as the DOLG weights expect."""

    def __init__(self, gem_p: float = 3.0) -> None:
        super().__init__()
        self.pool_g = GeM(gem_p)
        self.fc_t = nn.Linear(2048, 1024)
        self.globalmodel = PyclsResNet(101)
        self.embed_dim = 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_t(self.pool_g(self.globalmodel(x[:, [2, 1, 0]])))


_F32 = torch.float32
# Unused heads of the paper's DOLG module (loaded strictly there, so required here), with their shapes.
_UNUSED_HEADS = {
    "fc.weight": ((512, 2048), _F32),
    "fc.bias": ((512,), _F32),
    "localmodel.conv1.weight": ((1024, 1024, 1, 1), _F32),
    "localmodel.conv1.bias": ((1024,), _F32),
    "localmodel.bn.weight": ((1024,), _F32),
    "localmodel.bn.bias": ((1024,), _F32),
    "localmodel.bn.running_mean": ((1024,), _F32),
    "localmodel.bn.running_var": ((1024,), _F32),
    "localmodel.bn.num_batches_tracked": ((), torch.int64),
    "localmodel.conv2.weight": ((1, 1024, 1, 1), _F32),
    "localmodel.conv2.bias": ((1,), _F32),
    "desc_cls.weight": ((81313, 512), _F32),
    "desc_cls.t": ((1,), _F32),
    "pool1.p": ((1,), _F32),
}

RESNET101_DOLG = TeacherSpec(
    file="r101_dolg_512.pyth",
    descriptor_dim=1024,
    container="model_state",
    module_type=DOLGTeacher,
    build=DOLGTeacher,
    file_key=identity_key,
    dropped=lambda key: key == "pool_g.p",  # overwritten with -p by the paper's loader, so optional
    extra_keys={"pool_g.p": ((1,), _F32), **_UNUSED_HEADS},
    required_extra=frozenset(_UNUSED_HEADS),
)
