"""Evaluation-time model: a student (``-a -r``) or a teacher (``-t``, optionally ``--pca``) with the paper's
single- and multi-scale descriptors. Shared by ``oxford_paris_eval.py`` and ``svd_eval.py``.

* single scale: student ``model(x)``; teacher ``model(x)``, or ``pca(L2(model(x)))`` with ``--pca``
  (the scoring L2-normalises afterwards);
* multi-scale: ``utils.features.multiscale`` (per scale L2, then PCA and L2 for a whitened teacher; mean; L2).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.timm_names import is_timm_name
from utils.errors import UsageError
from utils.features import PAPER_SCALES, multiscale
from utils.runtime import channels_last


class EmbedderConfigError(UsageError, ValueError):
    """Inconsistent model flags (``-a``/``-r``/``-t``/``--pca``)."""


@dataclass
class Embedder:
    model: nn.Module
    post: nn.Module | None
    description: str
    epoch: int | None = None  # a student checkpoint's completed epochs (the step of --tensorboard's scalars)

    def to(self, device: torch.device) -> Embedder:
        self.model.to(device)
        if self.post is not None:
            self.post.to(device)
        return self

    @property
    def embed_dim(self) -> int:
        if self.post is not None:
            return int(self.post.dim2)
        return int(self.model.embed_dim)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(channels_last(x))

    def single(self, x: torch.Tensor) -> torch.Tensor:
        out = self._forward(x)
        if self.post is not None:
            out = self.post(F.normalize(out.float(), dim=-1))
        return out

    def multi(self, x: torch.Tensor, scales: Sequence[float] = PAPER_SCALES) -> torch.Tensor:
        return multiscale(self._forward, x, scales, post=self.post)


def check_model_flags(arch: str | None, resume: str | None, teacher: str | None, pca: bool,
                      embed_dim: int | None = None, pool: str = "pre_logits") -> None:
    """The flag combinations the eval scripts accept (the paper asserted or crashed on the others, B16)."""
    if arch is not None and teacher is not None:
        raise EmbedderConfigError("-a/--arch and -t/--teacher are mutually exclusive: evaluate a student "
                                  "(-a ARCH -r CKPT) or a teacher (-t NAME [--pca]).")
    if arch is None and teacher is None:
        raise EmbedderConfigError("give a model to evaluate: a student with -a ARCH -r CKPT, or a teacher with "
                                  "-t NAME [--pca].")
    if arch is not None and resume is None:
        raise EmbedderConfigError(f"-a {arch} needs -r/--resume CKPT, the student checkpoint to evaluate "
                                  "(a randomly initialised student is meaningless).")
    if teacher is not None and resume is not None:
        raise EmbedderConfigError("-r/--resume is for students (-a); a teacher's weights are read from "
                                  "--path_to_pretrained_weights.")
    if pca and teacher is None:
        raise EmbedderConfigError("--pca applies to teachers only (-t NAME --pca); students are already "
                                  "distilled into the whitened space.")
    if pool != "pre_logits":
        from models.teachers import check_teacher_pool

        check_teacher_pool([teacher] if teacher is not None else [], pool)
    if teacher is not None:
        from models.teachers import check_embed_dim, descriptor_dim

        if pca and embed_dim is not None:
            check_embed_dim(teacher, embed_dim, pool)
        else:
            descriptor_dim(teacher, pool)  # a timm model without such a descriptor: told before any work


def build_embedder(arch: str | None = None, resume: str | None = None, teacher: str | None = None,
                   pca: bool = False, weights_dir: str | None = None, embed_dim: int = 512, gem_p: float = 3.0,
                   trust: bool = False, pool: str = "pre_logits", pca_data: str = "gldv2") -> Embedder:
    """The model to evaluate, in eval mode on the CPU (call ``.to(device)``). ``pool``: a timm teacher's pooling;
    ``pca_data``: what its PCA file was learned on (``gldv2``/``svd``)."""
    check_model_flags(arch, resume, teacher, pca, embed_dim, pool)
    if arch is not None:
        from models.students import load_student

        model = load_student(resume, arch, embed_dim=embed_dim, gem_p=gem_p, trust=trust)
        return Embedder(model.eval(), None, f"student {arch} (embed_dim {embed_dim}, GeM p={gem_p:g}) from {resume}",
                        model.trained_epochs)

    from models.teachers import build_teacher

    model = build_teacher(teacher, weights_dir, gem_p=gem_p, trust=trust, pool=pool).eval()
    where = f"from {weights_dir}" if weights_dir is not None else "randomly initialised"
    pooling = f"GeM p={gem_p:g}" if pool == "gem" or not is_timm_name(teacher) else "pre-logits"
    description = f"teacher {teacher} ({pooling}) {where}"
    post = None
    if pca:
        if weights_dir is None:
            raise EmbedderConfigError("--pca needs --path_to_pretrained_weights (the folder holding pca_weights/).")
        from models.pca_layer import load_teacher_pca, pca_weight_path

        naming = {"data": pca_data, "pool": pool, "gem_p": gem_p}
        post = load_teacher_pca(weights_dir, teacher, embed_dim, trust, in_dim=int(model.embed_dim), **naming).eval()
        path = pca_weight_path(weights_dir, teacher, embed_dim, **naming)
        description += f" + PCA-whitening {int(post.dim1)}->{int(post.dim2)} ({Path(path).name})"
    return Embedder(model, post, description)
