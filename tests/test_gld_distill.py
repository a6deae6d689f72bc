"""gld_distill.py end to end on toy data: outputs and checkpoint format, exact resume after SIGKILL, 2-process
torchrun, the paper's README command, and bad inputs."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    CHEAP_TEACHERS,
    DISTILL_BATCH,
    DISTILL_EPOCHS,
    ROOT,
    assert_exit,
    assert_user_error,
    distill_cmd,
    gld_root,
    read_metrics,
    run_main,
    run_script,
    torch_threads,
    torchrun,
    weights_dir,
)

from datasets.gld import image_path, read_groups
from models.pca_layer import pca_weight_path
from models.students import build_student, load_student
from models.teachers import TEACHER_FILES
from utils.checkpoint import load_file
from utils.config import load_yaml
from utils.runtime import seed_everything

EPOCHS, BATCH = DISTILL_EPOCHS, DISTILL_BATCH  # what distill_cmd runs


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-epoch run (started with -r auto on an empty folder)."""
    ckpt_dir = tmp_path_factory.mktemp("reference")
    res = run_main(*distill_cmd(ckpt_dir, "-r", "auto"))
    assert res.returncode == 0, res.stdout + res.stderr
    return ckpt_dir, res


pytestmark = pytest.mark.slow


def test_outputs_metrics_and_schedule(reference):
    ckpt_dir, res = reference
    assert "starting from scratch" in res.stdout
    config = load_yaml(ckpt_dir / "config.yaml")
    assert config["teachers"] == list(CHEAP_TEACHERS) and config["epochs"] == EPOCHS
    assert "epoch 2/2 done" in (ckpt_dir / "log.log").read_text()
    records = read_metrics(ckpt_dir)
    iters = [r for r in records if r["type"] == "iter"]
    epochs = [r for r in records if r["type"] == "epoch"]
    n_iter = 2 * EPOCHS  # 8 landmark groups, 4 per batch
    assert [r["iteration"] for r in iters] == list(range(1, n_iter + 1))
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in iters:
        # lr logged before the step: the closed-form cosine schedule of CosineAnnealingLR(T_max, eta_min=1e-6)
        t = r["iteration"] - 1
        expected = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / n_iter)) / 2
        assert r["lr"] == pytest.approx(expected, rel=1e-6)
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_s"] > 0
        assert sum(r["pos_win_share"].values()) == pytest.approx(1.0)
    for e in epochs:
        mean = sum(r["loss"] for r in iters if r["epoch"] == e["epoch"]) / 2
        assert e["loss"] == pytest.approx(mean)


def test_checkpoint_has_the_paper_format_and_loads(reference):
    ckpt_dir, _ = reference
    last = torch.load(ckpt_dir / "checkpoint_last.pt", weights_only=True)  # plain types: no allow-list needed
    snap = load_file(ckpt_dir / "checkpoint_2.pt")
    assert not (ckpt_dir / "checkpoint_1.pt").exists()  # --snapshot_step 2
    assert {"epoch", "state_dict", "optimizer", "lr_scheduler", "loss_fn"} <= set(last)
    assert last["epoch"] == snap["epoch"] == 2
    keys = list(last["state_dict"])
    assert len(keys) == 122 and all(k.startswith("module.base_encoder.") for k in keys)
    assert "module.base_encoder.fc.weight" in keys and not any("teacher" in k for k in keys)
    # every diagonal entry of both KL terms counts one win: 2 terms x 4 pairs x 4 iterations
    assert last["loss_fn"]["pos_win_count"].shape == (2,)
    assert int(last["loss_fn"]["pos_win_count"].sum()) == 2 * BATCH * 2 * EPOCHS
    assert last["lr_scheduler"]["last_epoch"] == 2 * EPOCHS
    for key, value in last["state_dict"].items():
        assert torch.equal(value, snap["state_dict"][key])

    x = torch.randn(2, 3, 32, 32)
    ours = load_student(ckpt_dir / "checkpoint_last.pt", "resnet18")
    # the paper's eval rule: strip "module.base_encoder." and strict-load into a fresh student
    paper = build_student("resnet18", 512, 3.0).eval()
    prefix = "module.base_encoder."
    paper.load_state_dict({k[len(prefix):]: v for k, v in last["state_dict"].items() if k.startswith(prefix)},
                          strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), paper(x), rtol=0, atol=0)
    # and training changed the seeded initial student
    seed_everything(0)
    init = build_student("resnet18", 512, 3.0)
    assert not torch.equal(init.state_dict()["fc.weight"], paper.state_dict()["fc.weight"])


def test_sigkill_mid_epoch_then_resume_is_exact(reference, tmp_path):
    ref_dir, _ = reference
    ckpt_dir = tmp_path / "killed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, distill_cmd(ckpt_dir))], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(r["type"] == "iter" and r["epoch"] == 2 for r in read_metrics(ckpt_dir)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed mid-epoch 2"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    for path in ckpt_dir.glob("*.pt"):  # nothing truncated: every checkpoint loads
        load_file(path)
    assert load_file(ckpt_dir / "checkpoint_last.pt")["epoch"] == 1
    res = run_main(*distill_cmd(ckpt_dir, "-r", "auto"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from" in res.stdout
    assert not list(ckpt_dir.glob(".checkpoint_*.tmp"))
    ref, got = load_file(ref_dir / "checkpoint_last.pt"), load_file(ckpt_dir / "checkpoint_last.pt")
    assert got["epoch"] == ref["epoch"] == 2
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for (k1, s1), (k2, s2) in zip(ref["optimizer"]["state"].items(), got["optimizer"]["state"].items()):
        assert k1 == k2
        torch.testing.assert_close(s2["exp_avg"], s1["exp_avg"], rtol=0, atol=1e-6)
    assert torch.equal(ref["loss_fn"]["pos_win_count"], got["loss_fn"]["pos_win_count"])
    assert ref["lr_scheduler"] == got["lr_scheduler"]


def test_torchrun_two_processes(tmp_path):
    ckpt_dir = tmp_path / "ddp"
    res = run_script(*distill_cmd(ckpt_dir, "-b", 2, "--num_workers", 0), launcher=torchrun(2))
    assert res.returncode == 0, res.stdout + res.stderr
    ckpt = load_file(ckpt_dir / "checkpoint_last.pt")
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2
    assert len(ckpt["sampler"]) == 2 and [s["rank"] for s in ckpt["sampler"]] == [0, 1]
    # the pair RNGs of the two ranks are distinct streams
    assert ckpt["sampler"][0]["rng"] != ckpt["sampler"][1]["rng"]
    # 2 ranks x 2 pairs = 4 global pairs per iteration, 2 iterations per epoch
    assert int(ckpt["loss_fn"]["pos_win_count"].sum()) == 2 * 4 * 2 * EPOCHS
    iters = [r for r in read_metrics(ckpt_dir) if r["type"] == "iter"]
    assert len(iters) == 2 * EPOCHS and all(math.isfinite(r["loss"]) for r in iters)
    load_student(ckpt_dir / "checkpoint_last.pt", "resnet18")


def test_readme_command_with_delg_and_dolg(tmp_path):
    weights = weights_dir(("resnet101_delg", "resnet101_dolg"))
    ckpt_dir = tmp_path / "readme"
    # the README's command verbatim, then tiny sizes for a CPU test
    cmd = ["gld_distill.py", "-a", "resnet18", "-ts", "resnet101_delg", "resnet101_dolg", "-c", ckpt_dir,
           "--gld_root_path", gld_root(), "--path_to_pretrained_weights", weights,
           "--student_init", "random", "--epochs", 1, "--imsize", 32, "-b", BATCH, "--num_workers", 0, "--no_progress"]
    res = run_script(*cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    ckpt = load_file(ckpt_dir / "checkpoint_last.pt")
    assert ckpt["epoch"] == 1 and ckpt["args"]["teachers"] == ["resnet101_delg", "resnet101_dolg"]
    load_student(ckpt_dir / "checkpoint_last.pt", "resnet18")


# ------------------------------------------------------------------------------------------------------ bad input
def run_gld_distill(argv):
    from gld_distill import main

    main([str(a) for a in argv] + ["--device", "cpu"])


def test_bad_inputs_stop_with_clear_messages(tmp_path, capsys):
    weights = weights_dir()
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", "--gld_root_path", tmp_path / "nothing")[1:])
    assert_exit(exc, 2, "--gld_root_path", tmp_path / "nothing", err=capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", "--gld_root_path", tmp_path)[1:])
    assert_exit(exc, 1, tmp_path / "meta" / "train_clean.csv")
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", teachers=("mocov3", "resnet999"))[1:])
    assert_exit(exc, 2, "--teachers", "resnet999", err=capsys.readouterr().err)
    no_pca = tmp_path / "no_pca"
    no_pca.mkdir()
    for name in os.listdir(weights):
        if name.endswith(".tar"):
            os.symlink(weights / name, no_pca / name)
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", weights=no_pca)[1:])
    assert_exit(exc, 1, pca_weight_path(no_pca, "mocov3", 512), "gld_pca_learn.py")  # the file, the script making it
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", weights=tmp_path)[1:])
    assert_exit(exc, 1, tmp_path / TEACHER_FILES["mocov3"])
    singles = tmp_path / "singles"
    (singles / "meta").mkdir(parents=True)
    (singles / "meta/train_clean.csv").write_text("landmark_id,images\n1,abcd\n2,abce\n")
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", "--gld_root_path", singles)[1:])
    assert_exit(exc, 1, singles / "meta/train_clean.csv", "2 images")  # the file, and the minimum per landmark
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", "-r", tmp_path / "none.pt")[1:])
    assert_exit(exc, 2, "--resume", tmp_path / "none.pt", err=capsys.readouterr().err)


def test_missing_image_names_the_file(tmp_path):
    root = tmp_path / "gld"
    shutil.copytree(gld_root(), root)
    victims = read_groups(root)[0]  # a whole landmark
    for image_id in victims:
        image_path(root, image_id).unlink()
    with pytest.raises(SystemExit) as exc:
        run_gld_distill(distill_cmd(tmp_path / "c", "--gld_root_path", root, "--epochs", 1)[1:])
    message = assert_exit(exc, 1, "3 of 24")  # a data error: how many of the images are missing, and one of them
    assert any(str(image_path(root, image_id)) in message for image_id in victims), message
    assert not (tmp_path / "c").exists()  # found before anything was written


def test_corrupt_image_found_by_a_loader_worker_is_one_line(tmp_path):
    root = tmp_path / "gld"
    shutil.copytree(gld_root(), root)
    for image_id in read_groups(root)[0] + read_groups(root)[1]:  # two landmarks: the first batch reads one
        image_path(root, image_id).write_bytes(b"\xff\xd8 not a jpeg")
    res = run_main(*distill_cmd(tmp_path / "c", "--gld_root_path", root, "--epochs", 1, "--num_workers", 1))
    line = assert_user_error(res, 1, "gld_distill.py: error: ")
    assert res.stderr.strip().splitlines()[-1] == line  # the last word
    assert any(str(image_path(root, image_id)) in line for image_id in read_groups(root)[0] + read_groups(root)[1])
