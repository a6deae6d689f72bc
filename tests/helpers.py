"""Shared test data for the GLD training/PCA tests (and anyone else): toy GLDv2 folders and a weights folder with
random teachers in the published layout plus PCA files, each built once per pytest process and cached.

Usage: ``weights_dir(("mocov3", "barlowtwins"))`` -> Path with ``<TEACHER_FILES[t]>`` and
``pca_weights/<published PCA name>`` for each teacher; ``toy_gld()`` -> Path of a toy GLDv2 root.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
CHEAP_TEACHERS = ("mocov3", "barlowtwins")  # ResNet50s: the cheapest valid pair
_CACHE_DIR = Path(tempfile.mkdtemp(prefix="whiten_mtd_tests_"))
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@functools.cache
def toy_gld(n_landmarks: int = 10, imgs_per_landmark: int = 3, size: int = 48, seed: int = 0,
            n_singletons: int = 1) -> Path:
    """A toy GLDv2 root (read-only by convention: copy it before modifying)."""
    from datasets.toy import make_toy_gld

    root = _CACHE_DIR / f"gld_{n_landmarks}_{imgs_per_landmark}_{size}_{seed}_{n_singletons}"
    make_toy_gld(root, n_landmarks=n_landmarks, imgs_per_landmark=imgs_per_landmark, size=size, seed=seed,
                 n_singletons=n_singletons)
    return root


def random_pca(dim1: int, dim2: int, seed: int = 0):
    """A valid PCA-whitening layer with random orthonormal axes and decreasing variances.

    Built directly rather than fitted: a 2048x2048 ``eigh`` takes ~30 s on the 2-core CI machine.
    """
    from models.pca_layer import PCAWhitening

    g = torch.Generator().manual_seed(seed)
    layer = PCAWhitening(dim1, dim2)
    axes, _ = torch.linalg.qr(torch.randn(dim1, dim2, generator=g))
    variances = torch.linspace(2.0, 0.2, dim2) / dim1
    layer.mean.copy_(0.5 * F.normalize(torch.randn(1, dim1, generator=g), dim=-1))
    layer.d[-dim2:] = variances.flip(0)  # ascending, as eigh returns them
    layer.v[:, -dim2:] = axes.flip(1)
    layer.dvt.copy_(torch.diag(variances ** -0.5) @ axes.T)
    return layer


def pca_from_features(features: torch.Tensor, dim2: int):
    """The PCA-whitening of (N, dim1) features with dim2 < N, through an SVD of the centred data (same axes and
    variances as the paper's eigh of the covariance, without the slow 2048-d eigh)."""
    from models.pca_layer import PCAWhitening

    layer = PCAWhitening(features.shape[1], dim2)
    mean = features.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(features - mean, full_matrices=False)
    variances = s[:dim2] ** 2 / features.shape[0]
    layer.mean.copy_(mean)
    layer.d[-dim2:] = variances.flip(0)
    layer.v[:, -dim2:] = vh[:dim2].T.flip(1)
    layer.dvt.copy_(torch.diag(variances ** -0.5) @ vh[:dim2])
    return layer


@functools.cache
def weights_dir(teachers: tuple[str, ...] = CHEAP_TEACHERS, embed_dim: int = 512, seed: int = 0) -> Path:
    """Random teachers written with ``write_published_layout`` and random-feature PCA files under one folder."""
    from models.pca_layer import pca_weight_path, save_pca_layer
    from models.teachers import TEACHER_FILES, build_teacher, write_published_layout

    root = _CACHE_DIR / f"weights_{'_'.join(teachers)}_{embed_dim}_{seed}"
    for i, name in enumerate(teachers):
        torch.manual_seed(seed + i)
        teacher = build_teacher(name)
        write_published_layout(name, teacher, root / TEACHER_FILES[name])
        save_pca_layer(random_pca(int(teacher.embed_dim), embed_dim, seed + i), pca_weight_path(root, name, embed_dim))
    return root


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` intra-op threads. On a busy 2-core machine two OpenMP threads per process are 10-40x
    slower than one (spin-waiting on a shared core), so the heavy in-process tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_script(*args: str, timeout: float = 600, env: dict | None = None,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python <script> args`` from the repo root on CPU; returns the completed process (never raises)."""
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    cmd = (launcher or [sys.executable]) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int) -> list[str]:
    """A ``torchrun --standalone`` launcher prefix (CPU, gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
