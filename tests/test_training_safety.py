"""Training runs that used to crash, overwrite or lose things: a single-pair last batch, a -c folder that holds a
run, refused and changed-flag resumes, a kill between two checkpoint writes, Ctrl-C, files that are not
checkpoints, a PCA file of the wrong size and frame counts that promise missing frames. Each ends in a finished
run or in one clear message, and nothing already written changes."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    CHEAP_TEACHERS,
    ROOT,
    assert_user_error,
    distill_cmd,
    random_pca,
    read_metrics,
    run_main,
    run_script,
    torchrun,
    weights_dir,
)

from models.pca_layer import pca_weight_path, save_pca_layer
from models.teachers import TEACHER_FILES
from utils.checkpoint import load_file

pytestmark = pytest.mark.slow

GROUPS = 8  # usable landmark groups of gld_root()


def one_line_failure(res, *needles):
    """Exit 1 with a single ``<script>: error: ...`` line on stderr naming ``needles``, and no traceback."""
    return assert_user_error(res, 1, *needles)


def wins(ckpt_dir):
    return int(load_file(ckpt_dir / "checkpoint_last.pt")["loss_fn"]["pos_win_count"].sum())


def linked_weights(folder):
    """A weights folder whose files are links to the shared test weights (cheap to alter one file)."""
    for path in weights_dir().rglob("*"):
        if path.is_file():
            target = folder / path.relative_to(weights_dir())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, target)
    return folder


def snapshot_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------- the single-pair batch
@pytest.mark.parametrize("procs, batch", [(1, 7), (2, 3)])
def test_a_single_leftover_pair_joins_the_last_batch(tmp_path, procs, batch):
    """8 groups with -b 7 (one process), or 4 per process with -b 3 (two): the paper's last batch of one pair
    crashed BatchNorm. Here it joins the batch before, so every group is still visited once per epoch."""
    ckpt_dir = tmp_path / "run"
    launcher = torchrun(procs) if procs > 1 else None
    res = run_script(*distill_cmd(ckpt_dir, "-b", batch, "--epochs", 1, "--num_workers", 0), launcher=launcher)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    ckpt = load_file(ckpt_dir / "checkpoint_last.pt")
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 1 and ckpt["world_size"] == procs
    assert wins(ckpt_dir) == 2 * GROUPS  # both KL terms count one positive per pair of the epoch
    assert f"(the last holds {GROUPS // procs} per process: a single leftover pair joins it)" in res.stdout


def test_svd_single_leftover_video_joins_the_last_batch(tmp_path):
    from datasets.toy import make_toy_svd

    info = make_toy_svd(tmp_path / "svd", n_queries=1, n_train_queries=6, positives=2, negatives=1, n_unlabeled=1,
                        frames=(2, 3), size=32, seed=2)
    n_train = 6 * 4
    assert len(info["ids"]["train_query"]) == 6
    res = run_main("svd_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", tmp_path / "run",
                     "-dm", tmp_path / "svd" / "svd.yaml", "--path_to_pretrained_weights", weights_dir(),
                     "--student_init", "random", "-b", n_train - 1, "--num_workers", 0, "--crop_size", 32,
                     "--lr", 1e-3, "--epochs", 1, "--no_progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_file(tmp_path / "run" / "checkpoint_last.pt")["iteration"] == 1
    assert wins(tmp_path / "run") == 2 * n_train


# ----------------------------------------------------------------------------------------- the run folder
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run with a snapshot every epoch (-b 4: 2 iterations per epoch)."""
    ckpt_dir = tmp_path_factory.mktemp("finished")
    res = run_main(*distill_cmd(ckpt_dir, "--snapshot_step", 1))
    assert res.returncode == 0, res.stderr[-3000:]
    return ckpt_dir


def test_a_fresh_run_never_writes_into_a_run_folder(finished, tmp_path):
    before = snapshot_bytes(finished)
    res = run_main(*distill_cmd(finished, "--snapshot_step", 1))
    one_line_failure(res, finished, "-r auto", "--overwrite")  # the folder, and the two ways on
    assert snapshot_bytes(finished) == before  # config, log, metrics and every checkpoint untouched
    # --overwrite: the previous run is deleted first, so no snapshot of it survives next to the new ones
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    res = run_main(*distill_cmd(copy, "--epochs", 1, "--snapshot_step", 1, "--overwrite"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in copy.glob("*.pt")) == ["checkpoint_1.pt", "checkpoint_last.pt"]
    assert [r["iteration"] for r in read_metrics(copy) if r["type"] == "iter"] == [1, 2]
    assert "--overwrite: deleted the previous run's" in (copy / "log.log").read_text()


@pytest.mark.parametrize("flag, value, trained, asked", [  # the flag as the run was trained, and as now given
    ("-a", "resnet34", "--arch resnet18", "--arch resnet34"),
    ("--seed", "3", "--seed 0", "--seed 3"),
    ("-s", "mean", "--strategy maxmin", "--strategy mean"),
    ("--imsize", "40", "--imsize 32", "--imsize 40"),
])
def test_a_refused_resume_writes_nothing(finished, flag, value, trained, asked):
    before = snapshot_bytes(finished)
    res = run_main(*distill_cmd(finished, "--snapshot_step", 1, "--epochs", 3, "-r", "auto", flag, value))
    one_line_failure(res, finished, trained, asked)
    assert snapshot_bytes(finished) == before


def test_resuming_a_finished_run_has_nothing_to_do(finished):
    before = snapshot_bytes(finished)
    res = run_main(*distill_cmd(finished, "--snapshot_step", 1, "-r", "auto"))
    assert res.returncode == 0 and "nothing to do" in res.stdout, res.stderr[-2000:]
    assert snapshot_bytes(finished) == before
    res = run_main(*distill_cmd(finished, "--snapshot_step", 1, "-r", "auto", "--epochs", 1))
    one_line_failure(res, "--epochs 1", "--epochs 2")  # the flag as given, and the value that resumes


def test_save_every_writes_checkpoint_last_every_n_epochs_the_last_one_and_at_a_stop(tmp_path, monkeypatch):
    """--save_every 2 over 3 epochs: checkpoint_last.pt after epochs 2 and 3 only. With --save_every 5, a stop
    signal at the end of epoch 1 still saves it (exit 75), and -r auto ends on the same weights."""
    import engine.distill

    written, save = [], engine.distill.save_atomic
    monkeypatch.setattr(engine.distill, "save_atomic", lambda ckpt, path: (written.append((Path(path).name,
                                                                                             ckpt["epoch"])),
                                                                          save(ckpt, path)))
    flags = ("--epochs", 3, "--snapshot_step", 10)
    res = run_main(*distill_cmd(tmp_path / "every2", *flags, "--save_every", 2))
    assert res.returncode == 0, res.stderr[-3000:]
    assert written == [("checkpoint_last.pt", 2), ("checkpoint_last.pt", 3)]

    train_epoch = engine.distill.Trainer.train_epoch

    def stop_after_the_first_epoch(trainer, epoch, progress=None):
        record = train_epoch(trainer, epoch, progress)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # noted by the run's StopRequest, as a cluster's stop
        return record

    written.clear()
    monkeypatch.setattr(engine.distill.Trainer, "train_epoch", stop_after_the_first_epoch)
    stopped = tmp_path / "stopped"
    res = run_main(*distill_cmd(stopped, *flags, "--save_every", 5))
    assert res.returncode == 75, res.stderr[-3000:]
    assert written == [("checkpoint_last.pt", 1)]
    monkeypatch.setattr(engine.distill.Trainer, "train_epoch", train_epoch)
    res = run_main(*distill_cmd(stopped, *flags, "--save_every", 5, "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert written[-1] == ("checkpoint_last.pt", 3) and len(written) == 2
    a, b = (load_file(run / "checkpoint_last.pt")["state_dict"] for run in (tmp_path / "every2", stopped))
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0, msg=key)


def test_kill_between_the_two_checkpoint_writes_loses_no_snapshot(finished, tmp_path):
    """A kill after checkpoint_last.pt but before checkpoint_1.pt (the order of older runs): resuming writes the
    missing snapshot. A kill after the snapshot but before checkpoint_last.pt (today's order): -r auto resumes from
    the newer snapshot."""
    ref = load_file(finished / "checkpoint_2.pt")
    older = tmp_path / "older"
    older.mkdir()
    shutil.copy(finished / "checkpoint_1.pt", older / "checkpoint_last.pt")
    res = run_main(*distill_cmd(older, "--snapshot_step", 1, "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    recovered = load_file(older / "checkpoint_1.pt")
    for key, value in load_file(finished / "checkpoint_1.pt")["state_dict"].items():
        assert torch.equal(recovered["state_dict"][key], value), key
    for key, value in ref["state_dict"].items():  # and the resumed run ends where the uninterrupted one did
        torch.testing.assert_close(load_file(older / "checkpoint_2.pt")["state_dict"][key], value, rtol=0,
                                   atol=1e-6)
    newer = tmp_path / "newer"
    newer.mkdir()
    shutil.copy(finished / "checkpoint_1.pt", newer / "checkpoint_last.pt")
    shutil.copy(finished / "checkpoint_2.pt", newer / "checkpoint_2.pt")
    res = run_main(*distill_cmd(newer, "--snapshot_step", 1, "-r", "auto", "--epochs", 3))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {newer / 'checkpoint_2.pt'} at epoch 2" in res.stdout
    assert load_file(newer / "checkpoint_last.pt")["epoch"] == 3


def test_resume_with_another_batch_size_keeps_the_schedule(finished, tmp_path):
    """-b 4 -> -b 2 after epoch 1 of 2: 2 -> 4 iterations per epoch. The cosine keeps its position in epochs, so
    the lr continues from where it was and never climbs above its base value again."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished / "checkpoint_1.pt", run / "checkpoint_last.pt")
    res = run_main(*distill_cmd(run, "-r", "auto", "-b", 2))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: 2 -> 4 iterations per epoch" in res.stdout
    iters = [r for r in read_metrics(run) if r["type"] == "iter"]
    lrs = [r["lr"] for r in iters]
    closed = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(4, 8)]  # epoch 2 of 2 x 4
    assert lrs == pytest.approx(closed, rel=1e-6)
    assert max(lrs) < 1e-3 * (1 + math.cos(math.pi / 2)) / 2 + 1e-6  # below the lr at the resumed position
    assert load_file(run / "checkpoint_last.pt")["epoch"] == 2


def test_resume_with_another_lr_and_more_epochs_says_what_it_does(finished, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished / "checkpoint_last.pt", run / "checkpoint_last.pt")
    res = run_main(*distill_cmd(run, "-r", "auto", "--epochs", 3, "--lr", "5e-4"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--epochs 2 -> 3" in res.stdout and "--lr 0.001 -> 0.0005" in res.stdout
    lrs = [r["lr"] for r in read_metrics(run) if r["type"] == "iter"]
    closed = [1e-6 + (5e-4 - 1e-6) * (1 + math.cos(math.pi * t / 6)) / 2 for t in (4, 5)]
    assert lrs == pytest.approx(closed, rel=1e-6)


def test_metrics_stay_consistent_with_the_resumed_state(finished, tmp_path):
    """Records of iterations after the checkpoint (written before a kill) are dropped when they run again."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.copy(finished / "checkpoint_1.pt", run / "checkpoint_last.pt")
    (run / "checkpoint_2.pt").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "iter", "iteration": 5, "tor')  # a line torn by the kill
    res = run_main(*distill_cmd(run, "--snapshot_step", 1, "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    iters = [r["iteration"] for r in records if r["type"] == "iter"]
    assert iters == [1, 2, 3, 4]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]


def test_a_torn_last_metrics_line_is_mended_when_nothing_is_dropped(finished, tmp_path):
    """A kill in the middle of an append, at a checkpoint that needs no record dropped: the torn text must not be
    continued by the next record (the run could no longer resume, the plot no longer read it)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "iter", "iteration": 4, "tor')
    res = run_main(*distill_cmd(run, "--snapshot_step", 1, "-r", "auto", "--epochs", 3))
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert [r["iteration"] for r in records if r["type"] == "iter"] == [1, 2, 3, 4, 5, 6]
    again = run_main(*distill_cmd(run, "--snapshot_step", 1, "-r", "auto", "--epochs", 4))
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize("line", ['{"type": "iter", "iteration": 9, garbage}', "[1, 2]"])
def test_a_damaged_metrics_line_is_one_line_before_any_work(finished, tmp_path, line):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    text = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(text[:2] + [line + "\n"] + text[2:]))
    before = snapshot_bytes(run)
    res = run_main(*distill_cmd(run, "--snapshot_step", 1, "-r", "auto", "--epochs", 3))
    one_line_failure(res, "metrics.jsonl:3")
    assert snapshot_bytes(run) == before
    plot = run_script("tools/plot_metrics.py", run)
    assert_user_error(plot, 1, "metrics.jsonl:3")


def test_a_refused_mid_epoch_resume_leaves_the_config_as_it_was(finished, tmp_path):
    """A checkpoint written in the middle of an epoch resumes with the same -b only; the refusal (after the model is
    built) must not have rewritten config.yaml with the refused flags."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpt = load_file(run / "checkpoint_1.pt")
    ckpt.update(epoch_iteration=1, epoch_progress={"iteration": 1, "loss_sum": 0.5, "wins_at_start": [0, 0]})
    for stale in ("checkpoint_2.pt", "checkpoint_last.pt"):
        (run / stale).unlink()
    torch.save(ckpt, run / "checkpoint_last.pt")
    before = (run / "config.yaml").read_bytes()
    res = run_main(*distill_cmd(run, "--snapshot_step", 1, "-r", "auto", "-b", 2))
    one_line_failure(res, run / "checkpoint_last.pt", "-b")  # the checkpoint, and the flag it cannot change
    assert (run / "config.yaml").read_bytes() == before


# ----------------------------------------------------------------------------------------------- interrupts
def test_ctrl_c_ends_with_one_line_and_exit_130(tmp_path):
    ckpt_dir = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *map(str, distill_cmd(ckpt_dir, "--epochs", 50, "--num_workers", 1))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not read_metrics(ckpt_dir):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines() == ["gld_distill.py: interrupted"], err[-3000:]
    for path in ckpt_dir.glob("*.pt"):
        load_file(path)
    assert not list(ckpt_dir.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------- bad weight files
def test_a_teacher_file_that_is_a_web_page_is_named_before_any_work(tmp_path):
    weights = linked_weights(tmp_path / "weights")
    (weights / TEACHER_FILES["mocov3"]).unlink()
    (weights / TEACHER_FILES["mocov3"]).write_text("<!DOCTYPE html><html>Google Drive - Virus scan warning</html>")
    res = run_main(*distill_cmd(tmp_path / "run", weights=weights))
    one_line_failure(res, weights / TEACHER_FILES["mocov3"], "HTML")  # the file, and what it is instead
    assert "--trust_checkpoint" not in res.stderr and not (tmp_path / "run").exists()


def test_resume_from_a_text_file_says_it_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "checkpoint_last.pt"
    bogus.write_text("this is not a checkpoint\n")
    for trust in ([], ["--trust_checkpoint"]):
        res = run_main(*distill_cmd(tmp_path / "run", "-r", bogus, *trust))
        one_line_failure(res, bogus, "text")
        assert "--trust_checkpoint" not in res.stderr


def test_a_released_student_checkpoint_is_not_resumable(tmp_path):
    from models.students import build_student, student_checkpoint_state

    released = tmp_path / "r18.pth"
    torch.save({"state_dict": student_checkpoint_state(build_student("resnet18"))}, released)
    res = run_main(*distill_cmd(tmp_path / "run", "-r", released))
    one_line_failure(res, released, "-r/--resume", "oxford_paris_eval.py")  # the file, and the script that uses it


def test_a_pca_file_of_another_size_stops_training_and_evaluation(tmp_path):
    """A 16-d whitening stored under the 64-d name used to train a 64-d student silently."""
    weights = linked_weights(tmp_path / "weights")
    for name in CHEAP_TEACHERS:
        save_pca_layer(random_pca(2048, 16), pca_weight_path(weights, name, 64))
    res = run_main(*distill_cmd(tmp_path / "run", "--embed_dim", 64, weights=weights))
    one_line_failure(res, pca_weight_path(weights, "mocov3", 64), "--embed_dim 64", "--embed_dim 16")
    assert not (tmp_path / "run").exists()
    from datasets.toy import make_toy_revisitop

    make_toy_revisitop(tmp_path / "data", "roxford5k", n_queries=2, n_db=9, size=32, seed=0)
    common = ["oxford_paris_eval.py", "-dp", tmp_path / "data", "--path_to_pretrained_weights", weights,
              "--num_workers", 0, "--no_progress", "-t", "mocov3", "--pca"]
    one_line_failure(run_main(*common, "--embed_dim", 64), pca_weight_path(weights, "mocov3", 64), "--embed_dim 16")
    one_line_failure(run_main(*common, "--embed_dim", 32), pca_weight_path(weights, "mocov3", 32),
                     "svd_pca_learn.py", "--embed_dim 32")  # the missing file, the script and flag that make it


# -------------------------------------------------------------------------------------------- SVD frames
def test_frame_counts_beyond_the_frames_on_disk_stop_before_training(tmp_path):
    from datasets.toy import make_toy_svd

    info = make_toy_svd(tmp_path / "svd", n_queries=1, n_train_queries=2, positives=1, negatives=0, n_unlabeled=1,
                        frames=(2, 3), size=32, seed=3)
    victim = info["ids"]["train_query"][1]
    count_file = tmp_path / "svd" / "num_frames"
    lines = [f"{v} {int(n) + 2}" if v == victim else f"{v} {n}"
             for v, n in (line.split() for line in count_file.read_text().splitlines())]
    count_file.write_text("\n".join(lines) + "\n")
    common = ["-dm", tmp_path / "svd" / "svd.yaml", "--path_to_pretrained_weights", weights_dir(), "--no_progress"]
    res = run_main("svd_distill.py", "-ts", *CHEAP_TEACHERS, "-c", tmp_path / "run", "--student_init", "random",
                     "-b", 2, *common)
    one_line_failure(res, count_file, repr(victim))  # the count file, and a video it over-counts
    assert not (tmp_path / "run").exists()
    res = run_main("svd_pca_learn.py", "-t", "mocov3", "--dump_to", tmp_path / "pca.pt", *common)
    one_line_failure(res, count_file, repr(victim))
