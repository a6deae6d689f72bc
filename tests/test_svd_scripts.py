"""The three SVD scripts end to end on toy SVD data (tiny frames, random teachers in the published layout).

svd_eval's mAP is checked against an independent recomputation (per-video forward passes, Python loops for the
similarities, a sorted() ranking and the AP formula written out).
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import CHEAP_TEACHERS, run_main, run_script, torchrun, weights_dir
from PIL import Image

from utils.checkpoint import load_file

pytestmark = pytest.mark.slow

CROP = 32


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from datasets.toy import make_toy_svd

    root = tmp_path_factory.mktemp("svd")
    info = make_toy_svd(root, n_queries=3, n_train_queries=3, positives=2, negatives=1, n_unlabeled=4,
                        frames=(2, 5), size=40, seed=1)
    return root, info


def _distill(toy, ckpt_dir, *extra, launcher=None):
    root, _ = toy
    return run_script("svd_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", ckpt_dir,
                      "-dm", root / "svd.yaml", "--path_to_pretrained_weights", weights_dir(CHEAP_TEACHERS),
                      "--student_init", "random", "-b", "4", "--num_workers", "0", "--crop_size", str(CROP),
                      "--lr", "1e-3", "--no_progress", *extra, launcher=launcher)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """Single process, 2 epochs with a snapshot every epoch."""
    ckpt_dir = tmp_path_factory.mktemp("svd_ckpt")
    proc = _distill(toy, ckpt_dir, "--epochs", "2", "--snapshot_step", "1", "-t", "0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt_dir


def test_svd_distill_outputs_and_exact_resume(toy, trained, tmp_path):
    ckpt = load_file(trained / "checkpoint_2.pt")
    assert ckpt["epoch"] == 2
    assert all(k.startswith("module.base_encoder.") for k in ckpt["state_dict"]) and len(ckpt["state_dict"]) == 122
    assert {"optimizer", "lr_scheduler", "loss_fn", "sampler"} <= set(ckpt)
    assert ckpt["args"]["st"] == ckpt["args"]["tt"] == 0.1  # -t sets both temperatures
    # 12 training videos, batches of 4 -> 3 iterations per epoch
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]
    assert ckpt["iteration"] == 6
    # resume from the epoch-1 checkpoint with -r auto: the result equals the uninterrupted run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(trained / "checkpoint_1.pt", resumed / "checkpoint_last.pt")
    proc = _distill(toy, resumed, "--epochs", "2", "--snapshot_step", "1", "-t", "0.1", "-r", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = load_file(resumed / "checkpoint_last.pt")
    _same_state(again["state_dict"], ckpt["state_dict"])
    torch.testing.assert_close(again["loss_fn"]["pos_win_count"], ckpt["loss_fn"]["pos_win_count"])


def test_svd_distill_two_processes(toy, tmp_path):
    proc = _distill(toy, tmp_path / "ddp", "--epochs", "1", launcher=torchrun(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_file(tmp_path / "ddp" / "checkpoint_last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["sampler"]) == 2
    assert [s["rank"] for s in ckpt["sampler"]] == [0, 1]
    assert ckpt["iteration"] == 2  # 12 videos over 2 ranks -> 6 each -> batches of 4 + 2


def test_svd_pca_learn(toy, tmp_path):
    """In-process (a single process, no process group) to save an interpreter start."""
    import svd_pca_learn
    from models.pca_layer import load_pca_layer

    root, _ = toy
    out = tmp_path / "pca.pt"
    svd_pca_learn.main(["-t", "barlowtwins", "-dm", str(root / "svd.yaml"), "--path_to_pretrained_weights",
                        str(weights_dir(CHEAP_TEACHERS)), "--dump_to", str(out), "--embed_dim", "16", "--crop_size",
                        str(CROP), "-b", "8", "--num_workers", "0", "--no_progress", "--device", "cpu"])
    layer = load_pca_layer(out)
    assert (int(layer.dim1), int(layer.dim2)) == (2048, 16)
    assert torch.isfinite(layer.dvt).all()


# --------------------------------------------------------------------------------------------------------------
# svd_eval against an independent recomputation


def _naive_map(toy, embed, sim_fn, max_frames, stride, topk, subset, normalize_input):
    import torchvision.transforms as T

    root, info = toy
    gt = {}
    for line in (root / "metadata-release" / "test_groundtruth").read_text().splitlines():
        q, c, label = line.split()
        gt.setdefault(q[:-4], {})[c[:-4]] = int(label)
    unlabeled = [] if subset else info["ids"]["unlabeled"]
    steps = [T.Resize(round(CROP * 256 / 224)), T.CenterCrop(CROP), T.ToTensor()]
    if normalize_input:
        steps.append(T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    tf = T.Compose(steps)

    def frames_of(vid):
        n = info["frame_counts"][vid]
        imgs = [tf(Image.open(root / "frames" / vid / f"{i:04d}.jpg").convert("RGB"))
                for i in range(0, min(n, max_frames), stride)]
        with torch.no_grad():
            return [embed(img[None])[0].double() for img in imgs]

    def similarity(qf, cf):
        if sim_fn in ("fme", "fmx"):
            pool = (lambda fs: sum(fs) / len(fs)) if sim_fn == "fme" else (lambda fs: torch.stack(fs).max(0).values)
            return float(F.normalize(pool(qf), dim=0) @ F.normalize(pool(cf), dim=0))
        qn, cn = [F.normalize(f, dim=0) for f in qf], [F.normalize(f, dim=0) for f in cf]
        pairs = [[float(a @ b) for b in cn] for a in qn]
        if sim_fn == "cf":
            return sum(max(row) for row in pairs) / len(pairs)
        if sim_fn == "smx":
            return max(max(row) for row in pairs)
        return sum(map(sum, pairs)) / (len(qn) * len(cn))

    def ap(labels):
        hits, total = 0, 0.0
        for i, lab in enumerate(labels):
            if lab > 0:
                hits += 1
                total += hits / (i + 1)
        return total / hits if hits else 0.0

    feats = {}
    result = {f"top-{k}": 0.0 for k in topk} | {"top-inf": 0.0}
    for q, truth in gt.items():
        feats.setdefault(q, frames_of(q))
        items = []
        for c in list(truth) + unlabeled:
            feats.setdefault(c, frames_of(c))
            items.append((similarity(feats[q], feats[c]), truth.get(c, 0)))
        labels = [lab for _, lab in sorted(items, key=lambda item: -item[0])]
        for k in topk:
            result[f"top-{k}"] += ap(labels[:k]) / len(gt)
        result["top-inf"] += ap(labels) / len(gt)
    return result


def test_svd_eval_teacher_pca_cli_matches_recomputation(toy, tmp_path):
    from models.pca_layer import load_pca_layer, pca_weight_path
    from models.teachers import build_teacher

    root, info = toy
    weights = weights_dir(CHEAP_TEACHERS)
    out = tmp_path / "res.json"
    proc = run_main("svd_eval.py", "-t", "mocov3", "--pca", "--path_to_pretrained_weights", weights,
                      "-dm", root / "svd.yaml", "--sim_fn", "cf", "--topk", "1", "3", "--max_frames", "4",
                      "--stride", "2", "--crop_size", str(CROP), "-b", "3", "--num_workers", "0", "--no_progress",
                      "--output_json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["sim_fn"] == "cf" and res["n_queries"] == 3
    assert res["n_candidates"] == 3 * (2 + 1) + 4  # test-labeled + unlabeled videos
    assert list(res["map"]) == ["top-1", "top-3", "top-inf"]
    assert f"top-1 mAP: {res['map']['top-1']:.4f} | top-3 mAP: {res['map']['top-3']:.4f} | top-inf mAP: " \
           f"{res['map']['top-inf']:.4f}" in proc.stdout
    teacher = build_teacher("mocov3", weights, gem_p=1.0)
    pca = load_pca_layer(pca_weight_path(weights, "mocov3"))
    want = _naive_map(toy, lambda x: pca(F.normalize(teacher(x), dim=-1)), "cf", 4, 2, [1, 3], False, False)
    assert res["map"] == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("sim_fn", ["fmx", "sme"])
def test_svd_eval_student_subset_matches_recomputation(toy, trained, tmp_path, sim_fn):
    import svd_eval
    from models.students import load_student

    root, _ = toy
    out = tmp_path / "res.json"
    svd_eval.main(["-a", "resnet18", "-r", str(trained / "checkpoint_2.pt"), "-dm", str(root / "svd.yaml"),
                   "--sim_fn", sim_fn, "--subset_eval", "--input_norm", "imagenet", "--crop_size", str(CROP),
                   "--max_frames", "3", "--num_workers", "0", "--no_progress", "--device", "cpu",
                   "--output_json", str(out)])
    res = json.loads(out.read_text())
    student = load_student(trained / "checkpoint_2.pt", "resnet18", gem_p=1.0)
    want = _naive_map(toy, student, sim_fn, 3, 1, [100], True, True)
    assert res["map"] == pytest.approx(want, abs=1e-9)


def test_svd_eval_bad_flags():
    import svd_eval

    for argv in (["-t", "mocov3", "--topk", "0"], ["-t", "mocov3", "--topk", "-5"], ["-t", "mocov3", "--topk", "x"]):
        with pytest.raises(SystemExit) as exc:
            svd_eval.parse_args(argv)
        assert exc.value.code == 2


def test_gld_distill_refuses_to_resume_an_svd_run(trained, tmp_path):
    """Its must-match check compared --imsize with the SVD run's --crop_size, so it never fired and the run went on."""
    import shutil

    from helpers import toy_gld

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = run_main("gld_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", run, "-r", "auto",
                     "--gld_root_path", toy_gld(), "--path_to_pretrained_weights", weights_dir(CHEAP_TEACHERS),
                     "--student_init", "random", "--imsize", 32, "-b", 4, "--epochs", 3, "--num_workers", 0,
                     "--no_progress")
    assert res.returncode == 1 and "Traceback" not in res.stderr and "svd_distill.py" in res.stderr, res.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
