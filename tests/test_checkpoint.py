"""Checkpoint I/O: atomic writes never leave a torn file; safe loads refuse code and name the file."""
import argparse
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_names

from utils.checkpoint import CheckpointError, check_state_dict, load_file, load_state_strict, save_atomic


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_save_atomic_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    obj = {"epoch": 3, "state_dict": {"w": torch.arange(6.0).view(2, 3)}, "args": {"lr": 1e-3}}
    save_atomic(obj, path)
    back = load_file(path)
    assert back["epoch"] == 3 and back["args"] == {"lr": 1e-3}
    assert torch.equal(back["state_dict"]["w"], obj["state_dict"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]


def test_save_atomic_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"v": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"v": Unpicklable()}, path)
    assert torch.equal(load_file(path)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_load_refuses_code_and_names_file(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"x": _Evil()}, f)
    with pytest.raises(CheckpointError) as exc:
        load_file(path)
    assert_names(exc.value, path, "posix.system")  # the file, and the call it would make
    assert "--trust_checkpoint" not in str(exc.value)  # never advised for a file that runs a command


def test_trust_is_suggested_only_for_a_real_checkpoint_that_needs_it(tmp_path):
    path = tmp_path / "namespace.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_file(path)
    assert_names(exc.value, path, "argparse.Namespace", "--trust_checkpoint")  # the file, the object, the fix
    assert load_file(path, trust=True)["args"].lr == 0.1


def _legacy_bytes(tmp_path):
    path = tmp_path / "legacy_source.pt"
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


KINDS = ("empty", "HTML", "text", "binary")  # what the file is, as the message names it


@pytest.mark.parametrize("content, says", [
    (b"", "empty"),
    (b"<!DOCTYPE html><html><head><title>Google Drive</title>", "HTML"),
    (b"  <html>\n<body>Quota exceeded</body>", "HTML"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "text"),
    (b"\x00\x01\x02garbage", "binary"),
])
@pytest.mark.parametrize("trust", [False, True])
def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path, content, says, trust):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_file(path, trust=trust, what="teacher mocov3")
    message = assert_names(exc.value, "teacher mocov3", path, says)  # whose file, which file, what it is instead
    assert [kind for kind in KINDS if kind in message] == [says], message
    assert "--trust_checkpoint" not in message


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoints_are_named_as_such(tmp_path, trust, legacy):
    if legacy:
        data = _legacy_bytes(tmp_path)
    else:
        save_atomic({"w": torch.randn(64, 64)}, tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_file(path, trust=trust)
    assert_names(exc.value, path, "truncated")
    assert "--trust_checkpoint" not in str(exc.value)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nothere.pt"):
        load_file(tmp_path / "nothere.pt")
    path = tmp_path / "cut.pt"
    save_atomic({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_file(path)


def test_numpy_scalars_load_safely(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "meta.pt"
    torch.save({"best": np.float64(0.5), "n": np.int64(3)}, path)
    back = load_file(path)
    assert float(back["best"]) == 0.5 and int(back["n"]) == 3


def test_strict_load_names_keys():
    module = torch.nn.Linear(3, 2)
    state = {"weight": torch.zeros(2, 3), "bias_renamed": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="missing.*bias.*unexpected.*bias_renamed"):
        load_state_strict(module, state, "file.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_state_strict(module, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "file.pt")
    check_state_dict({"a": torch.zeros(1)}, {"a": torch.ones(1)}, "ok")
    with pytest.raises(CheckpointError, match="not tensors.*'a'"):
        check_state_dict({"a": torch.zeros(1)}, {"a": 1.0}, "file.pt")


def test_a_full_disk_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    """torch's own writer reported a full disk as RuntimeError('unexpected pos') (a traceback in training)."""
    import subprocess
    import sys

    code = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from utils.checkpoint import save_atomic
from utils.files import OutputError
save_atomic({{"w": torch.zeros(10)}}, {str(tmp_path / "ckpt.pt")!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    save_atomic({{"w": torch.zeros(4 << 20)}}, {str(tmp_path / "ckpt.pt")!r})
except OutputError as exc:
    print("OutputError", exc)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("OutputError"), res.stdout + res.stderr
    assert_names(res.stdout.removeprefix("OutputError"), tmp_path / "ckpt.pt")  # one line, naming the file
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"].shape == (10,)
    assert not list(tmp_path.glob(".*.tmp"))
