"""Shared test data for the GLD training/PCA tests (and anyone else): toy GLDv2 folders and a weights folder with
random teachers in the published layout plus PCA files, each built once per pytest process and cached.

Usage: ``weights_dir(("mocov3", "barlowtwins"))`` -> Path with ``<TEACHER_FILES[t]>`` and
``pca_weights/<published PCA name>`` for each teacher; ``toy_gld()`` -> Path of a toy GLDv2 root.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import math
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
    """Random teachers written with ``write_published_layout`` and random-feature PCA files under one folder. A timm
    teacher (``timm:<model>``) gets a PCA file per data (gldv2, svd) and pooling (pre-logits, GeM with p 1 and 3)."""
    from models.pca_layer import PCA_DATA, pca_weight_path, save_pca_layer
    from models.teachers import build_teacher, descriptor_dim, teacher_file, write_published_layout

    root = _CACHE_DIR / f"weights_{'_'.join(teachers).replace(':', '-')}_{embed_dim}_{seed}"
    for i, name in enumerate(teachers):
        torch.manual_seed(seed + i)
        write_published_layout(name, build_teacher(name), teacher_file(name, root))
        whitenings = [{}]
        if name.startswith("timm:"):
            whitenings = [{"data": data, "pool": pool, "gem_p": p} for data in PCA_DATA
                          for pool, p in (("pre_logits", 3.0), ("gem", 1.0), ("gem", 3.0))]
        for j, naming in enumerate(whitenings):
            dim1 = descriptor_dim(name, naming.get("pool", "pre_logits"))
            save_pca_layer(random_pca(dim1, embed_dim, seed + i + 101 * j),
                           pca_weight_path(root, name, embed_dim, **naming))
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


SCRIPTS = {"gld_distill.py", "svd_distill.py", "gld_pca_learn.py", "svd_pca_learn.py", "oxford_paris_eval.py",
           "svd_eval.py"}


def run_main(script: str, *args) -> subprocess.CompletedProcess:
    """``run_script`` in this process, for one of the six scripts: its ``main(argv)`` with stdout/stderr captured
    and the exit status as a process would have it (a ``SystemExit("line")`` prints the line and exits 1). No
    interpreter start-up and no torch import: seconds saved per run, where a separate process is not the point
    (signals, launchers and environments keep ``run_script``). One intra-op thread, as ``run_script``'s runs."""
    import importlib

    assert str(script) in SCRIPTS, script
    if any(str(a) in ("--nproc_per_node", "--world_size") for a in args):  # spawned ranks print to the real stdout
        return run_script(script, *args)
    module = importlib.import_module(Path(str(script)).stem)
    out, err = io.StringIO(), io.StringIO()
    status = 0
    argv0, sys.argv[0] = sys.argv[0], str(script)  # the script's name in its "<script>: error:" line
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch_threads(1):
        try:
            module.main([str(a) for a in args])
        except SystemExit as exc:
            if isinstance(exc.code, str):
                print(exc.code, file=err)
                status = 1
            else:
                status = exc.code or 0
        finally:
            sys.argv[0] = argv0
    return subprocess.CompletedProcess([script, *map(str, args)], status, out.getvalue(), err.getvalue())


def torchrun(nproc: int) -> list[str]:
    """A ``torchrun --standalone`` launcher prefix (CPU, gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


# --- refused inputs: check the behaviour (exit status, one line, what is named), never the wording ---------------
def assert_names(message, *tokens) -> str:
    """``message`` (an exception, a SystemExit's code, a line) is one line without a traceback and contains each of
    ``tokens``: the flag, file, key or value the user has to act on. Returns the message."""
    text = str(message).strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    missing = [token for token in map(str, tokens) if token not in text]
    assert not missing, f"{missing} not named in: {text}"
    return text


def error_line(stderr: str) -> str:
    """The one ``<prog>: error: ...`` line of ``stderr``; fails on a traceback, on no such line or on several."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def assert_user_error(result: subprocess.CompletedProcess, code: int, *tokens) -> str:
    """A script run that refused its input: exit status ``code`` (1: data, 2: usage), no traceback and one
    ``error:`` line on stderr that names each of ``tokens``. Returns that line."""
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    return assert_names(error_line(result.stderr), *tokens)


def assert_exit(exc, code: int | None, *tokens, err: str = "") -> str:
    """The in-process form of ``assert_user_error``. ``exc``: a SystemExit, a ``utils.errors.UserError`` or pytest's
    ExceptionInfo of either. ``SystemExit("message")`` exits with status 1; an int status (argparse's 2) has its
    ``error:`` line in ``err`` (the captured stderr); a UserError has its ``exit_code``. Checks the status is
    ``code`` (None: not checked) and that the one-line message names each of ``tokens``; returns the message."""
    exc = getattr(exc, "value", exc)
    if isinstance(exc, SystemExit):
        status, message = (1, exc.code) if isinstance(exc.code, str) else (exc.code, error_line(err))
    else:
        status, message = getattr(exc, "exit_code", None), str(exc)
    if code is not None:
        assert status == code, message
    return assert_names(message, *tokens)


# --- PCA learning (test_gld_pca_learn, test_distributed) -------------------------------------------------------
HEAVY = ("resnet101_delg", "resnet101_dolg")  # dim1 512 / 1024: a quick eigh (2048-d takes ~30 s here)


def fixed_transform(size: int = 32):
    """No randomness, so the features can be recomputed independently."""
    import torchvision.transforms as T

    from datasets.transforms import imagenet_normalize

    return T.Compose([T.Resize((size, size)), T.ToTensor(), imagenet_normalize()])


def pca_args(**overrides):
    """``engine.params.PCAParams`` of HEAVY[0] with the HEAVY teachers' weights folder, with ``overrides``."""
    from engine.params import PCAParams

    values = dict(teacher=HEAVY[0], path_to_pretrained_weights=str(weights_dir(HEAVY)), p=3.0, embed_dim=8,
                  batch_size=5, num_workers=0, no_progress=True)
    return PCAParams(**{**values, **overrides})


# --- gld_distill.py runs (test_gld_distill, test_training_safety) ----------------------------------------------
DISTILL_EPOCHS, DISTILL_BATCH = 2, 4  # distill_cmd's --epochs and -b


def gld_root() -> Path:
    """The toy GLDv2 root of the distillation runs: 8 usable landmark groups of 3 images, plus one singleton."""
    return toy_gld(n_landmarks=8, imgs_per_landmark=3, size=48, seed=1, n_singletons=1)


def distill_cmd(ckpt_dir, *extra, teachers=CHEAP_TEACHERS, weights=None) -> list:
    """``gld_distill.py`` arguments for a small CPU run on ``gld_root()`` (for ``run_script(*cmd)``); ``extra``
    come last, so they override the defaults."""
    return ["gld_distill.py", "-a", "resnet18", "-ts", *teachers, "-c", ckpt_dir, "--gld_root_path", gld_root(),
            "--path_to_pretrained_weights", weights or weights_dir(), "--student_init", "random",
            "--imsize", 32, "-b", DISTILL_BATCH, "--epochs", DISTILL_EPOCHS, "--num_workers", 1, "--no_progress",
            "--log_every", 1, "--snapshot_step", 2, *extra]


def read_metrics(ckpt_dir: Path) -> list[dict]:
    """The records of ``<ckpt_dir>/metrics.jsonl`` ([] when there is none yet)."""
    path = Path(ckpt_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- revisited Oxford/Paris (test_oxford_paris, test_oxford_paris_eval) ----------------------------------------
def naive_map(ranks, gnd, kappas):
    """An independent implementation of the revisitop metric, written from the protocol definition: walk each
    ranking, drop junk, note the rank of every positive among the kept items; trapezoid AP.

    Returns (mAP, per-query APs, mean mP@k, per-query P@k), queries without positives left out of the means."""
    import numpy as np

    aps, prs = [], []
    for q, g in enumerate(gnd):
        ok, junk = set(int(i) for i in g["ok"]), set(int(i) for i in g["junk"])
        if not ok:
            aps.append(math.nan)
            prs.append([math.nan] * len(kappas))
            continue
        kept = [int(i) for i in ranks[:, q] if int(i) not in junk]
        hits = [r for r, i in enumerate(kept) if i in ok]
        ap = 0.0
        for j, r in enumerate(hits):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) / 2 / len(ok)
        aps.append(ap)
        row = []
        for k in kappas:
            kq = min(max(hits) + 1, k)
            row.append(sum(1 for r in hits if r + 1 <= kq) / kq)
        prs.append(row)
    aps, prs = np.array(aps), np.array(prs)
    valid = ~np.isnan(aps)
    return aps[valid].mean(), aps, prs[valid].mean(0), prs
