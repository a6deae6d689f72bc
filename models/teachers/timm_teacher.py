"""Any timm model as a frozen teacher (``timm:<model name>``: DINOv2/v3, CLIP, SigLIP, ConvNeXt...), from a local file.

The file is ``<weights_dir>/timm/<model name>.safetensors`` (or ``.pth``) holding timm's own state_dict, the keys
``timm.create_model(name, pretrained=True)`` loads (the Hugging Face hub's ``timm/<name>`` files); every key must
match the model, the classifier included when the file has one (its class count is read from the file). Nothing is
ever downloaded.

Like every teacher, the module takes the ImageNet-normalised RGB batch and returns its raw descriptor:

- the input is brought to the model's own normalisation (``pretrained_cfg`` mean/std: CLIP's and SigLIP's differ
  from ImageNet's) by one affine map per channel;
- a ViT runs at any input size: it is built with ``dynamic_img_size`` (position embeddings interpolated to the
  input's patch grid) and the input is resized to the nearest multiple of the patch size (a 512 px crop is seen at
  518 px by a /14 model), which changes the image by less than half a patch;
- the descriptor is the model's pooled pre-logits embedding (``forward_head(..., pre_logits=True)``: the CLS token,
  or the model's own pool and norm) with ``pool="pre_logits"``, or GeM over the patch tokens (prefix tokens such as
  CLS and registers left out) or the CNN's last feature map with ``pool="gem"``.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.gem import gem
from models.timm_names import TIMM_PREFIX, timm_model_name
from utils.checkpoint import CheckpointError, check_state_dict, describe_non_checkpoint, load_file, save_atomic
from utils.errors import UsageError
from utils.files import atomic_write

POOLS = ("pre_logits", "gem")
WEIGHT_DIR = "timm"
SUFFIXES = (".safetensors", ".pth")
# The teachers' common input, the ImageNet normalisation of the data pipeline (datasets/transforms.py, which models/
# does not import), and the default of a pretrained_cfg without mean/std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_name(teacher: str) -> str:
    """``timm:vit_base_patch14_dinov2`` -> ``vit_base_patch14_dinov2``, after checking that timm knows it."""
    return timm_model_name(teacher, "-t/--teachers")


def weight_file(teacher: str, weights_dir: str | os.PathLike) -> Path:
    """``<weights_dir>/timm/<model name>.safetensors`` or ``.pth``, whichever exists (the ``.safetensors`` name when
    neither does, for the message that it is missing). Both present is an error: which one was meant is unknown."""
    stem = Path(weights_dir) / WEIGHT_DIR / teacher[len(TIMM_PREFIX):]
    found = [stem.with_name(stem.name + suffix) for suffix in SUFFIXES if stem.with_name(stem.name + suffix).exists()]
    if len(found) > 1:
        raise CheckpointError(f"teacher {teacher}: both {found[0]} and {found[1]} exist; keep the one to use")
    return found[0] if found else stem.with_name(stem.name + SUFFIXES[0])


def _create(name: str, num_classes: int | None = None) -> nn.Module:
    """The timm model, random-initialised on the current default device; ViTs with ``dynamic_img_size``."""
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if _takes_dynamic_size(name):
        kwargs["dynamic_img_size"] = True
    return timm.create_model(name, pretrained=False, **kwargs)


@functools.cache
def _takes_dynamic_size(name: str) -> bool:
    import timm

    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, dynamic_img_size=True)
    except TypeError:  # a model without the option (CNNs, or ViTs with a fixed input size)
        return False
    return True


@functools.cache
def descriptor_dim(teacher: str, pool: str = "pre_logits") -> int:
    """The size of the descriptor of ``teacher`` pooled by ``pool``, from a shape-only forward (meta device: no
    weights read, no compute). ``UsageError`` when the model has no such descriptor."""
    name = model_name(teacher)
    with torch.device("meta"):
        model = _create(name).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        # the input made like the weights (new_empty of one): device trackers see shape-only tensors of one kind
        probe = next(model.parameters()).new_empty(1, *size)
        try:
            out = _descriptor(model, probe, pool, 3.0)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own forward: any error means it cannot serve here
            raise UsageError(f"teacher {teacher}: cannot compute its {pool} descriptor ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]})") from None
    if out.dim() != 2:
        fix = " (try --teacher_pool gem)" if pool == "pre_logits" else ""
        raise UsageError(f"teacher {teacher}: the model has no pooled embedding: its {pool} output has shape "
                         f"{tuple(out.shape)}, not (batch, dim){fix}")
    return int(out.shape[1])


def _descriptor(model: nn.Module, x: torch.Tensor, pool: str, gem_p: float) -> torch.Tensor:
    if pool not in POOLS:
        raise ValueError(f"unknown teacher pool {pool!r}; valid: {', '.join(POOLS)}")
    features = model.forward_features(x)
    if pool == "pre_logits":
        return model.forward_head(features, pre_logits=True)
    if not isinstance(features, torch.Tensor) or features.dim() not in (3, 4):
        found = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise UsageError(f"timm model {type(model).__name__}: --teacher_pool gem needs patch tokens (B, N, C) or a "
                         f"feature map (B, C, H, W), its features are {found}; use --teacher_pool pre_logits")
    if features.dim() == 3:  # tokens: drop the prefix (CLS, registers), pool the patches
        patches = features[:, getattr(model, "num_prefix_tokens", 0):]
        return gem(patches.transpose(1, 2).unsqueeze(-1), gem_p)
    if getattr(model, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
        features = features.permute(0, 3, 1, 2)
    return gem(features, gem_p)


class TimmTeacher(nn.Module):
    """A timm model under ``model`` with the teachers' input and output: ImageNet-normalised RGB in, raw descriptor
    out (see the module's docstring). Its state_dict is the timm model's under ``model.``."""

    def __init__(self, teacher: str, model: nn.Module, pool: str = "pre_logits", gem_p: float = 3.0) -> None:
        super().__init__()
        self.teacher_name = teacher
        self.model = model
        self.pool, self.gem_p = pool, float(gem_p)
        self.embed_dim = descriptor_dim(teacher, pool)
        cfg = model.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", IMAGENET_STD), dtype=torch.float32).view(1, 3, 1, 1)
        imagenet_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        imagenet_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # (x * s_in + m_in - m) / s: the pixel the ImageNet normalisation came from, normalised as the model expects
        self.register_buffer("input_scale", imagenet_std / std, persistent=False)
        self.register_buffer("input_shift", (imagenet_mean - mean) / std, persistent=False)
        self.same_normalisation = bool(torch.equal(mean, imagenet_mean) and torch.equal(std, imagenet_std))
        patch_embed = getattr(model, "patch_embed", None)  # a ViT built with dynamic_img_size takes any patch grid
        dynamic = getattr(model, "dynamic_img_size", False) and patch_embed is not None
        self.patch_size = tuple(patch_embed.patch_size) if dynamic else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same_normalisation:
            x = x * self.input_scale + self.input_shift
        if self.patch_size is not None:
            height, width = x.shape[-2:]
            size = tuple(max(p, round(s / p) * p) for s, p in zip((height, width), self.patch_size))
            if size != (height, width):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return _descriptor(self.model, x, self.pool, self.gem_p)

    def extra_repr(self) -> str:
        return f"{self.teacher_name}, pool={self.pool}" + (f", p={self.gem_p:g}" if self.pool == "gem" else "")


def random_teacher(teacher: str, pool: str = "pre_logits", gem_p: float = 3.0) -> TimmTeacher:
    """Random initialisation (torch's global seed), no classifier: for tests, the demo and the benchmarks."""
    return TimmTeacher(teacher, _create(model_name(teacher), num_classes=0), pool, gem_p)


def read_state(path: Path, trust: bool = False, what: str = "teacher") -> dict[str, Any]:
    """The state_dict of a ``.safetensors`` file, or of a ``.pth`` file (plain, or under ``state_dict``/``model`` as
    timm's training checkpoints hold it)."""
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}. Put the model's timm weights there (e.g. the Hugging "
                              f"Face hub's timm/{path.stem} model.safetensors, renamed), or pass "
                              "--path_to_pretrained_weights.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable(path, what, exc) from None
    state = load_file(path, trust=trust, what=what)
    for container in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(container), Mapping):
            state = state[container]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} file {path} holds a {type(state).__name__}, not a state_dict")
    return dict(state)


def _unreadable(path: Path, what: str, exc: BaseException) -> CheckpointError:
    problem = describe_non_checkpoint(path) or f"not a readable safetensors file ({exc})"
    return CheckpointError(f"{what} file {path} is {problem}. Download or write it again.")


def _file_classes(name: str, state: Mapping[str, Any]) -> int:
    """The class count of the file's classifier (0: the file has none, as DINOv2's)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    classifier = (cfg.classifier if cfg is not None else None) or ()
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        weight = state.get(f"{head}.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            return int(weight.shape[0])
    return 0


def teacher_from_file(teacher: str, path: Path, pool: str = "pre_logits", gem_p: float = 3.0,
                      trust: bool = False) -> TimmTeacher:
    """Load ``teacher`` from its file; every key must match (a ``CheckpointError`` naming the file otherwise)."""
    name = model_name(teacher)
    state = read_state(path, trust, what=f"teacher {teacher}")
    model = _meta_model_matching(teacher, state, path)  # a file of another model is told before any allocation
    own = model.state_dict()
    persistent = set(own)
    if any(key not in persistent for key, _ in model.named_buffers()):
        model = _create(name, _file_classes(name, state))  # buffers computed at init (RoPE, Swin's masks): build
        model.load_state_dict(state, strict=True)  # for real, then copy the weights
    else:
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    return TimmTeacher(teacher, model.eval(), pool, gem_p).eval()


def check_file(teacher: str, path: Path, trust: bool = False) -> None:
    """Before any work: the file is there and its keys and shapes are the model's (safetensors: from its header)."""
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                state = {key: torch.empty(file.get_slice(key).get_shape(), device="meta") for key in file.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable(path, f"teacher {teacher}", exc) from None
    else:
        state = read_state(path, trust, what=f"teacher {teacher}")
    _meta_model_matching(teacher, state, path)


def _meta_model_matching(teacher: str, state: Mapping[str, Any], path: Path) -> nn.Module:
    """The model (shapes only, on the meta device) with the file's classifier, after checking that the file's keys
    and shapes are exactly its own."""
    name = model_name(teacher)
    with torch.device("meta"):
        model = _create(name, _file_classes(name, state))
    check_state_dict(model.state_dict(), state, f"teacher {teacher} file {path}",
                     f"The file must hold the state_dict of timm model {name} (the keys of "
                     f"timm.create_model('{name}').state_dict(), as the hub's timm/ files): is it another model's?")
    return model


def save_teacher(teacher: TimmTeacher, path: str | os.PathLike) -> None:
    """Write the timm model's state_dict as timm keeps it (``.safetensors`` or ``.pth`` by the name), atomically."""
    state = {key: value.detach().to("cpu").contiguous() for key, value in teacher.model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save

        with atomic_write(path, "wb") as file:
            file.write(save(state))
    else:
        save_atomic(state, path)
