"""Checkpoint I/O: atomic writes never leave a torn file; safe loads refuse code and name the file."""
import os

import pytest
import torch

from utils.checkpoint import CheckpointError, check_keys, load_file, load_state_strict, save_atomic


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
    with pytest.raises(CheckpointError, match="evil.pt.*--trust_checkpoint"):
        load_file(path)


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
    check_keys({"a"}, {"a"}, "ok")
