"""PCA-whitening: closed-form whitening, raw eigh buffers, n_0, no input mutation, published file layout."""
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_names

from models.pca_layer import PCA_BUFFERS, PCAWhitening, load_pca_layer, pca_weight_path, save_pca_layer
from utils.checkpoint import CheckpointError

LAYOUT_FILE = Path(__file__).parent / "data" / "checkpoint_layouts.json"  # keys of the released files


def _correlated(n: int, dim: int, rank: int | None = None, seed: int = 0, l2: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = rank or dim
    scales = torch.linspace(3.0, 0.5, rank)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64) * scales
    mix = torch.randn(rank, dim, generator=g, dtype=torch.float64)
    x = z @ mix + torch.randn(dim, generator=g, dtype=torch.float64)  # non-zero mean
    return (torch.nn.functional.normalize(x, dim=1) if l2 else x).float()


@pytest.mark.parametrize("whit", [0.5, 0.25])
def test_whitening_closed_form(whit):
    x = _correlated(600, 16)
    pca = PCAWhitening(16, 6, whit=whit).fit(x)
    x64 = x.double()
    centred = x64 - x64.mean(0, keepdim=True)
    lam, vec = torch.linalg.eigh(centred.T @ centred / len(x64))
    lam, vec = lam.flip(0)[:6], vec.flip(1)[:, :6]
    y = pca(x).double()
    cov_y = (y - y.mean(0)).T @ (y - y.mean(0)) / len(y)
    # whitened features have covariance diag(lam^(1 - 2 whit)): the identity for whit = 0.5
    torch.testing.assert_close(cov_y, torch.diag(lam ** (1 - 2 * whit)), atol=2e-3, rtol=2e-3)
    # dvt^T dvt = U diag(lam^-2whit) U^T does not depend on the eigenvectors' signs
    dvt = pca.dvt.double()
    torch.testing.assert_close(dvt.T @ dvt, vec @ torch.diag(lam ** (-2 * whit)) @ vec.T, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(pca.mean.double(), x64.mean(0, keepdim=True), rtol=0, atol=1e-6)
    assert int(pca.n_0) == 0


def _paper_fit(x: torch.Tensor, dim2: int, whit: float = 0.5):
    """The paper's train_pca steps, written out on a private copy (it works in place)."""
    x = x.clone()
    mean = x.mean(dim=0, keepdim=True)
    x -= mean
    d, v = torch.linalg.eigh(x.t().mm(x) / x.size(0))
    raw_d, raw_v = d.clone(), v.clone()
    eps = d.max() * 1e-5
    n_0 = (d < eps).sum()
    d[d < eps] = eps
    idx = torch.argsort(d, descending=True)[:dim2]
    d, v = d[idx], v[:, idx]
    dvt = torch.diag(1.0 / d ** torch.tensor(whit)) @ v.T
    return mean, raw_d, raw_v, n_0, dvt


def test_raw_eigh_buffers_n0_and_paper_equivalence_rank_deficient():
    x = _correlated(200, 12, rank=5, seed=1, l2=False)  # an affine 5-d subspace: 7 null directions
    pca = PCAWhitening(12, 4).fit(x)
    mean, raw_d, raw_v, n_0, dvt = _paper_fit(x, 4)
    assert int(pca.n_0) == int(n_0) == 7
    torch.testing.assert_close(pca.d, raw_d, rtol=0, atol=0)  # unclamped, ascending, as eigh returned them
    torch.testing.assert_close(pca.v, raw_v, rtol=0, atol=0)
    assert float(pca.d.min()) < float(pca.d.max()) * 1e-5
    torch.testing.assert_close(pca.mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(pca.dvt, dvt, rtol=0, atol=0)


def test_fit_and_forward_leave_input_untouched():
    x = _correlated(100, 8, seed=2)
    before = x.clone()
    pca = PCAWhitening(8, 4).fit(x)
    assert torch.equal(x, before)
    out = pca(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, (before - pca.mean) @ pca.dvt.T)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim2"):
        PCAWhitening(8, 16)
    with pytest.raises(ValueError, match="at least 2"):
        PCAWhitening(8, 4).fit(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        PCAWhitening(8, 4).fit(torch.randn(10, 9))


def _published_buffers() -> dict:
    if LAYOUT_FILE.is_file():
        return json.loads(LAYOUT_FILE.read_text())["pca"]["buffers_2048_to_512"]
    return {"dim1": [[], "int64"], "dim2": [[], "int64"], "whit": [[], "float32"], "d": [[2048], "float32"],
            "v": [[2048, 2048], "float32"], "n_0": [[], "int64"], "mean": [[1, 2048], "float32"],
            "dvt": [[512, 2048], "float32"]}


def _small_published_file(path: Path, dim1: int = 32, dim2: int = 8) -> dict:
    """A file in the published layout (same names, order, dtypes; shapes scaled from 2048 -> 512)."""
    g = torch.Generator().manual_seed(5)
    scale = {2048: dim1, 512: dim2}
    state = {}
    for name, (shape, dtype) in _published_buffers().items():
        shape = [scale[s] for s in shape if s != 1] if shape else []
        if name == "mean":
            shape = [1, dim1]
        dt = getattr(torch, dtype)
        if name in ("dim1", "dim2"):
            state[name] = torch.tensor(dim1 if name == "dim1" else dim2, dtype=dt)
        elif name == "whit":
            state[name] = torch.tensor(0.5, dtype=dt)
        elif name == "n_0":
            state[name] = torch.tensor(3, dtype=dt)
        else:
            state[name] = torch.randn(shape, generator=g).to(dt)
    torch.save(state, path)
    return state


def test_published_layout_loads_and_applies(tmp_path):
    assert list(_published_buffers()) == list(PCA_BUFFERS)
    state = _small_published_file(tmp_path / "pca.pt")
    layer = load_pca_layer(tmp_path / "pca.pt")
    assert (layer.in_dim, layer.out_dim) == (32, 8)
    own = layer.state_dict()
    assert list(own) == list(PCA_BUFFERS)
    for k, v in state.items():
        assert own[k].dtype == v.dtype and torch.equal(own[k], v), k
    x = torch.randn(5, 32)
    expected = torch.stack([
        torch.stack([sum((x[i, j] - state["mean"][0, j]) * state["dvt"][r, j] for j in range(32)) for r in range(8)])
        for i in range(5)])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_fresh_layer_has_published_dtypes_and_shapes():
    layer = PCAWhitening(2048, 512)
    for (name, tensor), (exp_name, (shape, dtype)) in zip(layer.state_dict().items(), _published_buffers().items()):
        assert name == exp_name and list(tensor.shape) == shape and str(tensor.dtype) == f"torch.{dtype}"


def test_missing_or_extra_key_fails_clearly(tmp_path):
    state = _small_published_file(tmp_path / "pca.pt")
    del state["dvt"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken\.pt.*dvt"):
        load_pca_layer(tmp_path / "broken.pt")
    state["dvt"] = torch.zeros(8, 32)
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="extra"):
        load_pca_layer(tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_pca_layer(tmp_path / "absent.pt")


def test_save_and_reload(tmp_path):
    pca = PCAWhitening(10, 3).fit(_correlated(50, 10, seed=3))
    save_pca_layer(pca, tmp_path / "sub" / "p.pt")
    loaded = load_pca_layer(tmp_path / "sub" / "p.pt")
    for k, v in pca.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_pca_weight_path_names(tmp_path):
    if LAYOUT_FILE.is_file():
        files = json.loads(LAYOUT_FILE.read_text())["pca"]["files"]
        for teacher, name in files.items():  # at 512-d every name is the published one
            assert pca_weight_path(tmp_path, teacher, 512) == tmp_path / name.format(embed_dim=512)
    assert pca_weight_path("w", "resnet101_dolg", 128) == \
        Path("w/pca_weights/resnet101_dolg_pca_128d_gldv2_512x512_p3_global_randcrop.pt")
    assert pca_weight_path("w", "resnet101_gem").name == "resnet101_gem_pca_512d_gldv2_512x512_p3_randcrop.pt"
    # the SVD teachers were published at 512-d only; another size is named by its size, never as a 512-d file
    assert pca_weight_path("w", "mocov3") == Path("w/pca_weights/mocov3_pca_512d_svd_224x224_p1.pt")
    assert pca_weight_path("w", "mocov3", 128) == Path("w/pca_weights/mocov3_pca_128d_svd_224x224_p1.pt")
    assert pca_weight_path("w", "barlowtwins", 64).name == "barlowtwins_pca_64d_svd_224x224_p1.pt"
    with pytest.raises(ValueError, match="resnet101_gem"):
        pca_weight_path("w", "vgg")


def test_loading_checks_the_dimensions_the_caller_needs(tmp_path):
    path = tmp_path / "pca_weights" / "mocov3_pca_64d_svd_224x224_p1.pt"
    save_pca_layer(PCAWhitening(32, 16).fit(torch.randn(40, 32)), path)  # a 16-d file under a 64-d name
    assert load_pca_layer(path, in_dim=32, out_dim=16).out_dim == 16
    with pytest.raises(CheckpointError) as exc:
        load_pca_layer(path, out_dim=64)
    assert_names(exc.value, path, "16", "64", "--embed_dim")  # the file, what it holds, what the flag asks
    with pytest.raises(CheckpointError) as exc:
        load_pca_layer(path, in_dim=2048)
    assert_names(exc.value, path, "32-d", "2048-d")  # the file's input size, and the teacher's output size


def test_a_pca_file_holding_nan_is_an_error_naming_it(tmp_path):
    """Used, it made the loss NaN at the first step, reported as a divergence with a checkpoint that did not exist."""
    from models.pca_layer import PCAWhitening, load_pca_layer, save_pca_layer
    from utils.checkpoint import CheckpointError

    layer = PCAWhitening(8, 4)
    layer.dvt[0, 0] = float("nan")
    save_pca_layer(layer, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="nan.pt"):
        load_pca_layer(tmp_path / "nan.pt")
    layer.dvt[0, 0] = 1.0
    save_pca_layer(layer, tmp_path / "ok.pt")
    assert load_pca_layer(tmp_path / "ok.pt").out_dim == 4
