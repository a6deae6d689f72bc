"""The flows from Python with plain values (the README's Python API): a training run and an evaluation of the student
it wrote, the same results as the scripts' command lines, and values checked as the command line checks them."""
import json

import pytest
import torch
from helpers import CHEAP_TEACHERS, gld_root, torch_threads, weights_dir

import gld_distill
import oxford_paris_eval
from datasets.toy import make_toy_revisitop
from engine.params import GLDTrainParams, ImageEvalParams, PCAParams
from engine.run import run
from utils.checkpoint import load_file
from utils.config import load_yaml
from utils.errors import UsageError, UserError
from utils.flags import declared_fields, protocol_values


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def training(ckpt_dir, **overrides):
    values = dict(teachers=list(CHEAP_TEACHERS), ckpt_dir=str(ckpt_dir), gld_root_path=str(gld_root()),
                  path_to_pretrained_weights=str(weights_dir()), student_init="random", imsize=32, batch_size=4,
                  epochs=1, num_workers=0, no_progress=True)
    return GLDTrainParams(**{**values, **overrides})


def test_a_training_run_and_an_evaluation_from_python_equal_the_scripts(tmp_path):
    trainer = run(training(tmp_path / "api"))
    assert trainer.iteration > 0 and (tmp_path / "api" / "checkpoint_last.pt").is_file()
    gld_distill.main(["-ts", *CHEAP_TEACHERS, "-c", str(tmp_path / "cli"), "--gld_root_path", str(gld_root()),
                      "--path_to_pretrained_weights", str(weights_dir()), "--student_init", "random", "--imsize",
                      "32", "-b", "4", "--epochs", "1", "--num_workers", "0", "--no_progress"])
    api, cli = (load_file(tmp_path / run_dir / "checkpoint_last.pt")["state_dict"] for run_dir in ("api", "cli"))
    assert api.keys() == cli.keys()
    for key, value in api.items():  # the same flags, the same run
        torch.testing.assert_close(cli[key], value, rtol=0, atol=0, msg=key)

    make_toy_revisitop(tmp_path / "data", "roxford5k", n_queries=3, n_db=12, size=40, seed=2)
    student = str(tmp_path / "api" / "checkpoint_last.pt")
    records = run(ImageEvalParams(arch="resnet18", resume=student, data_path=str(tmp_path / "data"),
                                  num_workers=0, no_progress=True))
    oxford_paris_eval.main(["-a", "resnet18", "-r", student, "-dp", str(tmp_path / "data"), "--num_workers", "0",
                            "--no_progress", "--output_json", str(tmp_path / "cli.json")])
    assert records[0]["map"] == json.loads((tmp_path / "cli.json").read_text())["map"]
    assert set(records[0]["map"]) == {"E", "M", "H"}


def test_config_and_protocol_records_follow_the_declarations(tmp_path):
    """config.yaml holds the flags declared for it (and the weight files' hashes), the checkpoint every flag, the
    JSON protocol every flag declared for it, under its recorded name."""
    params = training(tmp_path / "run")
    run(params)
    config = load_yaml(tmp_path / "run" / "config.yaml")
    declared = {field.name: spec for field, spec in declared_fields(GLDTrainParams)}
    assert set(config) == {name for name, spec in declared.items() if spec.config} | {"weight_sha256"}
    assert "overwrite" not in config  # declared config=False: a config reused as a command never deletes a run
    saved = load_file(tmp_path / "run" / "checkpoint_last.pt")["args"]
    assert set(declared) <= set(saved) and saved["teachers"] == list(CHEAP_TEACHERS)
    make_toy_revisitop(tmp_path / "data", "roxford5k", n_queries=3, n_db=12, size=40, seed=2)
    evaluation = ImageEvalParams(arch="resnet18", resume=str(tmp_path / "run" / "checkpoint_last.pt"),
                                 data_path=str(tmp_path / "data"), num_workers=0, no_progress=True, imsize=32)
    protocol = run(evaluation)[0]["protocol"]
    assert protocol_values(evaluation).items() <= protocol.items()
    assert protocol["gem_p"] == 3.0 and protocol["imsize"] == 32  # -p is recorded under its paper name


@pytest.mark.parametrize("bad", [
    {"batch_size": 1},  # below the minimum of 2 pairs
    {"strategy": "best"},  # not a choice
    {"teachers": ["mocov3", "mocov3"]},  # a teacher twice
    {"epochs": 2, "start_epoch": 2},  # a combination
    {"embed_dim": 4096},  # larger than the teachers' descriptors
])
def test_values_from_python_are_checked_as_the_command_line_checks_them(tmp_path, bad):
    with pytest.raises(UsageError) as exc:
        training(tmp_path / "run", **bad)
    assert exc.value.exit_code == 2
    named = {"batch_size": "--batch_size", "strategy": "--strategy", "teachers": "--teachers",
             "start_epoch": "--start_epoch", "embed_dim": "--embed_dim"}
    assert any(flag in str(exc.value) for key, flag in named.items() if key in bad)


def test_a_missing_required_value_and_a_missing_file_are_user_errors(tmp_path):
    with pytest.raises(UsageError) as exc:
        PCAParams()  # -t/--teacher is required
    assert "--teacher" in str(exc.value)
    with pytest.raises(UserError) as exc:
        ImageEvalParams(arch="resnet18", resume=str(tmp_path / "missing.pt"), data_path=str(tmp_path))
    assert "--resume" in str(exc.value) and "missing.pt" in str(exc.value)


def test_the_progress_bars_show_the_live_figures(tmp_path, capsys):
    """Training: the loss, the lr and images/s; extraction: items/s (before, the bars never showed them)."""
    run(training(tmp_path / "run", no_progress=False))
    bars = capsys.readouterr().err
    epoch_bar = [line for line in bars.replace("\r", "\n").splitlines() if line.startswith("epoch 1/1")]
    assert epoch_bar and all(f"{figure}=" in epoch_bar[-1] for figure in ("loss", "lr", "img_s"))
    make_toy_revisitop(tmp_path / "data", "roxford5k", n_queries=3, n_db=12, size=40, seed=2)
    run(ImageEvalParams(arch="resnet18", resume=str(tmp_path / "run" / "checkpoint_last.pt"),
                        data_path=str(tmp_path / "data"), num_workers=0))
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("roxford5k database") and "img_s=" in line for line in bars)
