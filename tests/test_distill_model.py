"""Distillation modules: DDP wraps the student only (DistillModel: student-only state_dict); the frozen eval-mode
teachers, PCA(L2(teacher(x))), run beside it in the criterion (DistillationLoss), without gradient."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import assert_names
from torch import nn

import models.teachers
from models.distill_model import DistillationLoss, DistillModel, WhitenedTeachers
from models.loss import MultiTeacherDistillLoss
from models.pca_layer import PCAWhitening, pca_weight_path, save_pca_layer
from models.students import build_student, student_checkpoint_state
from utils.checkpoint import CheckpointError


class TinyTeacher(nn.Module):
    """Stand-in teacher with BN and dropout, whose outputs would change if it were left in train mode."""

    def __init__(self, embed_dim: int = 12) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, embed_dim)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


def _tiny_teachers(seed: int = 0) -> WhitenedTeachers:
    torch.manual_seed(seed)
    teachers = {"t_a": TinyTeacher(12), "t_b": TinyTeacher(10)}
    pcas = {}
    for name, t in teachers.items():
        t.bn.running_mean.uniform_(-0.2, 0.2)
        pcas[name] = PCAWhitening(t.embed_dim, 6).fit(F.normalize(torch.randn(40, t.embed_dim), dim=1))
    return WhitenedTeachers.from_modules(teachers, pcas)


def _model(seed: int = 0) -> DistillModel:
    torch.manual_seed(seed)
    return DistillModel(build_student("resnet18", embed_dim=6))


def _criterion(seed: int = 0) -> DistillationLoss:
    return DistillationLoss(_tiny_teachers(seed), MultiTeacherDistillLoss(teachers=["t_a", "t_b"]), student_dim=6)


def test_student_and_whitened_teachers_must_share_the_dimension():
    """Similarity matrices are N x N for any dimension, so only this check stops a 16-d PCA training a 64-d
    student."""
    with pytest.raises(ValueError) as exc:
        DistillationLoss(_tiny_teachers(), MultiTeacherDistillLoss(teachers=["t_a", "t_b"]), student_dim=16)
    assert_names(exc.value, "16", "t_a", "t_b", "6-d", "--embed_dim")  # both sizes, each teacher, the flag


def test_state_dict_holds_the_student_only():
    model = _model()
    keys = list(model.state_dict())
    assert keys == ["base_encoder." + k for k in model.base_encoder.state_dict()]
    assert {n for n, _ in model.named_parameters()} == {"base_encoder." + n for n, _ in
                                                        model.base_encoder.named_parameters()}
    other = _model(seed=1)
    other.load_state_dict(model.state_dict())  # strict: nothing about the teachers is expected
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def test_teachers_output_pca_of_l2_and_stay_frozen():
    model, criterion = _model(), _criterion()
    model.train()
    criterion.train()
    teachers = criterion.teachers
    assert model.base_encoder.training and not teachers.training
    assert not any(m.training for m in teachers.modules())
    assert not any(p.requires_grad for p in teachers.parameters())
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    s1, s2 = model(x1, x2)
    assert s1.shape == (3, 6) and s1.requires_grad
    for x in (x1, x2):
        outs = teachers(x)
        assert len(outs) == 2
        for out, enc, pca in zip(outs, teachers.encoders, teachers.whitenings):
            assert not out.requires_grad
            with torch.no_grad():
                raw = enc.eval()(x)
            unit = raw / raw.norm(dim=1, keepdim=True)
            torch.testing.assert_close(out, (unit - pca.mean) @ pca.dvt.T, rtol=1e-5, atol=1e-5)
    loss = criterion(x1, x2, s1, s2)["distill loss"]
    reference = MultiTeacherDistillLoss(teachers=teachers.names)(s1, s2, teachers(x1), teachers(x2))["distill loss"]
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is None for p in teachers.parameters())
    assert model.base_encoder.fc.weight.grad is not None


def test_the_teachers_move_with_the_criterion_and_syncbn_converts_the_student_only():
    criterion = _criterion().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in criterion.teachers.parameters())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.base_encoder.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in _criterion().modules())


def test_ddp_single_process_gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, criterion = _model(), _criterion()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert list(ddp.state_dict()) == list(student_checkpoint_state(model.base_encoder))
        ddp.train()
        x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
        s1, s2 = ddp(x1, x2)
        criterion(x1, x2, s1, s2)["distill loss"].backward()
        assert all(p.grad is not None for p in model.base_encoder.parameters())
        assert not criterion.teachers.training
    finally:
        dist.destroy_process_group()


def test_from_weights_dir_uses_build_teacher_and_published_pca_names(tmp_path, monkeypatch):
    calls = []

    def fake_build_teacher(name, weights_dir=None, gem_p=3.0, trust=False, pool="pre_logits"):
        calls.append((name, weights_dir, gem_p, trust, pool))
        torch.manual_seed(len(calls))
        return TinyTeacher(12).eval()

    monkeypatch.setattr(models.teachers, "build_teacher", fake_build_teacher)
    with pytest.raises(CheckpointError) as exc:  # a user error naming the missing file and how to make it
        WhitenedTeachers(["resnet101_gem"], tmp_path, gem_p=3.0, embed_dim=6)
    assert_names(exc.value, pca_weight_path(tmp_path, "resnet101_gem", 6), "gld_pca_learn.py")
    pcas = {}
    for name in ("resnet101_gem", "mocov3"):
        pcas[name] = PCAWhitening(12, 6).fit(torch.randn(30, 12))
        save_pca_layer(pcas[name], pca_weight_path(tmp_path, name, 6))
    teachers = WhitenedTeachers(["resnet101_gem", "mocov3"], tmp_path, gem_p=1.0, embed_dim=6)
    assert calls[-2:] == [("resnet101_gem", tmp_path, 1.0, False, "pre_logits"),
                          ("mocov3", tmp_path, 1.0, False, "pre_logits")]
    assert teachers.embed_dims == [6, 6]
    for name, layer in zip(teachers.names, teachers.whitenings):
        assert torch.equal(layer.dvt, pcas[name].dvt)


def test_pca_teacher_mismatch_and_missing_pca_layers():
    with pytest.raises(ValueError) as exc:
        WhitenedTeachers.from_modules({"t": TinyTeacher(12)}, {"t": PCAWhitening(8, 4)})
    assert_names(exc.value, "12-d", "8-d")  # the teacher's output and the PCA's input
    with pytest.raises(ValueError) as exc:
        WhitenedTeachers(["mocov3"], None)
    assert_names(exc.value, "--path_to_pretrained_weights", "mocov3")  # the missing flag, the teacher left without PCA


def test_real_teacher_random_init():
    """Integration with the teacher package (random weights, no file): a ResNet50 SSL teacher."""
    torch.manual_seed(0)
    pca = PCAWhitening(2048, 8)
    pca.dvt.copy_(torch.randn(8, 2048))
    teachers = WhitenedTeachers(["mocov3"], None, pca_layers={"mocov3": pca})
    (out,) = teachers(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 8) and not teachers.training
