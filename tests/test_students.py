"""Students: released key layout, forward against a hand-composed reference, checkpoint round trips."""
import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from models.students import STUDENT_ARCHS, build_student, load_student, student_checkpoint_state
from utils.checkpoint import CheckpointError

LAYOUT_FILE = Path(__file__).parent / "data" / "checkpoint_layouts.json"  # keys of the released files


def _released_layout(arch: str) -> dict:
    """Released student keys -> [shape, dtype]; from the reference listing, else derived from torchvision."""
    if LAYOUT_FILE.is_file():
        return json.loads(LAYOUT_FILE.read_text())["students"][arch]["layout"]
    tv = getattr(torchvision.models, arch)(weights=None, num_classes=512).state_dict()
    return {"module.base_encoder." + k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in tv.items()}


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so that a load that silently skips buffers would change the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", STUDENT_ARCHS)
def test_key_layout_matches_released_checkpoints(arch):
    expected = _released_layout(arch)
    assert len(expected) == {"resnet18": 122, "resnet34": 218}[arch]
    state = student_checkpoint_state(build_student(arch))
    assert list(state) == list(expected)  # same keys, same order as the released files
    for key, tensor in state.items():
        shape, dtype = expected[key]
        assert list(tensor.shape) == shape, key
        assert str(tensor.dtype).replace("torch.", "") == dtype, key


@pytest.mark.parametrize("arch,embed_dim", [("resnet18", 512), ("resnet34", 128)])
def test_forward_equals_hand_composed_reference(arch, embed_dim):
    torch.manual_seed(0)
    student = build_student(arch, embed_dim=embed_dim, gem_p=3.0).eval()
    _randomise_bn(student)
    # an independent torchvision model carrying the same weights (fc aside, its keys are the same)
    ref = getattr(torchvision.models, arch)(weights=None).eval()
    ref.load_state_dict({k: v for k, v in student.state_dict().items() if not k.startswith("fc.")}, strict=False)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        fmap = torch.nn.Sequential(*list(ref.children())[:-2])(x)
        pooled = fmap.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
        expected = F.linear(F.normalize(pooled, dim=1), student.fc.weight, student.fc.bias)
        got = student(x)
    assert got.shape == (2, embed_dim)
    assert student.embed_dim == embed_dim and student.fc.weight.shape == (embed_dim, 512)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gem_p1_is_plain_mean():
    student = build_student("resnet18", embed_dim=16, gem_p=1.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = student.fc(F.normalize(student.features(x).mean(dim=(2, 3)), dim=1))
        torch.testing.assert_close(student(x), expected)


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="resnet18, resnet34"):
        build_student("mobilenet_v2")


def _save_released(student, path, extras=False):
    ckpt = {"state_dict": student_checkpoint_state(student)}
    if extras:  # a training checkpoint of this project
        ckpt.update(epoch=3, optimizer={"state": {}, "param_groups": []}, loss_fn={"pos_win_count": torch.ones(2)})
    torch.save(ckpt, path)


@pytest.mark.parametrize("extras", [False, True])
def test_released_format_round_trip(tmp_path, extras):
    torch.manual_seed(1)
    student = build_student("resnet18", embed_dim=64).eval()
    _randomise_bn(student)
    path = tmp_path / "student.pt"
    _save_released(student, path, extras)
    loaded = load_student(path, "resnet18", embed_dim=64)
    assert not loaded.training
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=0, atol=0)


def test_prefix_stripping_drops_foreign_keys(tmp_path):
    student = build_student("resnet18", embed_dim=32)
    state = student_checkpoint_state(student)
    state["module.teacher_encoders.encoders.0.conv1.weight"] = torch.zeros(1)  # dropped like the paper
    torch.save({"state_dict": state}, tmp_path / "s.pt")
    load_student(tmp_path / "s.pt", "resnet18", embed_dim=32)


def test_wrong_arch_is_a_helpful_error(tmp_path):
    _save_released(build_student("resnet34"), tmp_path / "r34.pt")
    with pytest.raises(CheckpointError) as err:
        load_student(tmp_path / "r34.pt", "resnet18")
    msg = str(err.value)
    assert "layer1.2." in msg and "-a resnet34" in msg and "r34.pt" in msg


def test_wrong_embed_dim_is_a_helpful_error(tmp_path):
    _save_released(build_student("resnet18", embed_dim=256), tmp_path / "e256.pt")
    with pytest.raises(CheckpointError) as err:
        load_student(tmp_path / "e256.pt", "resnet18", embed_dim=512)
    msg = str(err.value)
    assert "fc.weight" in msg and "(256, 512)" in msg and "--embed_dim 256" in msg


def test_not_a_student_file(tmp_path):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="module.base_encoder"):
        load_student(tmp_path / "x.pt", "resnet18")


def test_pretrained_offline_error(tmp_path, monkeypatch):
    """No cached file and no network: the message says what to do instead of a bare URLError."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="--student_init random") as err:
        build_student("resnet18", pretrained=True)
    assert "resnet18-f37072fd.pth" in str(err.value)


def test_pretrained_from_hub_cache(tmp_path, monkeypatch):
    """A torchvision file in the hub cache is used (and its fc dropped) without touching the network."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.manual_seed(2)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(imagenet, hub / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    student = build_student("resnet18", embed_dim=8, pretrained=True)
    own = student.state_dict()
    for k, v in imagenet.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    assert student.fc.weight.shape == (8, 512)


def test_timm_student_builds_embeds_and_round_trips(tmp_path):
    torch.manual_seed(3)
    student = build_student("timm:mobilenetv3_small_100", embed_dim=24).eval()
    assert any(k.startswith("fc.") for k in student.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = student(x)
    assert out.shape == (2, 24)
    path = tmp_path / "timm.pt"
    _save_released(student, path)
    loaded = load_student(path, "timm:mobilenetv3_small_100", embed_dim=24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="timm"):
        load_student(path, "resnet18", embed_dim=24)


def test_timm_unknown_and_non_cnn():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_student("timm:not_a_model_xyz")
