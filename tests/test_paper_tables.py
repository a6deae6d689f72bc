"""tools/paper_tables.py: the planned commands and the markdown rendering from evaluation JSONs."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import paper_tables  # noqa: E402


def test_dry_run_lists_every_evaluation(tmp_path, capsys):
    (tmp_path / "ck" / "ro_re_to_r34_ep3k").mkdir(parents=True)
    (tmp_path / "ck" / "ro_re_to_r34_ep3k" / "checkpoint_3000.pt").write_bytes(b"x")
    paper_tables.main(["--dry_run", "--data_path", "D", "--weights", "W", "--checkpoints", str(tmp_path / "ck")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * (5 + 3) + 2 + 2
    assert sum("oxford_paris_eval.py -t resnet101_delg --pca -d roxford5k" in line for line in lines) == 1
    r34 = [line for line in lines if "-a resnet34 -r" in line and "rparis6k" in line]
    assert len(r34) == 1 and "ro_re_to_r34_ep3k/checkpoint_3000.pt" in r34[0] and " -ms -p 3" in r34[0]
    assert sum("svd_eval.py" in line and "--sim_fn cf" in line for line in lines) == 4


def test_tables_rendered_from_existing_results(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "image_ro_re_to_r18_ep3k_roxford5k.json").write_text(json.dumps({"map": {"E": 1, "M": 61.234, "H": 40.5}}))
    (res / "image_ro_re_to_r18_ep3k_rparis6k.json").write_text(json.dumps({"map": {"E": 1, "M": 77.0, "H": 55.556}}))
    (res / "video_mc_bt_to_r18_ep3k_svd.json").write_text(json.dumps({"map": {"top-100": 0.81234, "top-inf": 0.7}}))
    (res / "image_x.json").write_text("{}")  # a stray file is ignored
    args = ["--read_only", "--results_dir", str(res), "--data_path", str(tmp_path / "nodata"),
            "--weights", str(tmp_path / "now"), "--checkpoints", str(tmp_path / "nock"),
            "--svd_meta", str(tmp_path / "no.yaml")]
    text = paper_tables.main(args)
    assert "| ro_re_to_r18_ep3k | 61.23 | 40.50 | 77.00 | 55.56 |" in text
    assert "| mc_bt_to_r18_ep3k | 0.8123 | 0.7000 |" in text
    assert "| resnet101_gem | - | - | - | - |" in text  # missing results stay visible as "-"


def test_with_the_feature_store_each_model_runs_once_for_both_datasets_and_every_sim_fn(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths mean the same in the evaluations, which run in the repository
    paper_tables.main(["--dry_run", "--plus1m", "--feature_cache", "fc", "--data_path", "D", "--weights", "W",
                       "--checkpoints", "ck", "--sim_fn", "cf", "fme", "smx"])
    lines = capsys.readouterr().out.strip().splitlines()
    image = [line for line in lines if "oxford_paris_eval.py" in line]
    video = [line for line in lines if "svd_eval.py" in line]
    assert len(image) == 5 + 3 and len(video) == 2 + 2  # one run per model, not one per dataset
    for line in image:
        assert "-d roxford5k rparis6k" in line and "--plus1m" in line
    for line in video:
        assert "--sim_fn cf fme smx" in line
    for line in image + video:
        assert f"--feature_cache {tmp_path / 'fc'}" in line
        assert f"--output_json {tmp_path / 'paper_results'}" in line
    assert all(f"-dp {tmp_path / 'D'}" in line for line in image)


def fake_evaluations(monkeypatch, fail=()):
    """Stand-in for the evaluation scripts: a JSON whose mAP says whether --plus1m was given; models in ``fail``
    exit 1."""
    runs = []

    def run(cmd, cwd=None):
        runs.append(cmd)
        model = cmd[cmd.index("-t") + 1] if "-t" in cmd else cmd[cmd.index("-r") + 1]
        if any(name in model for name in fail):
            return type("Done", (), {"returncode": 1})()
        out = Path(cmd[cmd.index("--output_json") + 1])
        datasets = cmd[cmd.index("-d") + 1: cmd.index("-d") + 3] if "-d" in cmd else ["svd"]
        datasets = [d for d in datasets if not d.startswith("-")]
        records = [{"dataset": d, "map": {"E": 0, "M": 21.31 if "--plus1m" in cmd else 33.09, "H": 0,
                                          "top-100": 0.5, "top-inf": 0.4}} for d in datasets]
        out.write_text(json.dumps(records[0] if len(records) == 1 else records))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(paper_tables.subprocess, "run", run)
    return runs


def test_results_are_reused_only_for_the_same_command_and_files(tmp_path, monkeypatch):
    """A run with --plus1m after one without printed the first run's numbers (the JSON was named by table, model
    and dataset only)."""
    runs = fake_evaluations(monkeypatch)
    common = ["--only", "image", "--results_dir", str(tmp_path / "res"), "--data_path", str(tmp_path),
              "--weights", str(tmp_path / "w"), "--checkpoints", str(tmp_path / "ck")]
    plain = paper_tables.main(common)
    n_evals = len(runs)
    assert "| resnet101_delg | 33.09 |" in plain
    assert paper_tables.main(common) == plain and len(runs) == n_evals  # the same command again: all reused
    plus1m = paper_tables.main([*common, "--plus1m"])
    assert "| resnet101_delg | 21.31 |" in plus1m and "33.09" not in plus1m
    assert len(runs) == 2 * n_evals
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "resnet101_delg_pca.pt").write_bytes(b"x")  # another file, the same command: still reused
    assert paper_tables.main(common) == plain and len(runs) == 2 * n_evals
    (tmp_path / "roxford5k").mkdir()
    (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(b"new ground truth")  # a file it reads changed
    paper_tables.main(common)
    again = runs[2 * n_evals:]  # one run per model and dataset: only the ROxford evaluations read that file
    assert len(again) == n_evals // 2 and all(r[r.index("-d") + 1] == "roxford5k" for r in again)


def test_a_failed_evaluation_makes_the_exit_code_1(tmp_path, monkeypatch):
    fake_evaluations(monkeypatch, fail=("resnet101_gem",))
    with pytest.raises(SystemExit) as stop:
        paper_tables.main(["--only", "image", "--results_dir", str(tmp_path / "res"), "--data_path", str(tmp_path),
                           "--weights", str(tmp_path / "w"), "--checkpoints", str(tmp_path / "ck")])
    assert stop.value.code == 1
