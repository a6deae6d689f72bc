"""The embedded demo runs end to end (reduced sizes) and shows the distillation helping."""
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import demo  # noqa: E402


@pytest.mark.slow
def test_demo_fast_table_complete_and_distillation_helps(tmp_path, capsys):
    out = demo.main(["--fast", "--work_dir", str(tmp_path / "demo"), "--device", "cpu"])
    rows = {r["model"]: r for r in out["rows"]}
    assert set(rows) == {"teacher mocov3 + PCA", "teacher barlowtwins + PCA", "student before (random init)",
                         "student after distillation"}
    for r in rows.values():
        for key in ("params_M", "gflops", "images_per_s", "E", "M", "H"):
            assert math.isfinite(r[key]) and r[key] >= 0, (r["model"], key)
    before, after = rows["student before (random init)"], rows["student after distillation"]
    assert after["M"] > before["M"] and after["H"] > before["H"]
    assert out["pictures"] and Path(out["pictures"][0]).stat().st_size > 0
    with Image.open(out["comparison"]) as grid:  # 3 queries x (2 teachers + the student) rows
        assert grid.format == "PNG" and grid.size[1] > grid.size[0] > 400
    with Image.open(out["training_plot"]) as plot:  # the loss/lr/win-share plot of the distillation run
        assert plot.format == "PNG" and plot.size[0] > 400
    table = (tmp_path / "demo" / "demo_results.md").read_text()
    assert table.count("\n") == 6 and "student after distillation" in table
    assert "retrieval picture:" in capsys.readouterr().out
