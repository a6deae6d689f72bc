"""Student + frozen whitened teachers, the module the training scripts wrap in DistributedDataParallel.

The teachers are deliberately *not* registered as a submodule of ``DistillModel``: DDP then sees (and syncs,
and broadcasts buffers of) the student only, ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts only the
student, the optimizer gets only student parameters, and ``state_dict()`` holds exactly the ``base_encoder.*``
keys of the paper's checkpoints. ``.to()/.cuda()`` still move the teachers (``_apply`` forwards to them).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.pca_layer import PCAWhitening, load_pca_layer, pca_weight_path
from utils.runtime import channels_last


class WhitenedTeachers(nn.Module):
    """Frozen teachers, each followed by L2-normalisation and its PCA-whitening; always in eval mode."""

    def __init__(self, names: Sequence[str], weights_dir: str | os.PathLike | None = None, gem_p: float = 3.0,
                 embed_dim: int = 512, trust: bool = False,
                 pca_layers: dict[str, PCAWhitening] | None = None) -> None:
        super().__init__()
        names = list(names)
        if not names:
            raise ValueError("at least one teacher is needed (-t/--teachers)")
        pca_layers = dict(pca_layers or {})
        if weights_dir is None and set(pca_layers) != set(names):
            raise ValueError("without --path_to_pretrained_weights the teachers are random and their PCA layers "
                             f"must be given explicitly (missing for {sorted(set(names) - set(pca_layers))})")
        from models.teachers import build_teacher  # imported here: the teacher package is heavy

        encoders, norms = [], []
        for name in names:
            encoders.append(build_teacher(name, weights_dir, gem_p, trust))
            norms.append(pca_layers[name] if name in pca_layers else
                         _load_teacher_pca(weights_dir, name, embed_dim, trust))
        self._setup(names, encoders, norms)

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

    def _setup(self, names: list[str], encoders: list[nn.Module], norms: list[PCAWhitening]) -> None:
        for name, enc, pca in zip(names, encoders, norms):
            enc_dim = getattr(enc, "embed_dim", None)
            if enc_dim is not None and int(enc_dim) != pca.in_dim:
                raise ValueError(f"teacher {name} outputs {enc_dim}-d descriptors but its PCA layer expects "
                                 f"{pca.in_dim}-d input; the PCA file belongs to another teacher")
        self.names = names
        self.encoders = nn.ModuleList(encoders)
        self.norm_layers = nn.ModuleList(norms)
        self.embed_dims = [pca.out_dim for pca in norms]
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> WhitenedTeachers:
        """Teachers stay in eval mode whatever the caller asks (BN statistics and dropout frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for encoder, pca in zip(self.encoders, self.norm_layers):
            feat = F.normalize(encoder(x).float(), p=2, dim=-1)
            outs.append(pca(feat))  # not normalised after PCA: the loss does it
        return outs


def _load_teacher_pca(weights_dir: str | os.PathLike, name: str, embed_dim: int, trust: bool) -> PCAWhitening:
    path = pca_weight_path(weights_dir, name, embed_dim)
    if not path.is_file():
        raise FileNotFoundError(f"PCA-whitening file for teacher {name} not found: {path}. Learn it with "
                                "gld_pca_learn.py / svd_pca_learn.py (--dump_to), or check "
                                "--path_to_pretrained_weights and --embed_dim.")
    return load_pca_layer(path, trust=trust, out_dim=embed_dim)


class DistillModel(nn.Module):
    """``forward(x1, x2) -> (student(x1), student(x2), teachers(x1), teachers(x2))``; only the student is a child."""

    def __init__(self, student: nn.Module, teachers: WhitenedTeachers) -> None:
        super().__init__()
        student_dim = getattr(student, "embed_dim", None)
        wrong = [f"{n}: {d}-d" for n, d in zip(teachers.names, teachers.embed_dims) if d != student_dim]
        if student_dim is not None and wrong:  # the similarity matrices would not tell: they are N x N for any D
            raise ValueError(f"the student embeds into {student_dim} dimensions but the whitened teachers into "
                             f"{', '.join(wrong)}; --embed_dim must be the PCA-whitening's output size")
        self.base_encoder = student
        object.__setattr__(self, "teacher_encoders", teachers)  # kept out of the module tree on purpose

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DistillModel:
        super()._apply(fn, recurse)
        self.teacher_encoders._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> DistillModel:
        super().train(mode)
        self.teacher_encoders.train(False)
        return self

    def forward(self, x1: torch.Tensor, x2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        return self.base_encoder(x1), self.base_encoder(x2), self.teacher_features(x1), self.teacher_features(x2)

    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teachers on channels-last input (10-30% faster on CPU, see benchmarks/embedding_cost.py).
        The student keeps the input's layout: channels-last gradients would not match DDP's bucket layout."""
        return self.teacher_encoders(channels_last(x))
