"""A minute of contrastive training that turns a random ResNet teacher into one that knows the toy landmarks.

The published teachers were trained for days on millions of photos, and no weights can be shipped or downloaded,
so ``tools/demo.py`` trains stand-ins briefly on the toy GLDv2 before it runs the paper's pipeline on them.
Never part of the paper's method. Recipe (chosen by measurement on toy data, see the README's demo section):

- positives are two *different* photos of one landmark group (GLDv2's supervision, as the global-descriptor
  teachers use it), each randomly cropped; a symmetric InfoNCE over the batch;
- small crops (``crop_size``, 32 px by default): about four times cheaper than 64 px, and the learned filters still
  serve the 64 px evaluation;
- residual branches start at zero (the last BatchNorm scale of every block, Goyal et al. 2017), so the 50-layer
  network starts shallow and trains in a hundred steps; AdamW with a short warm-up and a cosine decay.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from datasets.gld import GLDPairDataset
from datasets.transforms import imagenet_normalize


@dataclass(frozen=True)
class PretrainRecipe:
    """How one stand-in teacher is trained. Different teachers take different ``augment`` and seeds, so that the
    fused teachers disagree somewhere (the point of fusing several)."""

    steps: int = 100
    batch_pairs: int = 32
    crop_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 10
    temperature: float = 0.2
    augment: str = "crop"  # "crop": random crops + flips; "crop_rotate_blur": also rotations and blur


AUGMENTS = ("crop", "crop_rotate_blur")


def pretraining_transform(recipe: PretrainRecipe) -> T.Compose:
    if recipe.augment not in AUGMENTS:
        raise ValueError(f"unknown augment {recipe.augment!r}; valid: {', '.join(AUGMENTS)}")
    extra = [T.RandomRotation(20), T.RandomApply([T.GaussianBlur(3, (0.1, 1.0))], p=0.5)] \
        if recipe.augment == "crop_rotate_blur" else []
    return T.Compose(extra + [T.RandomResizedCrop(recipe.crop_size, scale=(0.3, 1.0), antialias=True),
                              T.RandomHorizontalFlip(), T.ToTensor(), imagenet_normalize()])


def zero_init_residuals(model: nn.Module) -> int:
    """Zero the last BatchNorm scale of every residual block (``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock),
    so each block starts as the identity; returns how many blocks were changed."""
    blocks = [m for m in model.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    for block in blocks:
        nn.init.zeros_(block.bn3.weight if isinstance(block, Bottleneck) else block.bn2.weight)
    return len(blocks)


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``z1`` and ``z2`` (L2-normalised) are positives, every other row a negative."""
    logits = z1 @ z2.T / temperature
    target = torch.arange(len(z1), device=z1.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain_teacher(teacher: nn.Module, dataset: GLDPairDataset, recipe: PretrainRecipe, seed: int,
                     device: torch.device | str = "cpu") -> list[float]:
    """Train ``teacher`` (its forward gives one descriptor per image) in place on ``dataset``'s landmark groups
    of two or more images; returns the loss of every step. The teacher is left in eval mode, on the CPU."""
    groups = dataset.groups  # the loader already keeps only landmarks with 2+ images
    if len(groups) < 2:
        raise ValueError(f"teacher pre-training needs at least 2 landmark groups with 2+ images; {dataset.root} "
                         f"has {len(groups)}")
    batch = min(recipe.batch_pairs, len(groups))
    images = {i: dataset.load(i) for g in groups for i in g}  # the toy set is small: decode once
    transform = pretraining_transform(recipe)
    torch.manual_seed(seed)  # the transforms draw from torch's global generator
    rng = random.Random(seed)
    zero_init_residuals(teacher)
    teacher.to(device).train()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=recipe.lr, weight_decay=1e-4)
    losses = []
    for step in range(recipe.steps):
        scale = min(1.0, (step + 1) / recipe.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * scale
        pairs = [rng.sample(g, 2) for g in rng.sample(groups, batch)]
        views = torch.stack([transform(images[a]) for a, _ in pairs] + [transform(images[b]) for _, b in pairs])
        z = F.normalize(teacher(views.to(device)), dim=-1)
        loss = contrastive_loss(z[:batch], z[batch:], recipe.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    teacher.to("cpu").eval()
    return losses
