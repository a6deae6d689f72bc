"""Inputs read as they are and outputs that never replace inputs: 16-bit images, images over PIL's safety limit,
lists that name a video or an image twice, an output file that is one of the run's inputs."""
import numpy as np
import pytest
import torch
from helpers import ROOT, run_main, toy_gld
from PIL import Image

from datasets.gld import GLDDataError, read_image_ids
from datasets.images import open_rgb
from datasets.svd.meta import SVDMetaError, read_frame_counts
from models.students import build_student, student_checkpoint_state


def test_a_16_bit_greyscale_image_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255: every such image became white."""
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    rgb = np.asarray(open_rgb(tmp_path / "grey16.png", ValueError))
    assert rgb.shape == (2, 2, 3) and (rgb == rgb[..., :1]).all()
    np.testing.assert_array_equal(rgb[..., 0], values // 257)
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "grey8.png")  # 8-bit images are untouched
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "grey8.png", ValueError))[..., 0], values % 256)


def test_an_image_over_the_safety_limit_is_an_error_naming_it(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is over twice the limit: PIL refuses it
    with pytest.raises(GLDDataError, match="big.png"):
        open_rgb(tmp_path / "big.png", GLDDataError)


def test_a_video_listed_twice_in_the_frame_counts_is_an_error(tmp_path):
    counts = tmp_path / "frame_counts.txt"
    counts.write_text("a 10\nb 20\na 60\n")
    with pytest.raises(SVDMetaError, match=r"frame_counts.txt:3.*'a'.*line 1"):
        read_frame_counts(counts)
    counts.write_text("a 10\nb 20\n")
    assert read_frame_counts(counts) == {"a": 10, "b": 20}


def test_an_image_id_listed_twice_is_an_error(tmp_path):
    ids = read_image_ids(toy_gld())
    (tmp_path / "ids.txt").write_text("\n".join(ids[:3] + ids[1:2]) + "\n")
    with pytest.raises(GLDDataError, match=ids[1]):
        read_image_ids(tmp_path, "ids.txt")


def test_an_output_file_that_is_an_input_is_refused_before_any_work(tmp_path):
    """oxford_paris_eval.py -r X.pt --output_json X.pt replaced a checkpoint with 1 KB of JSON."""
    ckpt = tmp_path / "student.pt"
    torch.save({"state_dict": student_checkpoint_state(build_student("resnet18"))}, ckpt)
    before = ckpt.read_bytes()
    res = run_main("oxford_paris_eval.py", "-a", "resnet18", "-r", ckpt, "--output_json", ckpt, "-dp", tmp_path)
    assert res.returncode == 2 and "--output_json" in res.stderr and "Traceback" not in res.stderr
    assert ckpt.read_bytes() == before
    link = tmp_path / "link.pt"  # the same file under another name
    link.symlink_to(ckpt)
    res = run_main("oxford_paris_eval.py", "-a", "resnet18", "-r", link, "--output_json", ckpt, "-dp", tmp_path)
    assert res.returncode == 2 and ckpt.read_bytes() == before


def test_every_script_checks_its_outputs_against_its_inputs():
    import importlib

    from utils.argtypes import PathCheckingParser

    for script in ("gld_distill", "svd_distill", "gld_pca_learn", "svd_pca_learn", "oxford_paris_eval", "svd_eval"):
        assert isinstance(importlib.import_module(script).get_args_parser(), PathCheckingParser), script
    for tool in ("extract_svd_frames", "plot_metrics"):
        spec = importlib.util.spec_from_file_location(tool, ROOT / "tools" / f"{tool}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(module.get_args_parser(), PathCheckingParser), tool
