"""What a person sees: the console of a training run (launch, epochs, no argument dump, iteration lines only with
--log_every) against its log file, and --tensorboard's event files holding metrics.jsonl's figures."""
import importlib.util
import json
import math

import pytest
import torch
from helpers import assert_user_error, distill_cmd, read_metrics, run_main

from datasets.toy import make_toy_revisitop
from models.students import build_student, student_checkpoint_state

pytestmark = pytest.mark.slow


def without_log_every(cmd):
    i = cmd.index("--log_every")
    return cmd[:i] + cmd[i + 2:]


def test_the_console_shows_the_run_and_the_log_file_keeps_everything(tmp_path):
    run = tmp_path / "run"
    res = run_main(*without_log_every(distill_cmd(run)))
    assert res.returncode == 0, res.stderr[-3000:]
    log = (run / "log.log").read_text()
    for text in (res.stdout, log):
        assert "launch: one process, device cpu" in text and "master" not in text
        assert "epoch 2/2 done" in text
    assert "  arch: resnet18" in log and "git revision" in log  # the argument dump: the log file only
    assert "  arch: resnet18" not in res.stdout and "git revision" not in res.stdout
    iterations = [r for r in read_metrics(run) if r["type"] == "iter"]
    assert iterations and all(f"iter {r['iter']}/" in log for r in iterations)  # recorded, in the file
    assert " iter " not in res.stdout  # and not on the console
    shown = run_main(*distill_cmd(tmp_path / "shown"))  # --log_every 1: every iteration on the console too
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert sum(" iter " in line for line in shown.stdout.splitlines()) == len(iterations)


def test_tensorboard_holds_the_figures_of_metrics_jsonl_and_a_resume_adds_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    res = run_main(*distill_cmd(run, "--epochs", 1, "--tensorboard"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_main(*distill_cmd(run, "--epochs", 2, "--tensorboard", "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = read_metrics(run)
    iters = [r for r in records if r["type"] == "iter"]
    epochs = [r for r in records if r["type"] == "epoch"]
    for tag, key, rows in (("train/loss", "loss", iters), ("train/lr", "lr", iters),
                           ("train/images_per_s", "images_per_s", iters), ("epoch/loss", "loss", epochs)):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["iteration"] for r in rows], tag  # each step once, in order
        for s, r in zip(scalars, rows):
            assert math.isclose(s.value, r[key], rel_tol=1e-6), (tag, s.value, r[key])  # stored as float32
    teachers = set(iters[0]["pos_win_share"])
    assert {t.split("/")[-1] for t in events.Tags()["scalars"] if t.startswith("train/pos_win_share/")} == teachers


def test_tensorboard_without_its_package_is_a_usage_error_before_any_work(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    res = run_main(*distill_cmd(tmp_path / "run", "--tensorboard"))
    assert_user_error(res, 2, "--tensorboard", "pip install tensorboard")
    assert not (tmp_path / "run").exists()


def test_an_evaluation_writes_its_maps_at_the_checkpoints_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_toy_revisitop(tmp_path / "data", "roxford5k", n_queries=3, n_db=9, size=48, seed=0)
    torch.manual_seed(0)
    student = build_student("resnet18", embed_dim=16)
    for epoch in (10, 20):  # two snapshots of a run, evaluated into its TensorBoard folder
        torch.save({"state_dict": student_checkpoint_state(student), "epoch": epoch}, tmp_path / f"c{epoch}.pt")
        res = run_main("oxford_paris_eval.py", "-a", "resnet18", "--embed_dim", 16, "-r", tmp_path / f"c{epoch}.pt",
                       "-dp", tmp_path / "data", "--imsize", 48, "--num_workers", 0, "--no_progress",
                       "--output_json", tmp_path / f"e{epoch}.json", "--tensorboard", tmp_path / "tb")
        assert res.returncode == 0, res.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for mode in ("E", "M", "H"):
        scalars = events.Scalars(f"eval/roxford5k/mAP_{mode}")
        assert [s.step for s in scalars] == [10, 20]
        for s, epoch in zip(scalars, (10, 20)):
            expected = json.loads((tmp_path / f"e{epoch}.json").read_text())["map"][mode]
            assert math.isclose(s.value, expected, rel_tol=1e-6)
