"""PCA learning: reproducible sampling, the fitted layer whitens the teacher's features, the script end to end."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    HEAVY,
    assert_exit,
    fixed_transform,
    pca_args,
    run_main,
    torch_threads,
    toy_gld,
    weights_dir,
)

from datasets.gld import GLDImageDataset, image_path, read_image, read_image_ids
from engine.pca import learn_pca, sample_items
from models.pca_layer import load_pca_layer, pca_weight_path
from models.teachers import TEACHER_FILES, build_teacher
from utils.distributed import DistContext


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_sample_items_is_the_seeded_shuffle():
    items = [f"id{i}" for i in range(50)]
    ref = list(items)
    random.Random(3).shuffle(ref)
    assert sample_items(items, 10, seed=3) == ref[:10]
    assert sample_items(items, 10, seed=3) == sample_items(items, 10, seed=3)  # identical on every rank
    assert sample_items(items, 0, seed=3) == ref and sample_items(items, -1, seed=3) == ref
    assert sample_items(items, 10, seed=4) != ref[:10]
    assert items == [f"id{i}" for i in range(50)]  # input untouched


def test_output_path_default_is_the_published_name(tmp_path):
    params = pca_args(path_to_pretrained_weights=str(tmp_path), embed_dim=256)
    assert params.output == pca_weight_path(tmp_path, "resnet101_delg", 256)
    assert params.output.name == "resnet101_delg_pca_256d_gldv2_512x512_p3_randcrop.pt"
    assert pca_args(dump_to=str(tmp_path / "x.pt"), teacher="mocov3").output == tmp_path / "x.pt"


def test_learned_layer_whitens_the_teacher_features(tmp_path):
    root = toy_gld()
    ids = sample_items(read_image_ids(root), 13, seed=0)
    path = learn_pca(pca_args(dump_to=str(tmp_path / "p.pt")), GLDImageDataset(root, ids, fixed_transform()),
                     DistContext())
    layer = load_pca_layer(path)
    assert (int(layer.dim1), int(layer.dim2)) == (512, 8)
    # independent features: the teacher on the images in sample order, without loader or gathering
    teacher = build_teacher("resnet101_delg", weights_dir(HEAVY), gem_p=3.0)
    with torch.no_grad():
        images = torch.stack([fixed_transform()(read_image(image_path(root, i))) for i in ids])
        feats = F.normalize(teacher(images), dim=-1).double()
    torch.testing.assert_close(layer.mean.double(), feats.mean(0, keepdim=True), atol=1e-5, rtol=0)
    y = layer(feats.float()).double()
    cov = (y - y.mean(0)).T @ (y - y.mean(0)) / len(y)
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=2e-2, rtol=0)
    # numpy in float64 on the same features: the whitened coordinates, up to each axis's sign (13 images: the top
    # 8 of 12 non-zero variances are distinct, so their axes are well defined)
    x = feats.numpy()
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    top = np.argsort(values)[::-1][:8]
    y_ref = (x - x.mean(0)) @ vectors[:, top] / np.sqrt(values[top])
    np.testing.assert_allclose(np.abs(y.numpy()), np.abs(y_ref), rtol=0, atol=1e-3 * np.abs(y_ref).max())


@pytest.mark.slow
def test_script_writes_the_published_file(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    os.symlink(weights_dir(HEAVY) / TEACHER_FILES["resnet101_dolg"], weights / TEACHER_FILES["resnet101_dolg"])
    res = run_main("gld_pca_learn.py", "-t", "resnet101_dolg", "--gld_root_path", toy_gld(),
                     "--path_to_pretrained_weights", weights, "--embed_dim", 8, "--imsize", 32, "-b", 8,
                     "--num_workers", 1, "--num_samples", 12, "--no_progress")
    assert res.returncode == 0, res.stdout + res.stderr
    out = pca_weight_path(weights, "resnet101_dolg", 8)
    layer = load_pca_layer(out)
    assert (int(layer.dim1), int(layer.dim2)) == (1024, 8)
    assert "12 images" in res.stdout and "kept energy" in res.stdout
    assert torch.isfinite(layer.dvt).all() and layer.dvt.abs().sum() > 0


def test_script_bad_inputs(tmp_path):
    from gld_pca_learn import main

    with pytest.raises(SystemExit) as exc:
        main(["-t", "mocov3", "--gld_root_path", str(tmp_path), "--path_to_pretrained_weights", str(tmp_path),
              "--dump_to", str(tmp_path / "x.pt"), "--no_progress", "--num_workers", "0"])
    assert_exit(exc, 1, tmp_path / "meta" / "train_clean_ids.txt")
    with pytest.raises(SystemExit) as exc:
        main(["-t", "mocov3", "--gld_root_path", str(toy_gld()), "--path_to_pretrained_weights", str(tmp_path),
              "--dump_to", str(tmp_path / "x.pt"), "--no_progress", "--num_workers", "0"])
    assert_exit(exc, 1, "mocov3", tmp_path / TEACHER_FILES["mocov3"])  # the teacher, and where its file should be
