"""timm models as teachers (``timm:<model>``): faithful to timm's own forward of the loaded file, each with its own
input normalisation and sizes, through every flow, and refused in one line when the input is wrong.

The references are independent of the teacher's code: timm's own loader (``create_model(pretrained=True)`` with the
file given as ``pretrained_cfg_overlay``), fed the raw pixels normalised as the model's ``pretrained_cfg`` says.
"""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import (
    assert_user_error,
    gld_root,
    random_pca,
    run_main,
    torch_threads,
    toy_gld,
    weights_dir,
)

from datasets.toy import make_toy_revisitop, make_toy_svd
from models.distill_model import WhitenedTeachers
from models.pca_layer import load_pca_layer, pca_weight_path, save_pca_layer
from models.teachers import build_teacher, descriptor_dim, teacher_file, write_published_layout
from utils.checkpoint import load_file

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VIT = "timm:vit_tiny_patch16_224"  # mean and std 0.5: not ImageNet's
CONVNEXT = "timm:convnext_atto"  # ImageNet's normalisation, a (B, C, H, W) feature map
DINOV2_REG = "timm:vit_small_patch14_reg4_dinov2"  # patch 14, CLS + 4 register tokens
MIXED = ("mocov3", VIT)  # a paper teacher and a timm one
EMBED = 32


def random_timm_teacher(name, seed=0, num_classes=0):
    """A random timm model as a teacher, its layer scales and prefix tokens drawn at unit scale (timm initialises
    them near zero, which would make every block's output, and so any comparison, nearly trivial)."""
    torch.manual_seed(seed)
    teacher = build_teacher(name)
    if num_classes:
        teacher.model.reset_classifier(num_classes)
    with torch.no_grad():
        for key, param in teacher.model.named_parameters():
            if "gamma" in key or key.endswith("_token"):
                param.normal_()
    return teacher


def saved(name, folder, suffix=".safetensors", **kwargs):
    """Write a random teacher to ``<folder>/timm/<model><suffix>``; returns the file."""
    path = teacher_file(name, folder).with_suffix(suffix)
    write_published_layout(name, random_timm_teacher(name, **kwargs), path)
    return path


def timm_reference(name, path, num_classes=0):
    """timm's own load of the file (no code of this project): the model ``create_model(pretrained=True)`` makes."""
    model = name.split(":", 1)[1]
    dynamic = {"dynamic_img_size": True} if "vit" in model else {}
    return timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                             num_classes=num_classes, **dynamic).eval()


def own_input(reference, raw):
    cfg = reference.pretrained_cfg
    return (raw - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def imagenet_input(raw):
    return (raw - IMAGENET_MEAN) / IMAGENET_STD


def pixels(height, width, seed=1, n=2):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_equal_to_float32(got, expected):
    """Equal up to float32 rounding: the two normalisations round differently (~1e-7 of each input), which twelve
    blocks carry to about 1e-6 of the output's scale."""
    scale = float(expected.abs().max())
    assert scale > 0.1  # not a vanishing output, which anything would match
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------------------------------ faithful to timm
@pytest.mark.parametrize("name,size,suffix", [(VIT, 224, ".safetensors"), (VIT, 64, ".pth"),
                                              (CONVNEXT, 64, ".safetensors"), (DINOV2_REG, 56, ".safetensors")])
def test_the_descriptor_is_timms_own_pre_logits_of_the_loaded_file(tmp_path, name, size, suffix):
    path = saved(name, tmp_path, suffix)
    teacher = build_teacher(name, tmp_path)
    reference = timm_reference(name, path)
    raw = pixels(size, size)
    with torch.no_grad(), torch_threads(1):
        got = teacher(imagenet_input(raw))
        expected = reference.forward_head(reference.forward_features(own_input(reference, raw)), pre_logits=True)
    assert teacher.embed_dim == expected.shape[1] == descriptor_dim(name)
    assert_equal_to_float32(got, expected)


def test_a_vit_input_is_resized_to_the_nearest_patch_multiple(tmp_path):
    """60 x 70 px for a /16 ViT: seen at 64 x 64 (the nearest multiples), its position embeddings interpolated."""
    path = saved(VIT, tmp_path)
    teacher, reference = build_teacher(VIT, tmp_path), timm_reference(VIT, path)
    raw = pixels(60, 70)
    with torch.no_grad(), torch_threads(1):
        got = teacher(imagenet_input(raw))
        resized = F.interpolate(own_input(reference, raw), size=(64, 64), mode="bilinear", align_corners=False)
        expected = reference.forward_head(reference.forward_features(resized), pre_logits=True)
    assert_equal_to_float32(got, expected)


@pytest.mark.parametrize("name,p", [(DINOV2_REG, 3.0), (CONVNEXT, 1.0)])
def test_gem_pools_the_patch_tokens_or_the_feature_map(tmp_path, name, p):
    """--teacher_pool gem: GeM(p) over the patch tokens (the CLS and register tokens left out) or the map."""
    path = saved(name, tmp_path)
    teacher, reference = build_teacher(name, tmp_path, gem_p=p, pool="gem"), timm_reference(name, path)
    raw = pixels(56, 56)
    with torch.no_grad(), torch_threads(1):
        got = teacher(imagenet_input(raw))
        features = reference.forward_features(own_input(reference, raw))
    if features.dim() == 3:
        assert reference.num_prefix_tokens == 5
        features = features[:, 5:].transpose(1, 2)  # (B, C, patches)
    else:
        features = features.flatten(2)
    expected = features.mean(-1) if p == 1 else features.clamp(min=1e-6).pow(p).mean(-1).pow(1 / p)
    assert got.shape == (2, descriptor_dim(name, "gem"))
    assert_equal_to_float32(got, expected)


def test_a_file_with_a_classifier_loads_it_and_returns_the_pre_logits(tmp_path):
    """A hub file with a head (CLIP's projection, an ImageNet classifier): the class count comes from the file,
    every key is loaded, the descriptor stays before the head."""
    path = saved(VIT, tmp_path, num_classes=10)
    teacher = build_teacher(VIT, tmp_path)
    assert teacher.model.num_classes == 10
    reference = timm_reference(VIT, path, num_classes=10)
    raw = pixels(32, 32)
    with torch.no_grad(), torch_threads(1):
        expected = reference.forward_head(reference.forward_features(own_input(reference, raw)), pre_logits=True)
        assert_equal_to_float32(teacher(imagenet_input(raw)), expected)
    from safetensors.torch import load_file as read_safetensors

    file_head = read_safetensors(path)["head.weight"]  # timm's loader drops a head of another class count
    torch.testing.assert_close(teacher.model.head.weight, file_head, rtol=0, atol=0)


def test_mixed_teachers_each_see_the_input_as_they_were_trained(tmp_path):
    """One batch, two normalisations: a paper teacher (the ImageNet-normalised input as it is), a ViT normalised
    with mean and std 0.5 and a ConvNeXt with ImageNet's; each whitened output is its PCA of its own view."""
    weights = tmp_path / "weights"
    shutil.copytree(weights_dir(MIXED, embed_dim=EMBED), weights)
    convnext_file = saved(CONVNEXT, weights, seed=4)
    save_pca_layer(random_pca(descriptor_dim(CONVNEXT), EMBED, 9), pca_weight_path(weights, CONVNEXT, EMBED))
    names = ["mocov3", VIT, CONVNEXT]
    teachers = WhitenedTeachers(names, weights, embed_dim=EMBED)
    raw = pixels(48, 48)
    with torch.no_grad(), torch_threads(1):
        outs = teachers(imagenet_input(raw))
        for name, out in zip(names, outs):
            pca = load_pca_layer(pca_weight_path(weights, name, EMBED))
            if name == "mocov3":
                descriptor = build_teacher(name, weights)(imagenet_input(raw))
            else:
                path = teacher_file(name, weights) if name == VIT else convnext_file
                reference = timm_reference(name, path)
                descriptor = reference.forward_head(reference.forward_features(own_input(reference, raw)),
                                                    pre_logits=True)
            assert_equal_to_float32(out, pca(F.normalize(descriptor, dim=-1)))


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def timm_weights():
    return weights_dir(MIXED, embed_dim=EMBED)


def pca_learn_cmd(weights, *extra, teacher=VIT):
    return ["gld_pca_learn.py", "-t", teacher, "--gld_root_path", toy_gld(), "--imsize", 32, "--num_samples", 12,
            "--path_to_pretrained_weights", weights, "--embed_dim", 8, "--num_workers", 0, "--no_progress", *extra]


def distill_args(weights, ckpt_dir, *extra, teachers=MIXED):
    return ["gld_distill.py", "-a", "resnet18", "-ts", *teachers, "-c", ckpt_dir, "--gld_root_path", gld_root(),
            "--path_to_pretrained_weights", weights, "--student_init", "random", "--imsize", 32, "-b", 4,
            "--epochs", 2, "--num_workers", 0, "--no_progress", "--embed_dim", EMBED, *extra]


def test_an_unknown_timm_model_is_a_usage_error_naming_it(tmp_path, timm_weights):
    res = run_main(*distill_args(timm_weights, tmp_path / "run", teachers=("mocov3", "timm:vit_not_a_model")))
    assert_user_error(res, 2, "-ts", "timm:vit_not_a_model", "list_models")
    res = run_main(*pca_learn_cmd(timm_weights, teacher="timm:"))
    assert_user_error(res, 2, "-t")
    assert not (tmp_path / "run").exists()


def test_an_embed_dim_larger_than_the_timm_descriptor_is_a_usage_error(tmp_path, timm_weights):
    res = run_main(*distill_args(timm_weights, tmp_path / "run", "--embed_dim", 256))
    assert_user_error(res, 2, "--embed_dim", "256", "192")
    res = run_main("oxford_paris_eval.py", "-t", VIT, "--pca", "--embed_dim", 193, "-dp", tmp_path,
                   "--path_to_pretrained_weights", timm_weights)
    assert_user_error(res, 2, "--embed_dim", "193")


def test_teacher_pool_without_a_timm_teacher_is_a_usage_error(tmp_path, timm_weights):
    res = run_main(*distill_args(timm_weights, tmp_path / "run", "--teacher_pool", "gem", teachers=("mocov3",)))
    assert_user_error(res, 2, "--teacher_pool")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flow", ["pca", "distill"])
def test_a_file_of_another_model_is_named_before_any_work(tmp_path, timm_weights, flow):
    weights = tmp_path / "weights"
    shutil.copytree(timm_weights, weights)
    other = saved(CONVNEXT, tmp_path / "other")
    shutil.copy(other, teacher_file(VIT, weights))  # a ConvNeXt's keys under the ViT's name
    if flow == "pca":
        (weights / "pca_weights" / pca_weight_path(weights, VIT, 8).name).unlink(missing_ok=True)
        res = run_main(*pca_learn_cmd(weights))
        assert not pca_weight_path(weights, VIT, 8).exists()
    else:
        res = run_main(*distill_args(weights, tmp_path / "run"))
        assert not (tmp_path / "run").exists()
    assert_user_error(res, 1, str(teacher_file(VIT, weights)), "head.norm.weight")  # a ConvNeXt key


def test_a_missing_or_doubled_file_is_named(tmp_path, timm_weights):
    weights = tmp_path / "weights"
    shutil.copytree(timm_weights, weights)
    safetensors_file = teacher_file(VIT, weights)
    shutil.copy(safetensors_file, safetensors_file.with_suffix(".pth"))
    res = run_main(*distill_args(weights, tmp_path / "run"))
    assert_user_error(res, 1, str(safetensors_file), str(safetensors_file.with_suffix(".pth")))
    safetensors_file.unlink()
    safetensors_file.with_suffix(".pth").unlink()
    res = run_main(*distill_args(weights, tmp_path / "run"))
    assert_user_error(res, 1, str(safetensors_file))
    assert not (tmp_path / "run").exists()


def test_a_damaged_safetensors_file_is_named(tmp_path, timm_weights):
    weights = tmp_path / "weights"
    shutil.copytree(timm_weights, weights)
    path = teacher_file(VIT, weights)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    res = run_main(*distill_args(weights, tmp_path / "run"))
    assert_user_error(res, 1, str(path))


@timm.models.register_model
def unpooled_test_net(pretrained=False, **kwargs):
    """A registered timm model whose head returns a feature map: no pooled embedding."""

    class Unpooled(torch.nn.Module):
        def __init__(self, num_classes=0, **_):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.num_classes = num_classes
            self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 32, 32)}
            self.default_cfg = self.pretrained_cfg

        def forward_features(self, x):
            return self.conv(x)

        def forward_head(self, x, pre_logits=False):
            return x

    return Unpooled(**kwargs)


def test_a_model_without_a_pooled_embedding_is_a_usage_error(tmp_path, timm_weights):
    res = run_main("oxford_paris_eval.py", "-t", "timm:unpooled_test_net", "-dp", tmp_path,
                   "--path_to_pretrained_weights", timm_weights)
    assert_user_error(res, 2, "timm:unpooled_test_net")
    # the same model pooled with GeM has a descriptor: the message's advice works
    assert descriptor_dim("timm:unpooled_test_net", "gem") == 8
    res = run_main("oxford_paris_eval.py", "-t", "timm:crossvit_tiny_240", "--teacher_pool", "gem", "-dp", tmp_path,
                   "--path_to_pretrained_weights", timm_weights)  # two token streams: no patch grid to pool
    assert_user_error(res, 2, "--teacher_pool")


# ------------------------------------------------------------------------------------------------- the flows
def test_pca_learning_then_evaluation_with_the_pca(tmp_path, timm_weights):
    """gld_pca_learn.py writes timm-<model>_pca_<d>d_gldv2_prelogits.pt (gem-p3 with --teacher_pool gem), and
    oxford_paris_eval.py -t timm:... --pca reads it: its descriptors are that PCA of timm's own."""
    weights = tmp_path / "weights"
    shutil.copytree(timm_weights, weights)
    for pool in ("pre_logits", "gem"):
        out = pca_weight_path(weights, VIT, 8, "gldv2", pool, 3.0)
        assert not out.exists()
        res = run_main(*pca_learn_cmd(weights, "--teacher_pool", pool))
        assert res.returncode == 0, res.stderr[-3000:]
        assert out.is_file() and out.name == f"timm-vit_tiny_patch16_224_pca_8d_gldv2_{pool.replace('_', '')}.pt" \
            .replace("gem.pt", "gem-p3.pt")
        assert load_pca_layer(out).in_dim == 192

    data = tmp_path / "data"
    make_toy_revisitop(data, "roxford5k", n_queries=3, n_db=9, size=40, seed=0)
    results = tmp_path / "results.json"
    store = tmp_path / "store"
    args = ["oxford_paris_eval.py", "-t", VIT, "--pca", "--embed_dim", 8, "-dp", data, "--path_to_pretrained_weights",
            weights, "--num_workers", 0, "--no_progress", "--output_json", results, "--feature_cache", store]
    res = run_main(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    first = json.loads(results.read_text())
    assert first["protocol"]["teacher_pool"] == "pre_logits"
    stored = sorted(p for p in store.rglob("*") if p.is_file())
    res = run_main(*args)  # the second run reads the store back
    assert res.returncode == 0 and sorted(p for p in store.rglob("*") if p.is_file()) == stored
    assert json.loads(results.read_text())["map"] == first["map"]

    from datasets.oxford_paris import RevisitedDataset
    from engine.features import evaluated_model
    from engine.image_retrieval import dataset_parts
    from engine.params import ImageEvalParams

    params = ImageEvalParams(teacher=VIT, pca=True, embed_dim=8, data_path=str(data),
                             path_to_pretrained_weights=str(weights))
    embedder = evaluated_model(params)
    reference = timm_reference(VIT, teacher_file(VIT, weights))
    pca = load_pca_layer(pca_weight_path(weights, VIT, 8))
    image, *_ = dataset_parts(params, RevisitedDataset(str(data), "roxford5k"))["query"].dataset[0]
    raw = (image.unsqueeze(0) * IMAGENET_STD + IMAGENET_MEAN)
    with torch.no_grad(), torch_threads(1):
        expected = pca(F.normalize(reference.forward_head(reference.forward_features(own_input(
            reference, F.interpolate(raw, size=tuple(round(s / 16) * 16 for s in raw.shape[-2:]), mode="bilinear",
                                     align_corners=False))), pre_logits=True), dim=-1))
        assert_equal_to_float32(embedder.single(image.unsqueeze(0)), expected)

    # another file under the same name: the store key follows the bytes, so the descriptors are made again
    write_published_layout(VIT, random_timm_teacher(VIT, seed=5), teacher_file(VIT, weights))
    res = run_main(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len([p for p in store.rglob("*") if p.is_file()]) > len(stored)


def run_until_stopped(monkeypatch, args):
    """Run the training in this process and send it SIGTERM at the end of its first epoch, as a cluster's stop."""
    import engine.distill

    train_epoch = engine.distill.Trainer.train_epoch

    def stop_after_the_first_epoch(trainer, epoch, progress=None):
        record = train_epoch(trainer, epoch, progress)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    with monkeypatch.context() as patch:
        patch.setattr(engine.distill.Trainer, "train_epoch", stop_after_the_first_epoch)
        return run_main(*args)


def cache_files(cache):
    return {p: p.stat().st_mtime_ns for p in Path(cache).rglob("*") if p.is_file()}


@pytest.mark.parametrize("cached", [False, True], ids=["online", "teacher_cache"])
def test_a_paper_and_a_timm_teacher_train_stop_and_resume_exactly(tmp_path, timm_weights, monkeypatch, cached):
    cache = tmp_path / "cache"
    extra = ("--teacher_cache", cache, "--teacher_views", 2) if cached else ()
    straight = tmp_path / "straight"
    res = run_main(*distill_args(timm_weights, straight, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    if cached:
        built = cache_files(cache)
        assert built
    stopped = tmp_path / "stopped"
    res = run_until_stopped(monkeypatch, distill_args(timm_weights, stopped, *extra))
    assert res.returncode == 75, res.stderr[-3000:]
    res = run_main(*distill_args(timm_weights, stopped, *extra, "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    if cached:
        assert cache_files(cache) == built  # both later runs reused the cache as it was built
    a, b = (load_file(run / "checkpoint_last.pt") for run in (straight, stopped))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert set(a["args"]["weight_sha256"]) >= {"timm/vit_tiny_patch16_224.safetensors",
                                               "pca_weights/timm-vit_tiny_patch16_224_pca_32d_gldv2_prelogits.pt"}


def test_the_video_flows_take_a_timm_teacher(tmp_path, timm_weights):
    """svd_pca_learn.py writes the svd-data PCA file of the timm teacher; svd_eval.py evaluates it with --pca;
    svd_distill.py distils it beside a paper teacher."""
    svd = make_toy_svd(tmp_path / "svd", n_queries=2, n_train_queries=2, positives=1, negatives=1, n_unlabeled=2,
                       frames=(2, 3), size=32, seed=2)
    assert svd["ids"]
    meta = tmp_path / "svd" / "svd.yaml"
    weights = tmp_path / "weights"
    shutil.copytree(timm_weights, weights)
    out = pca_weight_path(weights, VIT, 8, "svd", "gem", 1.0)
    assert not out.exists()
    res = run_main("svd_pca_learn.py", "-t", VIT, "--teacher_pool", "gem", "-dm", meta, "--frames_per_video", 2,
                   "--crop_size", 32, "--path_to_pretrained_weights", weights, "--embed_dim", 8, "--num_workers", 0,
                   "--no_progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.is_file() and out.name == "timm-vit_tiny_patch16_224_pca_8d_svd_gem-p1.pt"
    results = tmp_path / "svd.json"
    res = run_main("svd_eval.py", "-t", VIT, "--teacher_pool", "gem", "--pca", "--embed_dim", 8, "-dm", meta,
                   "--crop_size", 32, "--path_to_pretrained_weights", weights, "--num_workers", 0, "--no_progress",
                   "--output_json", results)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(results.read_text())["protocol"]["teacher_pool"] == "gem"
    res = run_main("svd_distill.py", "-a", "resnet18", "-ts", "barlowtwins", VIT, "-c", tmp_path / "run", "-dm", meta,
                   "--crop_size", 32, "--path_to_pretrained_weights", weights_dir(("barlowtwins", VIT), embed_dim=8),
                   "--embed_dim", 8, "--student_init", "random", "-b", 2, "--epochs", 1, "--num_workers", 0,
                   "--no_progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.isfinite(load_file(tmp_path / "run" / "checkpoint_last.pt")["state_dict"]["module.base_encoder.fc.weight"]
                       .numpy()).all()


def test_check_weights_reports_a_timm_teacher_and_its_pca_files(tmp_path, timm_weights, capsys):
    from tools.check_weights import main as check_weights

    check_weights(["--path_to_pretrained_weights", str(timm_weights), "--teachers", VIT, "--embed_dim", str(EMBED)])
    table = capsys.readouterr().out
    assert str(teacher_file(VIT, timm_weights)) not in table  # nothing broken, so no file named in an error
    assert "| teacher timm:vit_tiny_patch16_224 | yes | yes | 192 |" in table
    assert "PCA timm:vit_tiny_patch16_224 32-d gldv2" in table and "PCA timm:vit_tiny_patch16_224 32-d svd" in table

    weights = tmp_path / "weights"
    shutil.copytree(timm_weights, weights)
    shutil.copy(saved(CONVNEXT, tmp_path / "other"), teacher_file(VIT, weights))
    with pytest.raises(SystemExit) as exc:
        check_weights(["--path_to_pretrained_weights", str(weights), "--teachers", VIT, "--embed_dim", str(EMBED)])
    assert exc.value.code == 1
    assert str(teacher_file(VIT, weights)) in capsys.readouterr().out


def test_a_missing_pca_file_names_the_file_and_the_script_of_the_flows_data(tmp_path, timm_weights):
    """A timm teacher's PCA file is the flow's data's: the error names that file and the script that learns it."""
    weights = tmp_path / "weights"
    shutil.copytree(timm_weights, weights)
    missing = pca_weight_path(weights, VIT, EMBED, "gldv2", "gem", 3.0)
    missing.unlink()
    res = run_main(*distill_args(weights, tmp_path / "run", "--teacher_pool", "gem"))
    assert_user_error(res, 1, missing, "gld_pca_learn.py", "--teacher_pool gem")
    make_toy_svd(tmp_path / "svd", n_queries=1, n_train_queries=1, positives=1, negatives=1, n_unlabeled=1,
                 frames=(2, 2), size=32, seed=2)
    missing = pca_weight_path(weights, VIT, EMBED, "svd", "pre_logits")
    missing.unlink()
    res = run_main("svd_eval.py", "-t", VIT, "--pca", "--embed_dim", EMBED, "-dm", tmp_path / "svd" / "svd.yaml",
                   "--path_to_pretrained_weights", weights, "--num_workers", 0, "--no_progress")
    assert_user_error(res, 1, missing, "svd_pca_learn.py")
