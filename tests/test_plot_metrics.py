"""tools/plot_metrics.py: a training run's plot draws exactly its iteration records; the demo's retrieval grid."""
import json
import sys
from pathlib import Path

import pytest
from helpers import assert_exit, assert_names
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import plot_metrics  # noqa: E402

from utils.errors import UserError  # noqa: E402
from utils.training_plot import iteration_series  # noqa: E402


def write_metrics(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def iter_record(i, wins):
    return {"type": "iter", "epoch": 1 + (i - 1) // 3, "iter": 1 + (i - 1) % 3, "iteration": i, "loss": 5.0 / i,
            "lr": 1e-3 * (1 - i / 10), "images_per_s": 10.0, "pos_win_share": wins}


def test_the_plot_draws_every_iteration_record(tmp_path):
    records = [iter_record(1, {"mocov3": 0.25, "barlowtwins": 0.75}), iter_record(2, None),
               iter_record(3, {"mocov3": 1.0, "barlowtwins": 0.0}),
               {"type": "epoch", "epoch": 1, "iteration": 3, "loss": 2.0},
               {"type": "resume", "epoch": 1, "iteration": 3, "checkpoint": "x"},
               iter_record(4, {"mocov3": 0.5, "barlowtwins": 0.5})]
    run = tmp_path / "run"
    write_metrics(run, records)
    out = plot_metrics.main([str(run)])
    assert out == run / "metrics.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 400
    series = iteration_series(records)
    assert series["iteration"] == [1, 2, 3, 4] and series["loss"] == [5.0, 2.5, 5.0 / 3, 1.25]
    assert series["wins"] == {"barlowtwins": [0.75, None, 0.0, 0.5], "mocov3": [0.25, None, 1.0, 0.5]}


def test_the_smoothed_loss_is_the_debiased_moving_average():
    from utils.training_plot import smoothed

    assert smoothed([3.0] * 7, 4) == pytest.approx([3.0] * 7)  # a constant stays itself from the first value on
    w = 0.75  # window 4: each value weighs 1/4, the average before it 3/4; debiased by 1 - w^n
    expected = [1.0, (w * 0.25 * 1 + 0.25 * 5) / (1 - w ** 2)]
    assert smoothed([1.0, 5.0], 4) == pytest.approx(expected)
    assert smoothed([2.0, 8.0], 1) == [2.0, 8.0]  # a window of one value: the raw values


def test_the_epoch_axis_maps_iterations_through_the_epoch_ends_and_beyond():
    from utils.training_plot import piecewise_linear

    ends, counts = [0, 4, 8, 14], [0, 1, 2, 3]  # the last epoch had 6 iterations (a resume with another -b)
    assert list(piecewise_linear([0, 2, 4, 11, 14], ends, counts)) == pytest.approx([0, 0.5, 1, 2.5, 3])
    assert list(piecewise_linear([-4, 20], ends, counts)) == pytest.approx([-1, 4])  # the margins: extended
    assert list(piecewise_linear([2.5, -1], counts, ends)) == pytest.approx([11, -4])  # and back


@pytest.mark.parametrize("epochs, marks", [(4, "lines"), (200, "axis")])
def test_many_epochs_get_an_epoch_axis_instead_of_a_line_each(tmp_path, epochs, marks):
    from utils.training_plot import plot_training_metrics

    records = []
    for e in range(1, epochs + 1):
        records += [iter_record(3 * e - 2, None), iter_record(3 * e, None),
                    {"type": "epoch", "epoch": e, "iteration": 3 * e, "loss": 1.0}]
    series = plot_training_metrics(records, tmp_path / "plot.png")
    assert series["epoch_marks"] == marks and len(series["loss_smoothed"]) == 2 * epochs
    with Image.open(tmp_path / "plot.png") as img:
        assert img.format == "PNG"


def test_strategies_without_wins_and_another_output(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, [iter_record(i, None) for i in (1, 2)])
    out = plot_metrics.main([str(run), "--out", str(tmp_path / "pics" / "run.png")])
    assert out.is_file() and iteration_series([iter_record(1, None)])["wins"] == {}


def test_a_folder_without_a_run_is_one_clear_error(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with pytest.raises(UserError) as exc:
        plot_metrics.main([str(tmp_path)])
    assert_exit(exc, 1, metrics, "not found")
    write_metrics(tmp_path, [{"type": "resume", "epoch": 0, "iteration": 0}])
    with pytest.raises(UserError) as exc:
        plot_metrics.main([str(tmp_path)])
    assert_exit(exc, 1, metrics, "iteration")  # the file, and what it lacks
    metrics.write_text("{broken\n" + json.dumps(iter_record(1, None)) + "\n")
    with pytest.raises(UserError) as exc:
        plot_metrics.main([str(tmp_path)])
    assert_exit(exc, 1, f"{metrics}:1")  # the file and the line


def test_the_retrieval_grid_has_a_row_per_query_and_model(tmp_path):
    from utils.visualize import save_retrieval_grid

    def tile(value):
        return Image.new("RGB", (40, 30), (value, 100, 200))

    row = ("query 0\nstudent\nAP 50.0", tile(0), [(tile(10 * r), kind, r + 1, 1 - r / 10)
                                                   for r, kind in enumerate(["positive", "junk", "negative"])])
    with Image.open(save_retrieval_grid(tmp_path / "two.png", [row, row])) as two, \
            Image.open(save_retrieval_grid(tmp_path / "four.png", [row] * 4)) as four:
        assert two.format == four.format == "PNG" and two.size[0] == four.size[0] and four.size[1] > 1.5 * two.size[1]
    with pytest.raises(ValueError) as exc:
        save_retrieval_grid(tmp_path / "bad.png", [("q", tile(0), [(tile(1), "maybe", 1, 0.5)])])
    assert_names(exc.value, "maybe", "positive", "junk", "negative")  # the bad label, and the valid ones
    assert not (tmp_path / "bad.png").exists()
