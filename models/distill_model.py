"""The distillation's modules, arranged as DeiT's: DDP wraps only ``DistillModel`` (the student, under the
``base_encoder`` name of the released checkpoints), and the frozen whitened teachers run beside it, inside the
criterion ``DistillationLoss``, without gradient. So DDP syncs, SyncBatchNorm converts, the optimizer updates and
``state_dict()`` holds the student only, with no special casing.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.loss import MultiTeacherDistillLoss
from models.pca_layer import PCAWhitening, load_teacher_pca
from utils.runtime import channels_last


class WhitenedTeachers(nn.Module):
    """Frozen teachers, each followed by L2-normalisation and its PCA-whitening; always in eval mode."""

    def __init__(self, names: Sequence[str], weights_dir: str | os.PathLike | None = None, gem_p: float = 3.0,
                 embed_dim: int = 512, trust: bool = False,
                 pca_layers: dict[str, PCAWhitening] | None = None, pool: str = "pre_logits",
                 pca_data: str = "gldv2") -> None:
        """``pool``: how timm teachers pool (``--teacher_pool``); ``pca_data``: the data their PCA files were learned
        on (``gldv2``/``svd``). The paper's teachers have their own pooling and PCA files."""
        super().__init__()
        names = list(names)
        if not names:
            raise ValueError("at least one teacher is needed (-t/--teachers)")
        pca_layers = dict(pca_layers or {})
        if weights_dir is None and set(pca_layers) != set(names):
            raise ValueError("without --path_to_pretrained_weights the teachers are random and their PCA layers "
                             f"must be given explicitly (missing for {sorted(set(names) - set(pca_layers))})")
        from models.teachers import build_teacher  # imported here: the teacher package is heavy

        encoders, whitenings = [], []
        for name in names:
            encoders.append(build_teacher(name, weights_dir, gem_p, trust, pool))
            whitenings.append(pca_layers[name] if name in pca_layers else
                              load_teacher_pca(weights_dir, name, embed_dim, trust, data=pca_data, pool=pool,
                                               gem_p=gem_p))
        self._setup(names, encoders, whitenings)

    @classmethod
    def from_modules(cls, teachers: dict[str, nn.Module], pca_layers: dict[str, PCAWhitening]) -> WhitenedTeachers:
        """Wrap already built teachers and PCA layers (tests, demo, PCA learning flows)."""
        if set(teachers) != set(pca_layers):
            raise ValueError(f"teachers {sorted(teachers)} and PCA layers {sorted(pca_layers)} must name the same set")
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        names = list(teachers)
        obj._setup(names, [teachers[n] for n in names], [pca_layers[n] for n in names])
        return obj

    def _setup(self, names: list[str], encoders: list[nn.Module], whitenings: list[PCAWhitening]) -> None:
        for name, enc, pca in zip(names, encoders, whitenings):
            enc_dim = getattr(enc, "embed_dim", None)
            if enc_dim is not None and int(enc_dim) != pca.in_dim:
                raise ValueError(f"teacher {name} outputs {enc_dim}-d descriptors but its PCA layer expects "
                                 f"{pca.in_dim}-d input; the PCA file belongs to another teacher")
        self.names = names
        self.encoders = nn.ModuleList(encoders)
        self.whitenings = nn.ModuleList(whitenings)
        self.embed_dims = [pca.out_dim for pca in whitenings]
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> WhitenedTeachers:
        """Teachers stay in eval mode whatever the caller asks (BN statistics and dropout frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's ``pca(L2(teacher(x)))`` (the loss L2-normalises after the PCA). Channels-last input:
        10-30 % faster on CPU (benchmarks/embedding_cost.py), equal up to float rounding."""
        x = channels_last(x)
        outs = []
        for encoder, pca in zip(self.encoders, self.whitenings):
            outs.append(pca(F.normalize(encoder(x).float(), p=2, dim=-1)))
        return outs


class DistillModel(nn.Module):
    """``forward(x1, x2) -> (student(x1), student(x2))``: the module DDP wraps (``module.base_encoder.*`` keys)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.base_encoder = student

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the student keeps the input's memory layout: channels-last gradients would not match DDP's buckets
        return self.base_encoder(x1), self.base_encoder(x2)


class DistillationLoss(nn.Module):
    """The criterion that owns the frozen teachers (DeiT's ``DistillationLoss``): ``forward(x1, x2, s1, s2)``
    embeds both views with the whitened teachers, without gradient, and returns ``loss``'s named terms. Without
    teachers (training from a teacher cache), ``forward`` takes their embeddings instead (``cached``)."""

    def __init__(self, teachers: WhitenedTeachers | None, loss: MultiTeacherDistillLoss,
                 student_dim: int | None = None) -> None:
        super().__init__()
        if teachers is not None:
            wrong = [f"{n}: {d}-d" for n, d in zip(teachers.names, teachers.embed_dims) if d != student_dim]
            if student_dim is not None and wrong:  # the similarity matrices would not tell: N x N for any D
                raise ValueError(f"the student embeds into {student_dim} dimensions but the whitened teachers into "
                                 f"{', '.join(wrong)}; --embed_dim must be the PCA-whitening's output size")
        self.teachers = teachers
        self.loss = loss

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                cached: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        if cached is not None:
            t1, t2 = cached
        elif self.teachers is None:
            raise ValueError("DistillationLoss without teachers needs their cached embeddings")
        else:
            with torch.no_grad():
                t1, t2 = self.teachers(x1), self.teachers(x2)
        return self.loss(s1, s2, t1, t2)
