"""PCA-whitening of L2-normalised teacher descriptors, with the buffers of the published PCA files.

Learning follows the paper's ``utils.PCA.train_pca`` step by step (float32 ``eigh`` of the biased covariance,
eigenvalues below ``1e-5 * max`` raised to it, top ``dim2``, ``dvt = diag(d**-whit) @ V.T``) so the published
numbers reproduce; unlike the paper, neither ``fit`` nor ``forward`` modifies the caller's tensor (B29).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from models.timm_names import TIMM_PREFIX, is_timm_name
from utils.checkpoint import CheckpointError, check_state_dict, load_file, save_atomic

logger = logging.getLogger(__name__)

# File names under --path_to_pretrained_weights: with embed_dim 512 the published names. The SVD teachers were
# published at 512-d only; other dimensions are named the same way, so a file's name always says its size.
PCA_FILES = {
    "mocov3": "pca_weights/mocov3_pca_{embed_dim}d_svd_224x224_p1.pt",
    "barlowtwins": "pca_weights/barlowtwins_pca_{embed_dim}d_svd_224x224_p1.pt",
    "resnet101_gem": "pca_weights/resnet101_gem_pca_{embed_dim}d_gldv2_512x512_p3_randcrop.pt",
    "resnet101_ap_gem": "pca_weights/resnet101_ap_gem_pca_{embed_dim}d_gldv2_512x512_p3_randcrop.pt",
    "resnet101_solar": "pca_weights/resnet101_solar_pca_{embed_dim}d_gldv2_512x512_p3_randcrop.pt",
    "resnet101_delg": "pca_weights/resnet101_delg_pca_{embed_dim}d_gldv2_512x512_p3_randcrop.pt",
    "resnet101_dolg": "pca_weights/resnet101_dolg_pca_{embed_dim}d_gldv2_512x512_p3_global_randcrop.pt",
}
# A timm teacher's (``timm:<model>``) is learned per training data (``gldv2`` for the image flows, ``svd`` for the
# video ones) and per pooling: ``timm-<model>_pca_<dim>d_<data>_prelogits.pt`` or ``..._gem-p<p>.pt``.
TIMM_PCA_FILE = "pca_weights/timm-{model}_pca_{embed_dim}d_{data}_{pool}.pt"
PCA_DATA = ("gldv2", "svd")
PCA_BUFFERS = ("dim1", "dim2", "whit", "d", "v", "n_0", "mean", "dvt")


class PCAWhitening(nn.Module):
    """``x -> (x - mean) @ dvt.T``: projection on the top ``dim2`` principal axes scaled by ``eigval**-whit``."""

    def __init__(self, dim1: int, dim2: int, whit: float = 0.5) -> None:
        super().__init__()
        dim1, dim2 = int(dim1), int(dim2)
        if dim1 <= 0 or dim2 <= 0 or dim2 > dim1:
            raise ValueError(f"PCA-whitening needs 0 < dim2 <= dim1, got dim1={dim1}, dim2={dim2} "
                             "(--embed_dim cannot exceed the teacher's descriptor size)")
        # registration order and dtypes are those of the published files
        self.register_buffer("dim1", torch.tensor(dim1, dtype=torch.long))
        self.register_buffer("dim2", torch.tensor(dim2, dtype=torch.long))
        self.register_buffer("whit", torch.tensor(whit, dtype=torch.float32))
        self.register_buffer("d", torch.zeros(dim1, dtype=torch.float32))
        self.register_buffer("v", torch.zeros(dim1, dim1, dtype=torch.float32))
        self.register_buffer("n_0", torch.tensor(0, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(1, dim1, dtype=torch.float32))
        self.register_buffer("dvt", torch.zeros(dim2, dim1, dtype=torch.float32))

    @property
    def in_dim(self) -> int:
        return int(self.dim1)

    @property
    def out_dim(self) -> int:
        return int(self.dim2)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> PCAWhitening:
        """Learn mean and whitening from (N, dim1) features (already L2-normalised by the caller); returns self."""
        dim1 = int(self.dim1)
        if features.dim() != 2 or features.shape[1] != dim1:
            raise ValueError(f"PCA fit expects (N, {dim1}) features, got {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise ValueError(f"PCA fit needs at least 2 samples, got {features.shape[0]} (use more --num_samples)")
        x = features.to(dtype=torch.float32)
        mean = x.mean(dim=0, keepdim=True)
        centred = x - mean  # a new tensor: the caller's features stay untouched
        return self.fit_covariance(mean, centred.t().mm(centred) / centred.shape[0])

    @torch.no_grad()
    def fit_moments(self, count: float, total: torch.Tensor, gram: torch.Tensor) -> PCAWhitening:
        """Learn from the sufficient statistics of N features instead of the features: ``count`` = N, ``total`` =
        their sum (dim1,), ``gram`` = ``X^T X`` (dim1, dim1), best in float64. The same mean and biased covariance as
        ``fit`` (to float rounding), in memory independent of N."""
        dim1 = int(self.dim1)
        if total.shape != (dim1,) or gram.shape != (dim1, dim1):
            raise ValueError(f"PCA fit expects moments of {dim1}-d features, got {tuple(total.shape)} and "
                             f"{tuple(gram.shape)}")
        if count < 2:
            raise ValueError(f"PCA fit needs at least 2 samples, got {count:g} (use more --num_samples)")
        mean = (total.double() / count).unsqueeze(0)
        cov = gram.double() / count - mean.T @ mean
        return self.fit_covariance(mean.float(), cov.float())

    @torch.no_grad()
    def fit_covariance(self, mean: torch.Tensor, cov: torch.Tensor) -> PCAWhitening:
        """The paper's whitening of a (1, dim1) mean and biased (dim1, dim1) covariance, both float32."""
        dim1, dim2 = int(self.dim1), int(self.dim2)
        d, v = torch.linalg.eigh(cov)  # ascending eigenvalues
        self.mean.copy_(mean)
        self.d.copy_(d)  # raw eigh output, stored before clamping as in the paper (informational only)
        self.v.copy_(v)

        eps = d.max() * 1e-5
        small = d < eps
        self.n_0.fill_(int(small.sum()))
        d = torch.where(small, eps, d)
        total_energy = d.sum()
        order = torch.argsort(d, descending=True)[:dim2]
        d, v = d[order], v[:, order]
        logger.info("PCA %d -> %d: keeping %.2f %% of the energy (%d eigenvalue(s) below eps raised to it)",
                    dim1, dim2, float(d.sum() / total_energy * 100.0), int(self.n_0))
        self.dvt.copy_(torch.diag(1.0 / d ** self.whit) @ v.t())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: a bf16 projection would lose the whitening's precision
        with torch.autocast(device_type=x.device.type, enabled=False):
            centred = x.to(self.dvt.dtype) - self.mean
            return torch.mm(self.dvt, centred.t()).t()

    def extra_repr(self) -> str:
        return f"dim1={int(self.dim1)}, dim2={int(self.dim2)}, whit={float(self.whit)}"


def pca_weight_path(weights_dir: str | os.PathLike, teacher: str, embed_dim: int = 512, data: str = "gldv2",
                    pool: str = "pre_logits", gem_p: float = 3.0) -> Path:
    """The PCA file of ``teacher`` whitening to ``embed_dim`` dimensions (the published name for 512). ``data``
    (``gldv2``/``svd``: what it was learned on), ``pool`` and ``gem_p`` name a timm teacher's file only: the paper's
    teachers have one published file each."""
    if is_timm_name(teacher):
        if data not in PCA_DATA:
            raise ValueError(f"PCA data must be one of {PCA_DATA}, got {data!r}")
        pool_tag = "prelogits" if pool == "pre_logits" else f"gem-p{gem_p:g}"
        name = TIMM_PCA_FILE.format(model=teacher[len(TIMM_PREFIX):], embed_dim=embed_dim, data=data, pool=pool_tag)
        return Path(weights_dir) / name
    if teacher not in PCA_FILES:
        raise ValueError(f"no PCA file name for teacher '{teacher}'; known: {', '.join(PCA_FILES)}")
    return Path(weights_dir) / PCA_FILES[teacher].format(embed_dim=embed_dim)


def pca_learn_command(teacher: str, embed_dim: int, weights_dir: str | os.PathLike, data: str = "gldv2",
                      pool: str = "pre_logits", gem_p: float = 3.0) -> str:
    """The command that learns the PCA file ``pca_weight_path`` names, with the script of ``data`` (the flow's)."""
    if data == "svd":
        command = f"python svd_pca_learn.py -t {teacher} -dm config/svd.yaml"
    else:
        command = f"python gld_pca_learn.py -t {teacher} --gld_root_path GLD --imsize 512 --num_samples -1"
    if is_timm_name(teacher) and pool != "pre_logits":
        command += f" --teacher_pool {pool} -p {gem_p:g}"
    return f"{command} --path_to_pretrained_weights {weights_dir} --embed_dim {embed_dim}"


def load_teacher_pca(weights_dir: str | os.PathLike, teacher: str, embed_dim: int, trust: bool = False,
                     in_dim: int | None = None, data: str = "gldv2", pool: str = "pre_logits",
                     gem_p: float = 3.0) -> PCAWhitening:
    """The PCA file of ``teacher`` for ``embed_dim`` under ``weights_dir`` (``pca_weight_path``); a missing file
    says how to make it."""
    path = pca_weight_path(weights_dir, teacher, embed_dim, data, pool, gem_p)
    if not path.is_file():
        if is_timm_name(teacher):  # its file is the flow's data's
            how = pca_learn_command(teacher, embed_dim, weights_dir, data, pool, gem_p)
        else:  # one published file per teacher, whichever script writes it
            how = (f"python gld_pca_learn.py (or svd_pca_learn.py) -t {teacher} --embed_dim {embed_dim} "
                   f"--path_to_pretrained_weights {weights_dir}, or download the published pca_weights/")
        raise CheckpointError(f"teacher {teacher}: PCA-whitening file for --embed_dim {embed_dim} not found: {path}. "
                              f"Learn it with: {how}.")
    return load_pca_layer(path, trust=trust, in_dim=in_dim, out_dim=embed_dim)


def load_pca_layer(path: str | os.PathLike, trust: bool = False, in_dim: int | None = None,
                   out_dim: int | None = None) -> PCAWhitening:
    """Read a PCA file (plain state_dict of the 8 buffers) strictly; the layer is built from its dim1/dim2.

    ``in_dim`` / ``out_dim``: the sizes the caller needs (teacher descriptor / ``--embed_dim``); another size is a
    ``CheckpointError`` naming the file, its size and the flag.
    """
    state = load_file(path, trust=trust, what="PCA-whitening")
    if not isinstance(state, dict):
        raise CheckpointError(f"PCA-whitening file {path} holds a {type(state).__name__}, expected a state_dict "
                              f"with buffers {list(PCA_BUFFERS)}")
    hint = f"Expected exactly the buffers {list(PCA_BUFFERS)}, as gld_pca_learn.py / svd_pca_learn.py write them."
    try:
        layer = PCAWhitening(int(state["dim1"]), int(state["dim2"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"PCA-whitening file {path}: no valid dim1/dim2 ({exc!r}). {hint}") from None
    check_state_dict(layer.state_dict(), state, f"PCA-whitening file {path}", hint)
    if out_dim is not None and layer.out_dim != int(out_dim):
        raise CheckpointError(f"PCA-whitening file {path} whitens to {layer.out_dim} dimensions, but --embed_dim "
                              f"is {out_dim}; pass --embed_dim {layer.out_dim}, or learn a {out_dim}-d whitening "
                              f"(gld_pca_learn.py / svd_pca_learn.py --embed_dim {out_dim})")
    if in_dim is not None and layer.in_dim != int(in_dim):
        raise CheckpointError(f"PCA-whitening file {path} takes {layer.in_dim}-d descriptors, but its teacher "
                              f"outputs {in_dim}-d ones: the file belongs to another teacher")
    bad = [k for k in ("mean", "dvt") if not torch.isfinite(state[k]).all()]
    if bad:  # used, they make every whitened descriptor and so the loss NaN, which reads like a divergence
        raise CheckpointError(f"PCA-whitening file {path} holds NaN or inf in {bad}: learn it again "
                              "(gld_pca_learn.py / svd_pca_learn.py --overwrite) or download it again")
    layer.load_state_dict(state, strict=True)
    return layer


def save_pca_layer(layer: PCAWhitening, path: str | os.PathLike) -> None:
    """Write the published format: ``torch.save(layer.state_dict())``, atomically."""
    save_atomic({k: v.detach().cpu() for k, v in layer.state_dict().items()}, path)
