"""Every flag of the six scripts is checked when parsed: a bad number or path is an argparse error (exit 2,
``usage:``), never a traceback and never after the work. The bounds are read off the parsers themselves, so a
flag added later is covered without editing this file."""
import argparse
import importlib

import pytest
from helpers import assert_exit, assert_names

from utils import argtypes

SCRIPTS = ("gld_distill", "svd_distill", "gld_pca_learn", "svd_pca_learn", "oxford_paris_eval", "svd_eval")
NUMBER_TYPES = {int, float}
PATH_TYPES = {argtypes.existing_file, argtypes.existing_dir, argtypes.output_file, argtypes.output_dir}


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "meta.yaml").write_text("frame_root_path: x\n")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def valid_argv(script, paths):
    """The smallest valid command line of each script (parsing only: no file is read)."""
    meta, ckpt = str(paths / "meta.yaml"), str(paths / "ckpt.pt")
    return {
        "gld_distill": ["-ts", "mocov3", "-c", str(paths / "run"), "--gld_root_path", str(paths)],
        "svd_distill": ["-ts", "mocov3", "-c", str(paths / "run"), "-dm", meta],
        "gld_pca_learn": ["-t", "mocov3", "--gld_root_path", str(paths), "--dump_to", str(paths / "out.pt")],
        "svd_pca_learn": ["-t", "mocov3", "-dm", meta, "--dump_to", str(paths / "out.pt")],
        "oxford_paris_eval": ["-a", "resnet18", "-r", ckpt, "-dp", str(paths)],
        "svd_eval": ["-a", "resnet18", "-r", ckpt, "-dm", meta],
    }[script]


def parse(script, argv):
    return importlib.import_module(script).parse_args(argv)


def refused(script, argv, capsys):
    """A usage error: exit 2 with argparse's usage and one ``error:`` line (returned), no traceback."""
    with pytest.raises(SystemExit) as exc:
        parse(script, argv)
    err = capsys.readouterr().err
    assert "usage:" in err, (argv, err)
    return assert_exit(exc, 2, err=err)


def flag_actions(script):
    parser = importlib.import_module(script).get_args_parser()
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def with_flag(argv, flag, value):
    """``argv`` with ``flag`` set to ``value`` (replacing the valid value it may already have)."""
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        del out[i:i + 2]
    return out + [flag, value]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_valid_command_line_parses(script, paths):
    parse(script, valid_argv(script, paths))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_is_validated(script):
    """A numeric flag must use a checking type of utils.argtypes (plain int/float accept 0, -5, nan)."""
    loose = [a.option_strings[0] for a in flag_actions(script)
             if a.type in NUMBER_TYPES and a.dest != "num_samples"]  # --num_samples: any int (<= 0 means all)
    assert not loose, f"{script}: flags without bounds: {loose}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_numbers_outside_their_bounds_are_usage_errors(script, paths, capsys):
    base = valid_argv(script, paths)
    probed = 0
    for action in flag_actions(script):
        minimum = getattr(action.type, "minimum", None)
        if minimum is None:
            continue
        flag = action.option_strings[0]
        too_small = minimum if getattr(action.type, "exclusive", False) else minimum - 1
        for bad in (str(too_small), "abc", "nan", "inf"):
            refused(script, with_flag(base, flag, bad), capsys)
        probed += 1
    assert probed >= 5


@pytest.mark.parametrize("script", SCRIPTS)
def test_paths_that_cannot_be_used_are_usage_errors(script, paths, capsys):
    base = valid_argv(script, paths)
    a_file, missing = str(paths / "a_file"), str(paths / "missing" / "x")
    bad_values = {argtypes.existing_file: [missing, str(paths)], argtypes.existing_dir: [missing, a_file],
                  argtypes.output_file: [f"{a_file}/out.json", str(paths)],
                  argtypes.output_dir: [a_file, f"{a_file}/sub"]}
    probed = 0
    for action in flag_actions(script):
        for bad in bad_values.get(action.type, []):
            err = refused(script, with_flag(base, action.option_strings[0], bad), capsys)
            assert action.option_strings[-1] in err
            probed += 1
    assert probed >= 2


@pytest.mark.parametrize("script", ["gld_distill", "svd_distill", "oxford_paris_eval", "svd_eval"])
@pytest.mark.parametrize("arch", ["resnet99", "timm:no_such_model", "timm:"])
def test_unknown_student_arch_is_a_usage_error(script, arch, paths, capsys):
    err = refused(script, with_flag(valid_argv(script, paths), "-a", arch), capsys)
    assert "-a/--arch" in err


@pytest.mark.parametrize("script", ["gld_distill", "svd_distill"])
def test_training_cross_flag_checks(script, paths, capsys):
    base = valid_argv(script, paths)
    assert "-b/--batch_size" in refused(script, with_flag(base, "-b", "1"), capsys)
    assert "--start_epoch" in refused(script, base + ["--epochs", "3", "--start_epoch", "3"], capsys)
    assert "twice" in refused(script, with_flag(base, "-ts", "mocov3") + ["mocov3"], capsys)
    err = refused(script, with_flag(base, "-ts", "resnet101_delg") + ["--embed_dim", "1024"], capsys)
    assert_names(err, "--embed_dim", "512", "resnet101_delg")  # the flag, the bound and the teacher that sets it
    assert "--overwrite" in refused(script, base + ["-r", "auto", "--overwrite"], capsys)
    refused(script, base + ["--dist_url", "tcp://localhost"], capsys)  # no port
    refused(script, base + ["--dist_url", "http://x:1"], capsys)
    assert parse(script, base + ["--dist_url", "tcp://10.0.0.1:23456"]).dist_url == "tcp://10.0.0.1:23456"


@pytest.mark.parametrize("script", ["gld_pca_learn", "svd_pca_learn"])
def test_pca_cross_flag_checks(script, paths, capsys):
    base = valid_argv(script, paths)
    err = refused(script, with_flag(base, "-t", "resnet101_dolg") + ["--embed_dim", "2048"], capsys)
    assert_names(err, "--embed_dim", "1024", "resnet101_dolg")
    (paths / "out.pt").write_bytes(b"published")
    assert "--overwrite" in refused(script, base, capsys)  # never replaced without asking
    assert parse(script, base + ["--overwrite"]).overwrite
    assert (paths / "out.pt").read_bytes() == b"published"  # parsing writes nothing


def test_pca_default_output_is_checked_too(paths, capsys):
    weights = paths / "weights"
    (weights / "pca_weights").mkdir(parents=True)
    published = weights / "pca_weights" / "mocov3_pca_512d_svd_224x224_p1.pt"
    published.write_bytes(b"downloaded")
    argv = ["-t", "mocov3", "-dm", str(paths / "meta.yaml"), "--path_to_pretrained_weights", str(weights)]
    err = refused("svd_pca_learn", argv, capsys)
    assert_names(err, published, "--overwrite")  # the file that would be replaced, and the flag that allows it
    # the SVD teachers' file name carries the real dimension (the published name says 512d)
    args = parse("svd_pca_learn", argv + ["--embed_dim", "16"])
    assert args.output.name == "mocov3_pca_16d_svd_224x224_p1.pt"


@pytest.mark.parametrize("script", ["oxford_paris_eval", "svd_eval"])
def test_eval_pca_dimension_beyond_the_teacher_is_a_usage_error(script, paths, capsys):
    base = [a for a in valid_argv(script, paths) if a not in ("-a", "resnet18", "-r", str(paths / "ckpt.pt"))]
    err = refused(script, base + ["-t", "resnet101_delg", "--pca", "--embed_dim", "1024"], capsys)
    assert_names(err, "--embed_dim", "512", "resnet101_delg")
