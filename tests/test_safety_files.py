"""Outputs are complete or absent; inputs the paper accepted silently (non-integer ground-truth indices, an image
listed twice in a landmark) are errors naming the file; the resume policy covers every training flag."""
import importlib
import json
import math
import pickle

import numpy as np
import pytest
from helpers import assert_names
from PIL import Image

from datasets.gld import GLDDataError, read_groups
from datasets.oxford_paris import GroundTruthError, RevisitedDataset, load_ground_truth
from engine.params import GLDTrainParams, SVDTrainParams
from utils.files import atomic_write, read_jsonl, stale_temporaries, write_json
from utils.flags import RESUME_POLICIES, declared_fields
from utils.run_dir import truncate_metrics
from utils.visualize import save_retrieval_strip


class Boom(RuntimeError):
    pass


def test_atomic_write_keeps_the_previous_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"map": 1.0})
    with pytest.raises(Boom), atomic_write(path) as f:
        f.write('{"map": 2.')  # half a record, then the writer dies
        raise Boom
    assert json.loads(path.read_text()) == {"map": 1.0}
    assert not stale_temporaries(tmp_path) and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(Boom), atomic_write(tmp_path / "new.json") as f:
        f.write("{")
        raise Boom
    assert not (tmp_path / "new.json").exists()


def test_write_json_turns_non_finite_numbers_into_null(tmp_path):
    write_json(tmp_path / "r.json", {"map": {"E": float("nan"), "M": 0.5, "H": [float("inf"), 1]}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"map": {"E": None, "M": 0.5, "H": [None, 1]}}


def test_a_torn_last_metrics_line_is_not_a_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "iter", "iteration": 1}\n{"type": "iter", "iteration": 2}\n{"type": "it')
    assert [r["iteration"] for r in read_jsonl(path)] == [1, 2]
    assert truncate_metrics(tmp_path, 1) == 1
    assert path.read_text() == '{"type": "iter", "iteration": 1}\n'
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')  # a torn line in the middle is a real corruption
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_jsonl(path)


def test_retrieval_picture_is_written_atomically(tmp_path, monkeypatch):
    img = Image.new("RGB", (20, 10), (90, 90, 90))
    path = save_retrieval_strip(tmp_path / "q.png", img, [(img, "positive"), (img, "negative")])
    assert Image.open(path).size[0] > 0
    before = path.read_bytes()

    def fail(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise Boom

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(Boom):
        save_retrieval_strip(path, img, [(img, "junk")])
    assert path.read_bytes() == before and not stale_temporaries(tmp_path)


# ------------------------------------------------------------------------------------------------ inputs
def write_gnd(folder, gnd, imlist=("a", "b", "c", "d")):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"imlist": list(imlist), "qimlist": ["q"] * len(gnd), "gnd": gnd}
    with open(folder / f"gnd_{folder.name}.pkl", "wb") as f:
        pickle.dump(cfg, f)
    return folder / f"gnd_{folder.name}.pkl"


@pytest.mark.parametrize("easy, bad", [([0, 1.5], "1.5"), (np.array([0.0, 2.7]), "2.7"), (["0", "x"], "'x'"),
                                       ([0, float("nan")], "nan")])
def test_ground_truth_indices_must_be_whole_numbers(tmp_path, easy, bad):
    path = write_gnd(tmp_path / "roxford5k", [{"easy": easy, "hard": [2], "junk": []}])
    with pytest.raises(GroundTruthError) as exc:
        load_ground_truth(path)
    assert_names(exc.value, path, "gnd[0]['easy']", bad)  # the file, the entry and the value


def test_ground_truth_whole_floats_and_int_arrays_are_accepted(tmp_path):
    path = write_gnd(tmp_path / "roxford5k", [{"easy": np.array([0.0, 3.0]), "hard": np.array([1], np.int32),
                                               "junk": [], "bbx": [0, 0, 5, 5]}])
    assert load_ground_truth(path)["gnd"][0]["hard"].tolist() == [1]


@pytest.mark.parametrize("box", [[0, 0, 5], [5, 0, 1, 5], ["a", 0, 1, 1], [0, 0, math.inf, 3]])
def test_query_boxes_are_checked_when_cropping(tmp_path, box):
    write_gnd(tmp_path / "roxford5k", [{"easy": [0], "hard": [], "junk": [], "bbx": box}])
    dataset = RevisitedDataset(tmp_path, "roxford5k")
    dataset.queries()  # not cropping: the box is not used
    with pytest.raises(GroundTruthError) as exc:
        dataset.queries(crop=True)
    assert_names(exc.value, "gnd[0]['bbx']", repr(box))  # the entry and the box it holds


def test_an_image_listed_twice_in_a_landmark_is_an_error(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/train_clean.csv").write_text("landmark_id,images\n7,abc1 abc2\n8,abd1 abd2 abd1\n")
    with pytest.raises(GLDDataError) as exc:
        read_groups(tmp_path)
    assert_names(exc.value, f"{tmp_path / 'meta/train_clean.csv'}:3", "'8'", "abd1")  # file:line, landmark, image


# ------------------------------------------------------------------------------------------------ resume policy
@pytest.mark.parametrize("script", ["gld_distill", "svd_distill"])
def test_every_training_flag_has_a_resume_rule(script):
    """A flag added to a training script must say what a resume does when its value changes: every option of the
    parser is a declared field with one of the three rules."""
    module = importlib.import_module(script)
    dests = {a.dest for a in module.get_args_parser()._actions if a.dest != "help"}
    cls = {"gld_distill": GLDTrainParams, "svd_distill": SVDTrainParams}[script]
    rules = {field.name: spec.resume for field, spec in declared_fields(cls)}
    assert dests == set(rules)
    assert {name for name, rule in rules.items() if rule not in RESUME_POLICIES} == set()


def test_a_failed_write_is_one_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from utils.files import OutputError

    path = tmp_path / "checkpoint_last.pt"
    write_json(path, {"epoch": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OutputError) as exc:
        write_json(path, {"epoch": 2})
    assert_names(exc.value, path, "No space left on device")  # the file, and the system's reason
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"epoch": 1} and not stale_temporaries(tmp_path)
