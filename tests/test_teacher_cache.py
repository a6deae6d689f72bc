"""--teacher_cache: replayable views equal the paper's transforms, stored embeddings equal the online teachers' on
the student's very input, reproducible view choice, a build that is the same on 1 and 2 gloo ranks and resumes
after a kill, cache keys, and training from the cache that never runs a teacher and resumes exactly."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import CHEAP_TEACHERS, ROOT, assert_user_error, run_main, torch_threads, toy_gld, weights_dir
from PIL import Image, ImageOps

import engine.teacher_cache as tc
from datasets.gld import GLDPairDataset
from datasets.sampler import SeededItems
from datasets.transforms import GLDView, gld_train_transform, svd_augment, svd_distill_views
from engine.distill import build_teachers, check_weight_files
from engine.params import GLDTrainParams, SVDTrainParams
from engine.training_data import build_gld_data, build_svd_data
from utils.checkpoint import load_file
from utils.distributed import DistContext
from utils.flags import declared_fields
from utils.launch import free_port, init_distributed
from utils.preemption import EXIT_PREEMPTED

VIEWS, SIZE = 2, 32
# float16 keeps 11 significant bits: an entry of a unit vector (|x| <= 1) is stored within 2^-11 * |x| < 5e-4
FP16_ATOL = 5e-4


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def random_image(seed, size=(56, 44)):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def seeded(fn, seed):
    import random

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        return fn()


# ------------------------------------------------------------------------------------- replayable views
@pytest.mark.parametrize("name", ["gld", "svd view 1", "svd view 2"])
def test_a_replayed_view_is_the_paper_transform_under_the_same_seed(name):
    """Same RNG draws in the same order, same pixels: the cache samples exactly the training distribution."""
    view1, view2 = svd_distill_views(SIZE)
    view, transform = {"gld": (GLDView(SIZE), gld_train_transform(SIZE)),
                       "svd view 1": (view1, svd_augment(SIZE, blur_p=1.0)),
                       "svd view 2": (view2, svd_augment(SIZE, blur_p=0.1, solarize_p=0.2))}[name]
    img = random_image(1)
    kinds = set()
    for seed in range(40):  # enough draws to take every branch (jitter, grayscale, blur, solarize, flip)
        params = seeded(lambda: view.sample(img), seed)
        assert len(params) == view.n_params
        kinds.add(tuple(params[4:]) if name == "gld" else (params[4], params[13], params[14], params[16]))
        torch.testing.assert_close(view.apply(img, params), seeded(lambda: transform(img), seed), rtol=0, atol=0)
    assert len(kinds) > 1


# --------------------------------------------------------------------------------------------- the cache
def toy_items_root():
    return toy_gld(n_landmarks=6, imgs_per_landmark=2, size=40, seed=5, n_singletons=0)


def cache_args(cache_dir, weights=None, **overrides):
    """A run's parameters with its preflight's file hashes. ``weights``: the folder of another process's
    ``weights_dir()`` (a spawned rank would write its own, whose random PCA bytes depend on the thread count)."""
    values = dict(teachers=list(CHEAP_TEACHERS), path_to_pretrained_weights=str(weights or weights_dir()),
                  ckpt_dir=str(Path(cache_dir) / "run"), gld_root_path=str(toy_items_root()), imsize=SIZE,
                  teacher_cache=str(cache_dir), teacher_views=VIEWS, num_workers=0, no_progress=True, batch_size=2)
    params = GLDTrainParams(**{**values, **overrides})
    params.weight_sha256 = check_weight_files(params)  # as the preflight does
    return params


def toy_items():
    return GLDPairDataset(toy_items_root())


def make_cache(params):
    data = build_gld_data(params, DistContext())
    return tc.TeacherCache(params, len(data.dataset), data.fingerprint, data.load_item, data.views)


def small_shards(monkeypatch):
    """12 items in 3 shards of 4, embedded 2 items (4 views) per batch: several shards, batches inside them."""
    monkeypatch.setattr(tc, "CACHE_SHARD", 4)
    monkeypatch.setattr(tc, "VIEWS_PER_BATCH", 4)


def whitened(teachers, x):
    with torch.no_grad():
        return torch.stack([F.normalize(t, dim=-1) for t in teachers(x)], dim=1)  # (B, teachers, D)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    args = cache_args(tmp_path_factory.mktemp("cache"))
    cache = make_cache(args)
    teachers = build_teachers(args)
    cache.build(teachers, DistContext())
    assert cache.complete
    return cache, teachers


def test_a_stored_view_holds_its_drawn_parameters_and_the_teachers_embeddings_of_it(built):
    cache, teachers = built
    view = cache.chains[0]
    stored = tc.CachedViews(cache.entries()[0], VIEWS, len(CHEAP_TEACHERS))
    for item in (0, 7, 11):
        img = cache.load(item)
        embeddings = []
        for v in range(VIEWS):
            params, pixels = tc.drawn_view(view, img, tc.view_seed(0, 0, item, v))
            got_params, got = stored.row(item, v)
            assert got_params == params
            torch.testing.assert_close(got, whitened(teachers, pixels[None])[0], rtol=0, atol=FP16_ATOL)
            embeddings.append(got)
        # the test's power: another view's embedding is far outside the tolerance
        assert (embeddings[0] - embeddings[1]).abs().max() > 20 * FP16_ATOL


def test_the_students_input_is_the_view_the_teachers_embedded_and_its_choice_is_reproducible(built):
    cache, teachers = built
    items = SeededItems(tc.CachedItems(cache))
    chosen = set()
    for seed in range(12):
        x, embedding = items[(5, seed)]
        again_x, again_embedding = items[(5, seed)]
        assert torch.equal(x, again_x) and torch.equal(embedding, again_embedding)
        torch.testing.assert_close(embedding, whitened(teachers, x[None])[0], rtol=0, atol=FP16_ATOL)
        chosen.add(float(embedding[0, 0]))
    assert len(chosen) == VIEWS  # the seeds pick each of the K views


def shard_files(entry):
    return {p.name: np.load(p) for p in sorted(entry.folder.glob("shard-*.npy"))}


class Interrupted(Exception):
    pass


def test_a_killed_build_resumes_from_its_shards_to_the_same_cache(tmp_path, monkeypatch):
    small_shards(monkeypatch)
    args = cache_args(tmp_path / "killed")
    teachers = build_teachers(args)
    calls = []

    def failing(x):
        calls.append(x.shape[0])
        if len(calls) == 3:  # shard 0 (2 batches) is written, shard 1 is not
            raise Interrupted
        return teachers(x)

    cache = make_cache(args)
    with pytest.raises(Interrupted):
        cache.build(failing, DistContext())
    entry = cache.entries()[0]
    assert sorted(entry.done_shards()) == [0] and not entry.complete
    calls.clear()
    cache.build(teachers_counting(teachers, calls), DistContext())
    assert len(calls) == 4  # shards 1 and 2 only
    fresh = make_cache(cache_args(tmp_path / "fresh"))
    fresh.build(teachers, DistContext())
    resumed, expected = shard_files(entry), shard_files(fresh.entries()[0])
    # 3 shards of embeddings, view parameters and views per item
    assert resumed.keys() == expected.keys() and len(expected) == 9
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


def test_a_stop_signal_ends_the_build_after_a_shard_and_the_next_build_continues(tmp_path, monkeypatch):
    """SIGTERM/SIGUSR1 during an hours-long build: the current shard is finished and kept, the build returns
    without completing the entry, and the next build embeds the rest only, to the same cache."""
    from utils.preemption import StopRequest

    small_shards(monkeypatch)
    args = cache_args(tmp_path / "stopped")
    teachers = build_teachers(args)
    cache = make_cache(args)
    with StopRequest() as stop:
        def signalled(x):  # the signal arrives while shard 0 is embedded
            stop.received = signal.SIGUSR1
            return teachers(x)

        assert cache.build(signalled, DistContext(), stop) is False
    entry = cache.entries()[0]
    assert sorted(entry.done_shards()) == [0] and not entry.complete
    calls = []
    assert cache.build(teachers_counting(teachers, calls), DistContext()) is True
    assert len(calls) == 4  # shards 1 and 2 only
    fresh = make_cache(cache_args(tmp_path / "fresh"))
    fresh.build(teachers, DistContext())
    continued, expected = shard_files(entry), shard_files(fresh.entries()[0])
    assert continued.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(continued[name], expected[name], err_msg=name)


def teachers_counting(teachers, calls):
    def counted(x):
        calls.append(x.shape[0])
        return teachers(x)
    return counted


def _build_on_rank(rank, port, cache_dir, weights, root):
    tc.CACHE_SHARD, tc.VIEWS_PER_BATCH = 4, 4  # as small_shards, in the spawned process
    torch.set_num_threads(1)
    ctx = init_distributed(rank, False, f"tcp://127.0.0.1:{port}", 0, 2)
    try:
        args = cache_args(cache_dir, weights, gld_root_path=str(root))  # the data root is in the key: the same
        make_cache(args).build(build_teachers(args), ctx)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_build_the_cache_of_one(tmp_path, monkeypatch):
    torch.multiprocessing.spawn(_build_on_rank, args=(free_port(), tmp_path / "two", weights_dir(), toy_items_root()),
                                nprocs=2)
    small_shards(monkeypatch)
    params = cache_args(tmp_path / "one")
    one = make_cache(params)
    one.build(build_teachers(params), DistContext())
    two = make_cache(cache_args(tmp_path / "two"))
    assert two.complete and two.entries()[0].folder.name == one.entries()[0].folder.name
    got, expected = shard_files(two.entries()[0]), shard_files(one.entries()[0])
    assert got.keys() == expected.keys() and len(expected) == 9
    for name in expected:  # same views; embeddings within one float16 rounding of each other
        if name.endswith(".params.npy"):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name].astype(np.float32), expected[name].astype(np.float32), rtol=0,
                                       atol=2 * FP16_ATOL, err_msg=name)


def stored(cache):
    """Everything the cache stores (every chain's shards), by file name."""
    return {f"{chain}/{name}": array for chain, entry in enumerate(cache.entries())
            for name, array in shard_files(entry).items()}


# The key tests' teachers: the paper's two cheapest and a timm ViT (its own normalisation, its --teacher_pool), at an
# --embed_dim the ViT's 192-d descriptor allows.
KEY_TEACHERS, KEY_DIM = (*CHEAP_TEACHERS, "timm:vit_tiny_patch16_224"), 128


def key_base():
    return {"teachers": list(KEY_TEACHERS), "embed_dim": KEY_DIM,
            "path_to_pretrained_weights": str(weights_dir(KEY_TEACHERS, KEY_DIM))}


@pytest.fixture(scope="module")
def perturbations(tmp_path_factory):
    """For every flag of the training: another valid value (or values of several flags that only go together), from
    ``key_base()``. ``gld_root_path``: another folder of other images under the same names (image contents are not
    hashed: the key takes the folder); ``gld_csv``: the same list at another path; ``path_to_pretrained_weights``: a
    copy."""
    root = tmp_path_factory.mktemp("perturbed")
    other_images = root / "gld"
    shutil.copytree(toy_items_root(), other_images)
    for image in (other_images / "train").rglob("*.jpg"):  # the same names, other pixels
        with Image.open(image) as img:
            ImageOps.invert(img.convert("RGB")).save(image)
    csv_copy = root / "list.csv"
    shutil.copy(toy_items_root() / "meta" / "train_clean.csv", csv_copy)
    weights_copy = root / "weights"
    shutil.copytree(key_base()["path_to_pretrained_weights"], weights_copy)
    return {
        "world_size": {"world_size": 2}, "nproc_per_node": {"nproc_per_node": 2}, "rank": {"rank": 1},
        "dist_url": {"dist_url": "tcp://127.0.0.1:29400"}, "device": {"device": "cpu"}, "seed": {"seed": 1},
        "amp": {"amp": "bf16"}, "no_progress": {"no_progress": False}, "trust_checkpoint": {"trust_checkpoint": True},
        "arch": {"arch": "resnet34"}, "teachers": {"teachers": list(KEY_TEACHERS[::-1])},
        "teacher_pool": {"teacher_pool": "gem"},
        "path_to_pretrained_weights": {"path_to_pretrained_weights": str(weights_copy)},
        "embed_dim": {"embed_dim": KEY_DIM // 2,
                      "path_to_pretrained_weights": str(weights_dir(KEY_TEACHERS, KEY_DIM // 2))},
        "p": {"p": 1.0}, "student_init": {"student_init": "random"}, "batch_size": {"batch_size": 4},
        "num_workers": {"num_workers": 1}, "ckpt_dir": {"ckpt_dir": str(root / "elsewhere")},
        "resume": {"resume": str(csv_copy)}, "overwrite": {"overwrite": True}, "epochs": {"epochs": 3},
        "start_epoch": {"start_epoch": 1}, "lr": {"lr": 0.1}, "weight_decay": {"weight_decay": 0.0},
        "strategy": {"strategy": "mean"}, "snapshot_step": {"snapshot_step": 2},
        "save_every": {"save_every": 2}, "log_every": {"log_every": 3}, "tensorboard": {"tensorboard": True},
        "teacher_cache": {"teacher_cache": str(root / "another_cache")}, "teacher_views": {"teacher_views": 3},
        "teacher_cache_dtype": {"teacher_cache_dtype": "float32"}, "deterministic": {"deterministic": True},
        "gld_root_path": {"gld_root_path": str(other_images)}, "gld_csv": {"gld_csv": str(csv_copy)},
        "imsize": {"imsize": SIZE + 8}, "tt": {"tt": 0.1}, "st": {"st": 0.1},
    }


def test_every_training_flag_is_probed(perturbations):
    """A new flag must be given a perturbation here: the key test below then decides its teacher-cache role."""
    assert {field.name for field, _ in declared_fields(GLDTrainParams)} == set(perturbations)


def test_the_cache_key_changes_exactly_when_the_stored_embeddings_change(tmp_path, perturbations):
    """Perturbing a flag changes the cache's key if and only if it changes what the cache stores (the teachers'
    embeddings of the views, the views' parameters): a flag that changes the embeddings but not the key would reuse
    a stale cache; one that changes the key but not the embeddings would rebuild it for nothing. The flags outside
    the key are perturbed all at once for the stored values (they change nothing together, so none does alone)."""
    base = key_base()

    def built(name, changes):
        params = cache_args(tmp_path / name, **{**base, **changes})
        cache = make_cache(params)
        with torch_threads(1):
            cache.build(build_teachers(params), DistContext())
        return [entry.key for entry in cache.entries()], stored(cache)

    base_key, base_values = built("base", {})
    keyed = [name for name, changes in perturbations.items()
             if [entry.key for entry in make_cache(cache_args(tmp_path / "keys", **{**base, **changes})).entries()]
             != base_key]
    assert keyed  # the key is not blind
    free = {k: v for name, changes in perturbations.items() if name not in keyed for k, v in changes.items()}
    _, values = built("free", free)
    assert values.keys() == base_values.keys()
    for file, array in base_values.items():  # nothing outside the key changes a stored value
        np.testing.assert_array_equal(values[file], array, err_msg=file)
    for name in keyed:  # everything in the key does
        _, values = built(name, perturbations[name])
        assert values.keys() != base_values.keys() or any(
            values[f].shape != a.shape or not np.array_equal(values[f], a) for f, a in base_values.items()), name


def svd_cache_args(cache_dir, meta, **overrides):
    values = dict(teachers=list(CHEAP_TEACHERS), path_to_pretrained_weights=str(weights_dir()),
                  ckpt_dir=str(Path(cache_dir) / "run"), dataset_meta=str(meta), crop_size=SIZE,
                  teacher_cache=str(cache_dir), teacher_views=VIEWS, num_workers=0, no_progress=True, batch_size=2)
    params = SVDTrainParams(**{**values, **overrides})
    params.weight_sha256 = check_weight_files(params)
    return params


def make_svd_cache(params):
    data = build_svd_data(params, DistContext())
    return tc.TeacherCache(params, len(data.dataset), data.fingerprint, data.load_item, data.views)


def test_the_svd_cache_key_changes_exactly_when_the_stored_embeddings_change(tmp_path, perturbations):
    """The same for SVD frames (two view distributions): its own flags (-dm: where the frames are read, the crop size,
    the temperatures) and the shared ones."""
    import yaml

    from datasets.toy import make_toy_svd

    make_toy_svd(tmp_path / "svd", n_queries=1, n_train_queries=2, positives=1, negatives=1, n_unlabeled=1,
                 frames=(2, 3), size=40, seed=4)
    meta = tmp_path / "svd" / "svd.yaml"
    shutil.copytree(tmp_path / "svd" / "frames", tmp_path / "other_frames")
    for image in (tmp_path / "other_frames").rglob("*.jpg"):  # the same frames' names, other pixels
        with Image.open(image) as img:
            ImageOps.invert(img.convert("RGB")).save(image)
    other_meta = tmp_path / "other.yaml"
    config = yaml.safe_load(meta.read_text())
    other_meta.write_text(yaml.safe_dump({**config, "frame_root_path": str(tmp_path / "other_frames")}))
    shared = {k: v for k, v in perturbations.items() if k not in ("gld_root_path", "gld_csv", "imsize", "tt", "st")}
    svd_only = {"dataset_meta": {"dataset_meta": str(other_meta)}, "crop_size": {"crop_size": SIZE + 8},
                "t": {"t": 0.1}, "st": {"st": 0.1}, "tt": {"tt": 0.1}, "warmup_epochs": {"warmup_epochs": 1},
                "p": {"p": 3.0}}
    probes = {**shared, **svd_only}
    assert {field.name for field, _ in declared_fields(SVDTrainParams)} == set(probes)

    base = key_base()

    def built(name, changes):
        params = svd_cache_args(tmp_path / name, meta, **{**base, **changes})
        cache = make_svd_cache(params)
        with torch_threads(1):
            cache.build(build_teachers(params), DistContext())
        return stored(cache)

    def key(changes):
        params = svd_cache_args(tmp_path / "keys", meta, **{**base, **changes})
        return [entry.key for entry in make_svd_cache(params).entries()]

    base_key, base_values = key({}), built("base", {})
    keyed = [name for name, changes in probes.items() if key(changes) != base_key]
    assert "dataset_meta" in keyed and "crop_size" in keyed
    values = built("free", {k: v for name, changes in probes.items() if name not in keyed for k, v in changes.items()})
    assert values.keys() == base_values.keys()
    for file, array in base_values.items():
        np.testing.assert_array_equal(values[file], array, err_msg=file)
    for name in keyed:
        values = built(name, probes[name])
        assert values.keys() != base_values.keys() or any(
            values[f].shape != a.shape or not np.array_equal(values[f], a) for f, a in base_values.items()), name


# ------------------------------------------------------------------------------------ training from it
def gld_root():
    return toy_gld(n_landmarks=8, imgs_per_landmark=2, size=40, seed=7, n_singletons=0)


def distill(ckpt_dir, cache_dir, *extra):
    return ["gld_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", ckpt_dir, "--gld_root_path",
            gld_root(), "--path_to_pretrained_weights", weights_dir(), "--student_init", "random", "--imsize", SIZE,
            "-b", 2, "--epochs", 2, "--num_workers", 1, "--no_progress", "--log_every", 1, "--teacher_cache",
            cache_dir, "--teacher_views", VIEWS, *extra]


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """The first run names the cache, builds it and trains from it; 8 groups, 2 pairs, 4 iterations per epoch."""
    root = tmp_path_factory.mktemp("cached_run")
    res = run_main(*distill(root / "run", root / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "building 2 view(s) of 16 items" in res.stdout
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_during_the_cache_build_exits_75_and_the_same_command_continues(cached_run, tmp_path, sig):
    """Before, SIGTERM/SIGUSR1 during the build ended the job with 143/138 and no word, and the sbatch examples
    requeue only on 75."""
    ckpt = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, distill(ckpt, tmp_path / "cache"))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "building 2 view(s)" in line:
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    said = [line for line in (out + err).splitlines() if "signal" in line and str(tmp_path / "cache") in line]
    assert said, out[-2000:] + err[-2000:]  # the log names the stop and the cache it interrupted
    assert not (ckpt / "checkpoint_last.pt").exists()
    res = run_main(*distill(ckpt, tmp_path / "cache", "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(cached_run / "run" / "checkpoint_last.pt"), load_file(ckpt / "checkpoint_last.pt")
    for key, value in a["state_dict"].items():  # the same cache, the same training
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_corrupt_cache_file_is_one_line_naming_it_and_a_fix_the_script_takes(cached_run, tmp_path):
    """Before: a StoreError traceback that named shard-000000.npy when the .params.npy file was the bad one, and
    suggested --refresh_cache, which gld_distill.py does not take."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cached_run / "cache", cache)
    params = next(cache.rglob("shard-000000.params.npy"))
    params.write_bytes(params.read_bytes()[:40])  # torn
    res = run_main(*distill(tmp_path / "run", cache))
    line = assert_user_error(res, 1, params, f"delete {params.parent}")  # the torn file, and a fix this script takes
    assert "--refresh_cache" not in line  # a flag of the evaluation scripts only


@pytest.mark.slow
def test_training_from_the_cache_never_builds_or_calls_a_teacher(cached_run, tmp_path, monkeypatch):
    import gld_distill
    from engine import distill as engine_distill
    from models.distill_model import WhitenedTeachers
    from models.students import student_checkpoint_state

    def forbidden(*args, **kwargs):
        raise AssertionError("a teacher was used while training from the cache")

    monkeypatch.setattr(engine_distill, "build_teachers", forbidden)
    monkeypatch.setattr(WhitenedTeachers, "forward", forbidden)
    argv = distill(tmp_path / "again", cached_run / "cache", "--num_workers", 0)[1:]  # without the script
    trainer = gld_distill.main(list(map(str, argv)))
    assert trainer.criterion.teachers is None and trainer.iteration == 8
    first = load_file(cached_run / "run" / "checkpoint_last.pt")["state_dict"]
    again = student_checkpoint_state(trainer.student)
    assert again.keys() == first.keys()
    for key, value in first.items():  # the same views and embeddings: the run that built the cache, again
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_run_from_the_cache_stopped_mid_epoch_resumes_exactly(cached_run, tmp_path):
    ckpt = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, distill(ckpt, cached_run / "cache"))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = ckpt / "metrics.jsonl"
        while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count('"type": "iter"') >= 2):
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert load_file(ckpt / "checkpoint_last.pt")["epoch_iteration"] > 0
    res = run_main(*distill(ckpt, cached_run / "cache", "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no teacher runs" in res.stdout
    a, b = load_file(cached_run / "run" / "checkpoint_last.pt"), load_file(ckpt / "checkpoint_last.pt")
    assert a["iteration"] == b["iteration"] == 8
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
