"""engine/teacher_pretraining.py: the demo's brief training of stand-in teachers on the toy landmarks."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from helpers import assert_names, toy_gld
from torchvision.models import resnet18, resnet50

from datasets.gld import GLDPairDataset
from datasets.transforms import imagenet_normalize
from engine.teacher_pretraining import (
    AUGMENTS,
    PretrainRecipe,
    contrastive_loss,
    pretrain_teacher,
    pretraining_transform,
    zero_init_residuals,
)


@pytest.mark.parametrize("arch, n_blocks", [(resnet18, 8), (resnet50, 16)])
def test_zero_init_turns_every_plain_residual_block_into_the_identity(arch, n_blocks):
    torch.manual_seed(0)
    model = arch(num_classes=8).eval()
    assert zero_init_residuals(model) == n_blocks
    block = model.layer1[1]  # no downsample: output = relu(x + branch(x)) = x for x >= 0 once the branch is zero
    x = F.relu(torch.randn(2, block.conv1.in_channels, 9, 9))
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    first = model.layer2[0]  # a downsampling block keeps its projection shortcut: it becomes relu(shortcut(x))
    x = F.relu(torch.randn(2, first.conv1.in_channels, 9, 9))
    torch.testing.assert_close(first(x), F.relu(first.downsample(x)), rtol=0, atol=0)


def test_contrastive_loss_matches_closed_forms():
    n, tau = 5, 0.2
    eye = torch.eye(n, 8)  # orthonormal positives: logit 1/tau on the diagonal, 0 elsewhere
    expected = math.log(1 + (n - 1) * math.exp(-1 / tau))
    assert contrastive_loss(eye, eye, tau).item() == pytest.approx(expected, rel=1e-6)
    # random unit vectors against the softmax written out in float64, both directions averaged
    g = torch.Generator().manual_seed(0)
    z1, z2 = (F.normalize(torch.randn(n, 16, generator=g), dim=1) for _ in range(2))
    s = (z1.double() @ z2.double().T) / tau
    rows = -(s.diag() - s.exp().sum(1).log()).mean()
    cols = -(s.diag() - s.exp().sum(0).log()).mean()
    assert contrastive_loss(z1, z2, tau).item() == pytest.approx(((rows + cols) / 2).item(), rel=1e-5)


def test_transform_crops_to_size_and_rejects_unknown_augment():
    image = GLDPairDataset(toy_gld()).load(0)
    for augment in AUGMENTS:
        out = pretraining_transform(PretrainRecipe(crop_size=24, augment=augment))(image)
        assert out.shape == (3, 24, 24)
    with pytest.raises(ValueError) as exc:
        pretraining_transform(PretrainRecipe(augment="jitter"))
    assert_names(exc.value, "'jitter'", *AUGMENTS)  # the bad value, and the valid ones


def _fixed_pair_loss(model, dataset, tau):
    """The InfoNCE of the first two photos of every landmark, resized to 32 px, in eval mode."""
    transform = T.Compose([T.Resize((32, 32)), T.ToTensor(), imagenet_normalize()])
    groups = [g for g in dataset.groups if len(g) >= 2]
    with torch.no_grad():
        z = [F.normalize(model(torch.stack([transform(dataset.load(g[k])) for g in groups])), dim=1)
             for k in (0, 1)]
    return contrastive_loss(z[0], z[1], tau).item()


def test_pretraining_learns_the_landmarks_and_leaves_the_teacher_frozen_ready():
    dataset = GLDPairDataset(toy_gld())
    torch.manual_seed(0)
    model = resnet18(num_classes=32)
    recipe = PretrainRecipe(steps=40, batch_pairs=8, crop_size=32, lr=3e-3, warmup_steps=5)
    before = _fixed_pair_loss(model.eval(), dataset, recipe.temperature)
    losses = pretrain_teacher(model, dataset, recipe, seed=0)
    after = _fixed_pair_loss(model, dataset, recipe.temperature)
    assert len(losses) == recipe.steps and all(math.isfinite(v) for v in losses)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    # chance level for 10 landmarks is log(10) = 2.3; a model that learned nothing stays near it
    assert after < before - 0.5, (before, after)  # measured drops over seeds 0-4: 1.1-1.5


def test_pretraining_needs_two_landmark_groups(tmp_path):
    from datasets.toy import make_toy_gld

    make_toy_gld(tmp_path / "gld", n_landmarks=1, imgs_per_landmark=3, size=32)
    with pytest.raises(ValueError) as exc:
        pretrain_teacher(resnet18(num_classes=4), GLDPairDataset(tmp_path / "gld"), PretrainRecipe(steps=1), seed=0)
    assert_names(exc.value, tmp_path / "gld", "2 landmark")  # the data folder, and the minimum it misses
