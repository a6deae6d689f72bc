"""Teachers: published layouts, reload, the math against plain functional references, and bad files.

Each teacher is built once with random weights (BN statistics randomised too, so a wrong mapping shows), written in
the published layout, checked against ``tests/data/checkpoint_layouts.json``, reloaded, and compared with a forward
pass written here with ``F.conv2d``/``F.batch_norm`` on the raw tensors of the written file.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_names
from torch import nn

from models.gem import gem
from models.teachers import (
    TEACHER_FILES,
    TEACHERS,
    build_teacher,
    published_checkpoint,
    teacher_from_checkpoint,
    write_published_layout,
)
from utils.checkpoint import CheckpointError

LAYOUTS = json.loads((Path(__file__).parent / "data" / "checkpoint_layouts.json").read_text())["teachers"]
GEM_P = 1.5  # not the default 3, and below the [2, 4) range the writer uses for the files' own exponents
EMBED_DIMS = {"resnet101_gem": 2048, "resnet101_ap_gem": 2048, "resnet101_solar": 2048, "resnet101_delg": 512,
              "resnet101_dolg": 1024, "mocov3": 2048, "barlowtwins": 2048}
FILE_P_KEY = {"resnet101_ap_gem": "module.adpool.p", "resnet101_solar": "pool.p",
              "resnet101_delg": "globalmodel.head.pool.p", "resnet101_dolg": "pool_g.p"}


# ----------------------------------------------------------------------------------------------------------------
# Plain functional reference implementations on the raw file dict
# ----------------------------------------------------------------------------------------------------------------
def _conv(x, w, stride=1, bias=None):
    return F.conv2d(x, w, bias, stride, w.shape[-1] // 2)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


TV_NAMES = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample.0", "downsample.1")
PYCLS_NAMES = ("f.a", "f.a_bn", "f.b", "f.b_bn", "f.c", "f.c_bn", "proj", "bn")


def _bottleneck(x, sd, p, stride, names):
    c1, b1, c2, b2, c3, b3, proj, proj_bn = (f"{p}.{n}" for n in names)
    y = F.relu(_bn(_conv(x, sd[c1 + ".weight"]), sd, b1))
    y = F.relu(_bn(_conv(y, sd[c2 + ".weight"], stride), sd, b2))  # v1.5: the stride is on the 3x3
    y = _bn(_conv(y, sd[c3 + ".weight"]), sd, b3)
    if proj + ".weight" in sd:
        x = _bn(_conv(x, sd[proj + ".weight"], stride), sd, proj_bn)
    return F.relu(x + y)


def _stage(x, sd, prefix, stride, names, block_name):
    depth = len({k[len(prefix) + 1:].split(".")[0] for k in sd if k.startswith(prefix + ".")})
    for i in range(depth):
        x = _bottleneck(x, sd, f"{prefix}.{block_name(i)}", stride if i == 0 else 1, names)
    return x


def _stem(x, sd, conv_key, bn_key):
    return F.max_pool2d(F.relu(_bn(_conv(x, sd[conv_key], 2), sd, bn_key)), 3, 2, 1)


def _tv_trunk(sd, x, prefix):
    x = _stem(x, sd, prefix + "conv1.weight", prefix + "bn1")
    for i, stride in enumerate((1, 2, 2, 2)):
        x = _stage(x, sd, f"{prefix}layer{i + 1}", stride, TV_NAMES, str)
    return x


def _soa(x, sd, p):
    b, _, h, w = x.shape
    f = F.relu(_bn(F.conv2d(x, sd[p + ".f.0.weight"], sd[p + ".f.0.bias"]), sd, p + ".f.1")).flatten(2)
    g = F.relu(_bn(F.conv2d(x, sd[p + ".g.0.weight"], sd[p + ".g.0.bias"]), sd, p + ".g.1")).flatten(2)
    v = F.conv2d(x, sd[p + ".h.weight"], sd[p + ".h.bias"]).flatten(2)
    mid = f.shape[1]
    attn = torch.softmax(torch.einsum("bcn,bcm->bnm", f, g) / math.sqrt(mid), dim=-1)
    out = torch.einsum("bnm,bcm->bcn", attn, v).reshape(b, mid, h, w)
    return x + F.conv2d(out, sd[p + ".v.weight"], sd[p + ".v.bias"])


def _solar_trunk(sd, x):
    x = _stem(x, sd, "features.conv1.0.weight", "features.conv1.1")
    for prefix, stride in (("features.conv2_x.2", 1), ("features.conv3_x", 2), ("features.conv4_x", 2)):
        x = _stage(x, sd, prefix, stride, TV_NAMES, str)
    x = _soa(x, sd, "features.soa4")
    x = _stage(x, sd, "features.conv5_x", 2, TV_NAMES, str)
    return _soa(x, sd, "features.soa5")


def _pycls_trunk(sd, x, bgr=True):
    if bgr:
        x = torch.stack([x[:, 2], x[:, 1], x[:, 0]], dim=1)
    x = _stem(x, sd, "globalmodel.stem.conv.weight", "globalmodel.stem.bn")
    for i, stride in enumerate((1, 2, 2, 2)):
        x = _stage(x, sd, f"globalmodel.s{i + 1}", stride, PYCLS_NAMES, lambda j: f"b{j + 1}")
    return x


def _gem_ref(x, p):
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def _gemp_ref(x, p):  # pycls GeneralizedMeanPoolingP with a tensor exponent
    p = torch.tensor([p])
    return F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(p), 1).pow(1.0 / p).flatten(1)


def _l2_linear(prefix):
    return lambda sd, fmap, p: F.linear(F.normalize(_gem_ref(fmap, p), dim=1), sd[prefix + "weight"],
                                        sd[prefix + "bias"])


REFERENCES = {  # name -> (trunk(sd, x), head(sd, feature map, p))
    "resnet101_gem": (lambda sd, x: _tv_trunk(sd, x, ""), _l2_linear("fc.")),
    "resnet101_ap_gem": (lambda sd, x: _tv_trunk(sd, x, "module."), _l2_linear("module.fc.")),
    "resnet101_solar": (_solar_trunk, _l2_linear("whiten.")),
    "resnet101_delg": (_pycls_trunk, lambda sd, f, p: F.linear(_gemp_ref(f, p), sd["globalmodel.head.fc.weight"],
                                                                 sd["globalmodel.head.fc.bias"])),
    "resnet101_dolg": (_pycls_trunk, lambda sd, f, p: F.linear(_gemp_ref(f, p), sd["fc_t.weight"], sd["fc_t.bias"])),
    "mocov3": (lambda sd, x: _tv_trunk(sd, x, "module.base_encoder."), lambda sd, f, p: F.normalize(_gem_ref(f, p))),
    "barlowtwins": (lambda sd, x: _tv_trunk(sd, x, "module.backbone."), lambda sd, f, p: F.normalize(_gem_ref(f, p))),
}


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------
def _randomise_(teacher: nn.Module) -> None:
    """Well-scaled random weights everywhere, including BN running statistics and SOLAR's zero-initialised v."""
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.3, 0.8)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 10**6, ())))


def _close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def _differs(a, b):
    return (a - b).abs().max().item() > 1e-3 * b.abs().max().item()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    # 48x40 leaves a 3x3 map after conv4_x and 2x2 after conv5_x, so both SOA attentions are non-trivial.
    return torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def written(tmp_path_factory, image):
    """name -> (folder holding the written file, raw dict read back with plain torch.load, random teacher's output)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(sorted(TEACHERS).index(name))
            teacher = build_teacher(name, gem_p=GEM_P)
            _randomise_(teacher)
            folder = tmp_path_factory.mktemp(name)
            write_published_layout(name, teacher, folder / TEACHER_FILES[name])
            with torch.no_grad():
                out = teacher(image)
            raw = torch.load(folder / TEACHER_FILES[name], map_location="cpu", weights_only=True)
            cache[name] = (folder, raw, out)
        return cache[name]

    return get


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EMBED_DIMS))
def test_published_layout_reload_and_reference(name, written, image):
    folder, raw, random_out = written(name)
    published = LAYOUTS[name]
    assert published["file"] == TEACHER_FILES[name]

    # 1. the written file is the published container with exactly the published keys, shapes and dtypes
    assert {k: v for k, v in raw.items() if k != published["container"]} == published["meta"]
    got = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in raw[published["container"]].items()}
    assert got == published["layout"]

    # 2. reloading it gives the same teacher
    teacher = build_teacher(name, folder, gem_p=GEM_P)
    assert not teacher.training and teacher.embed_dim == EMBED_DIMS[name]
    assert all(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        out = teacher(image)
    assert out.shape == (2, EMBED_DIMS[name])
    _close(out, random_out, rtol=1e-6)

    # 3. it computes the paper's teacher output from the raw tensors of the file
    sd = raw[published["container"]]
    trunk, head = REFERENCES[name]
    with torch.no_grad():
        fmap = trunk(sd, image)
        _close(out, head(sd, fmap, GEM_P))
        if name in FILE_P_KEY:  # the file's own GeM exponent is discarded in favour of gem_p
            file_p = sd[FILE_P_KEY[name]].item()
            assert abs(file_p - GEM_P) > 0.4
            assert _differs(out, head(sd, fmap, file_p))
        if name in ("resnet101_delg", "resnet101_dolg"):  # fed BGR inside, not the RGB it is given
            assert _differs(out, head(sd, _pycls_trunk(sd, image, bgr=False), GEM_P))


def test_random_init_deterministic_and_gem_matches_adaptive_pool():
    torch.manual_seed(3)
    a = build_teacher("barlowtwins")
    torch.manual_seed(3)
    b = build_teacher("barlowtwins")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not a.training and a.embed_dim == 2048 and a.avgpool.p == 3.0
    x = torch.randn(2, 5, 3, 4).abs()
    for p in (1.5, 3.0, 4.2):
        _close(gem(x, p), _gemp_ref(x, p), rtol=1e-6)


def _edited(raw, container, drop=(), rename=None, add=None):
    state = dict(raw[container])
    for key in drop:
        del state[key]
    if rename:
        state[rename[1]] = state.pop(rename[0])
    state.update(add or {})
    return {**raw, container: state}


def test_missing_and_renamed_keys_name_the_key(written, tmp_path):
    _, raw, _ = written("mocov3")
    key = "module.base_encoder.layer2.0.conv1.weight"
    for case, edited in (("missing", _edited(raw, "state_dict", drop=[key])),
                         ("renamed", _edited(raw, "state_dict", rename=(key, key + "_old")))):
        (tmp_path / case).mkdir()
        torch.save(edited, tmp_path / case / TEACHER_FILES["mocov3"])
    missing_file = re.escape(str(tmp_path / "missing" / "mocov3_1000ep.pth.tar"))
    with pytest.raises(CheckpointError, match=rf"{missing_file}.*missing.*{key}"):
        build_teacher("mocov3", tmp_path / "missing")
    with pytest.raises(CheckpointError, match=rf"missing.*{key}'.*unexpected.*{key}_old"):
        build_teacher("mocov3", tmp_path / "renamed")


def test_loader_drops_exactly_what_the_paper_drops(written):
    # MoCo v3: every key outside the online base encoder is dropped; a stray key inside it is not
    _, raw, _ = written("mocov3")
    teacher_from_checkpoint("mocov3", _edited(raw, "state_dict", add={"module.queue": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*module\.base_encoder\.extra"):
        teacher_from_checkpoint("mocov3", _edited(raw, "state_dict", add={"module.base_encoder.extra": torch.ones(1)}))
    # DOLG: pool1.p and the unused heads must be there with their shapes; pool_g.p is optional
    _, raw, _ = written("resnet101_dolg")
    teacher_from_checkpoint("resnet101_dolg", _edited(raw, "model_state", drop=["pool_g.p"]))
    with pytest.raises(CheckpointError, match="pool1.p"):
        teacher_from_checkpoint("resnet101_dolg", _edited(raw, "model_state", drop=["pool1.p"]))
    small_classifier = {"desc_cls.weight": torch.ones(10, 512)}
    with pytest.raises(CheckpointError, match=r"desc_cls\.weight.*\(10, 512\)"):
        teacher_from_checkpoint("resnet101_dolg", _edited(raw, "model_state", add=small_classifier))
    # DELG: anything outside globalmodel is dropped, and head.pool.p need not be there
    _, raw, _ = written("resnet101_delg")
    teacher_from_checkpoint("resnet101_delg", _edited(raw, "model_state", drop=["globalmodel.head.pool.p"],
                                                      add={"localmodel.att.weight": torch.ones(2)}))
    # SOLAR: pool.p must be there; a trunk key without the features. prefix is an error
    _, raw, _ = written("resnet101_solar")
    with pytest.raises(CheckpointError, match=r"missing.*'pool\.p'"):
        teacher_from_checkpoint("resnet101_solar", _edited(raw, "state_dict", drop=["pool.p"]))
    with pytest.raises(CheckpointError, match=r"unexpected.*'conv1\.0\.weight'"):
        teacher_from_checkpoint("resnet101_solar", _edited(raw, "state_dict", rename=("features.conv1.0.weight",
                                                                                      "conv1.0.weight")))


def test_bad_containers_files_and_names(written, tmp_path):
    _, raw, _ = written("barlowtwins")
    with pytest.raises(CheckpointError, match=r"entry 'model'.*\['state_dict'\]"):
        teacher_from_checkpoint("barlowtwins", {"state_dict": raw["model"]})
    with pytest.raises(CheckpointError, match="entry 'model'.*list"):
        teacher_from_checkpoint("barlowtwins", [1, 2])
    with pytest.raises(CheckpointError, match=r"\['meta'\]\['outputdim'\]"):
        teacher_from_checkpoint("resnet101_gem", {"state_dict": {}})
    with pytest.raises(CheckpointError) as exc:
        build_teacher("resnet101_delg", tmp_path)
    assert_names(exc.value, tmp_path / "r101_delg_s512.pyth", "not found")
    with pytest.raises(ValueError) as exc:
        build_teacher("resnet152_gem")
    assert_names(exc.value, "'resnet152_gem'", *TEACHERS)  # the unknown name, and every valid one
    teacher = teacher_from_checkpoint("barlowtwins", raw)
    with pytest.raises(ValueError) as exc:
        published_checkpoint("mocov3", teacher)
    assert_names(exc.value, "'mocov3'", "'barlowtwins'")  # the name asked for, and the one the teacher was built as
