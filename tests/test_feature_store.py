"""The feature store: a hit equals a fresh extraction bitwise; every key component makes a new entry; a killed
extraction resumes without recomputing its completed shards; entries written by 2 ranks read by 1; distractors
embedded once for two datasets; several SVD similarity functions from one extraction; a corrupt shard is one
clear error."""
import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_exit, assert_names, run_main, run_script, torch_threads, torchrun, weights_dir
from PIL import Image, ImageOps

import engine.features
import oxford_paris_eval
import svd_eval
import utils.features
from datasets.oxford_paris import RevisitedDataset
from datasets.svd.meta import SVDMeta
from datasets.toy import make_toy_revisitop, make_toy_svd
from engine.features import Extraction, PartExtractor, evaluated_model, model_key
from engine.image_retrieval import dataset_parts
from engine.params import ImageEvalParams, VideoEvalParams
from engine.video_retrieval import frames_key, video_part
from models.embedder import Embedder
from models.students import build_student, student_checkpoint_state
from utils.distributed import DistContext
from utils.feature_store import StoreEntry, StoreError
from utils.files import fingerprint
from utils.flags import declared_fields

SIZE = 40


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    make_toy_revisitop(root / "data", "roxford5k", n_queries=4, n_db=12, size=SIZE, seed=0, n_distractors=9)
    make_toy_revisitop(root / "data", "rparis6k", n_queries=3, n_db=10, size=SIZE, seed=1)
    torch.manual_seed(0)
    torch.save({"state_dict": student_checkpoint_state(build_student("resnet18"))}, root / "student.pt")
    return root


@pytest.fixture
def counted(monkeypatch):
    """Counts the images every embedding call receives (the model's work), and can fail after a number of them."""
    calls = {"images": 0, "fail_after": None}
    single = Embedder.single

    def counting(self, x):
        if calls["fail_after"] is not None and calls["images"] >= calls["fail_after"]:
            raise KeyboardInterrupt  # a kill, mid-extraction
        calls["images"] += x.shape[0]
        return single(self, x)

    monkeypatch.setattr(Embedder, "single", counting)
    return calls


def evaluate(toy, out, *extra):
    argv = ["-a", "resnet18", "-r", str(toy / "student.pt"), "-dp", str(toy / "data"), "--imsize", str(SIZE),
            "--num_workers", "0", "--no_progress", "--output_json", str(out), *map(str, extra)]
    oxford_paris_eval.main(argv)
    return json.loads(out.read_text())


def without_store_info(records):
    records = records if isinstance(records, list) else [records]
    return [{k: v for k, v in r.items() if k != "feature_store"} for r in records]


def test_a_hit_equals_a_fresh_extraction_and_reads_instead(toy, tmp_path, counted):
    fresh = evaluate(toy, tmp_path / "fresh.json", "--plus1m")
    n_images = 4 + 12 + 9
    assert counted["images"] == n_images
    first = evaluate(toy, tmp_path / "first.json", "--plus1m", "--feature_cache", tmp_path / "fc")
    assert counted["images"] == 2 * n_images and first["feature_store"]["read"] == []
    again = evaluate(toy, tmp_path / "again.json", "--plus1m", "--feature_cache", tmp_path / "fc")
    assert counted["images"] == 2 * n_images  # nothing embedded: every part read
    assert sorted(again["feature_store"]["read"]) == sorted(first["feature_store"]["extracted"])
    assert without_store_info(fresh) == without_store_info(first) == without_store_info(again)  # bitwise: == floats


def test_two_datasets_embed_the_distractors_once(toy, tmp_path, counted):
    records = evaluate(toy, tmp_path / "both.json", "-d", "roxford5k", "rparis6k", "--plus1m")
    assert counted["images"] == (4 + 12) + (3 + 10) + 9
    assert [r["dataset"] for r in records] == ["roxford5k", "rparis6k"]
    alone = evaluate(toy, tmp_path / "paris.json", "-d", "rparis6k", "--plus1m")
    assert without_store_info(records[1]) == without_store_info(alone)


def test_a_killed_extraction_resumes_from_its_shards(toy, tmp_path, counted, monkeypatch):
    monkeypatch.setattr(engine.features, "IMAGE_SHARD", 4)  # 3 database shards, 3 distractor shards
    reference = evaluate(toy, tmp_path / "ref.json", "--plus1m")
    counted["images"], counted["fail_after"] = 0, 4 + 12 + 5  # killed after 5 distractors: 1 shard of them done
    with pytest.raises(SystemExit) as exc:
        evaluate(toy, tmp_path / "killed.json", "--plus1m", "--feature_cache", tmp_path / "fc")
    assert exc.value.code == 130
    entries = sorted(p for p in (tmp_path / "fc").iterdir())
    assert sum((p / "manifest.json").is_file() for p in entries) == 2  # queries and database complete
    counted["images"], counted["fail_after"] = 0, None
    resumed = evaluate(toy, tmp_path / "resumed.json", "--plus1m", "--feature_cache", tmp_path / "fc")
    assert counted["images"] == 9 - 4  # only the distractor shards not yet written
    assert without_store_info(resumed) == without_store_info(reference)


def test_a_corrupt_shard_is_one_clear_error(toy, tmp_path, capsys):
    evaluate(toy, tmp_path / "a.json", "--feature_cache", tmp_path / "fc")
    shard = next((tmp_path / "fc").glob("*/shard-000000.npy"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SystemExit) as exc:
        evaluate(toy, tmp_path / "b.json", "--feature_cache", tmp_path / "fc")
    assert_exit(exc, 1, shard, "--refresh_cache")  # a data error naming the shard, and the flag that rebuilds it
    again = evaluate(toy, tmp_path / "c.json", "--feature_cache", tmp_path / "fc", "--refresh_cache")
    assert without_store_info(again) == without_store_info(json.loads((tmp_path / "a.json").read_text()))


def test_float16_halves_the_disk(toy, tmp_path):
    full = evaluate(toy, tmp_path / "32.json", "--plus1m", "--feature_cache", tmp_path / "fc32")
    half = evaluate(toy, tmp_path / "16.json", "--plus1m", "--feature_cache", tmp_path / "fc16",
                    "--cache_dtype", "float16")
    size = {d: sum(p.stat().st_size for p in (tmp_path / d).rglob("*.npy")) for d in ("fc32", "fc16")}
    assert size["fc16"] < 0.6 * size["fc32"]
    for mode in "EMH":
        assert half["map"][mode] == pytest.approx(full["map"][mode], abs=2.0)  # toy: 4 queries, a few % each


# ------------------------------------------------------------------------------------------------------- keys
def parts_keys_and_values(params, parts, store):
    """Per part: its store key and its descriptors as the store holds them (a fresh store, so they are made)."""
    embedder = evaluated_model(params)
    how = dataclasses.replace(Extraction.of(params), store=str(store))
    extractor = PartExtractor(embedder.multi if getattr(params, "multiscale", False) else embedder.single,
                              DistContext(), how, model_key(params))
    with torch.inference_mode(), torch_threads(1):
        return {name: (extractor.entry(part).key, extractor.gather(part)[0].cpu().numpy())
                for name, part in parts(params).items()}


def check_keys_follow_the_values(cls, bases, perturbations, parts, tmp_path):
    """For each base model and each flag: perturbing the flag changes a part's store key if and only if it changes
    that part's stored descriptors. Flags that leave every key alone are perturbed all at once for the values."""
    declared = {field.name for field, _ in declared_fields(cls)}
    probed = {name for per_base in perturbations.values() for name in per_base}
    assert probed == declared, f"flags without a perturbation: {sorted(declared - probed)}"  # new flags too
    runs = iter(range(10**6))

    def run(values):
        try:
            return parts_keys_and_values(cls(**values), parts, tmp_path / f"store{next(runs)}")
        except Exception as exc:  # say which perturbation
            raise AssertionError(f"{values}: {exc}") from exc

    for base_name, base in bases.items():
        reference = run(base)
        keyed = {}
        for name, changes in perturbations[base_name].items():
            params = cls(**{**base, **changes})
            how = dataclasses.replace(Extraction.of(params), store=str(tmp_path / "keys"))
            extractor = PartExtractor(lambda x: x, DistContext(), how, model_key(params))
            keys = {k: extractor.entry(part).key for k, part in parts(params).items()}
            changed = {k for k in reference if keys[k] != reference[k][0]}
            if changed:
                keyed[name] = changed
        assert keyed, base_name  # the key is not blind
        free = {k: v for name, changes in perturbations[base_name].items() if name not in keyed
                for k, v in changes.items()}
        values = run({**base, **free})
        for part, (_, array) in reference.items():  # nothing outside the key changes a stored descriptor
            assert same_descriptors(values[part][1], array), f"{base_name}: {part}"
        for name, parts_changed in keyed.items():  # a change of key is a change of descriptors, part by part
            if name in KEY_ONLY:
                assert parts_changed == set(reference), f"{base_name}: {name}"
                continue
            values = run({**base, **perturbations[base_name][name]})
            for part, (_, array) in reference.items():
                same = same_descriptors(values[part][1], array)
                assert same == (part not in parts_changed), f"{base_name}: {name} ({part})"


# --amp bf16 on this CPU (no AVX512-BF16: oneDNN emulates it) now and then gives NaN for a tiny odd-sized image
# (seen for a 40 x 27 query after other tests ran in the process; never at fp32): its descriptors are not compared
# here, only that it changes every part's key. That bf16 changes the stored values is shown by the teacher-cache key
# test, which builds with it.
KEY_ONLY = {"amp"}


def same_descriptors(a, b):
    """Equal up to the rounding of float32 sums (another batch size reorders a convolution's sums: ~1e-7 on these
    entries of L2-normalised rows), far below what any flag that matters changes (>= 1e-3)."""
    return a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-5)


def launch_perturbations(tmp_path):
    """The flags every evaluation shares, perturbed: launch, loader, output and store settings."""
    return {"world_size": {"world_size": 2}, "nproc_per_node": {"nproc_per_node": 2}, "rank": {"rank": 1},
            "dist_url": {"dist_url": "tcp://127.0.0.1:29400"}, "device": {"device": "cpu"}, "seed": {"seed": 7},
            "amp": {"amp": "bf16"}, "no_progress": {"no_progress": False},
            "trust_checkpoint": {"trust_checkpoint": True}, "num_workers": {"num_workers": 1},
            "output_json": {"output_json": str(tmp_path / "out.json")}, "p": {"p": 1.0},
            "tensorboard": {"tensorboard": str(tmp_path / "tb")},
            "feature_cache": {"feature_cache": str(tmp_path / "elsewhere")},
            "cache_dtype": {"cache_dtype": "float16"}, "refresh_cache": {"refresh_cache": True}}


TIMM_TEACHERS = ("mocov3", "timm:vit_tiny_patch16_224")  # the ViT: 192-d, normalised with mean and std 0.5


def timm_teacher(embed_dim=32):
    """A whitened timm teacher to evaluate (its own normalisation, its --teacher_pool, its file under timm/)."""
    return {"teacher": TIMM_TEACHERS[1], "pca": True, "embed_dim": embed_dim,
            "path_to_pretrained_weights": str(weights_dir(TIMM_TEACHERS, embed_dim))}


def timm_perturbations(p=1.0):
    """-p leaves a pre-logits embedding alone (the key must too); the pooling and the file's bytes change it."""
    return {"teacher_pool": {"teacher_pool": "gem"}, "p": {"p": p},
            "embed_dim": timm_teacher(embed_dim=16),
            "path_to_pretrained_weights": {"path_to_pretrained_weights": str(weights_dir(TIMM_TEACHERS, 32, seed=1))}}


def random_student(path, arch="resnet18", embed_dim=512, seed=0):
    torch.manual_seed(seed)
    torch.save({"state_dict": student_checkpoint_state(build_student(arch, embed_dim=embed_dim))}, path)
    return str(path)


def test_the_image_store_key_changes_exactly_when_the_descriptors_change(toy, tmp_path):
    other_images = tmp_path / "other"
    shutil.copytree(toy / "data", other_images)
    for image in other_images.rglob("*.jpg"):  # the same names, other pixels
        with Image.open(image) as img:
            ImageOps.invert(img.convert("RGB")).save(image)
    weights = tmp_path / "weights"
    shutil.copytree(weights_dir(), weights)
    common = {"data_path": str(toy / "data"), "num_workers": 0, "no_progress": True}
    bases = {"student": {**common, "arch": "resnet18", "resume": str(toy / "student.pt")},
             "teacher": {**common, "teacher": "mocov3", "pca": True, "path_to_pretrained_weights": str(weights)},
             "bare teacher": {**common, "teacher": "mocov3", "path_to_pretrained_weights": str(weights)},
             "timm teacher": {**common, **timm_teacher()}}
    data = {**launch_perturbations(tmp_path), "data_path": {"data_path": str(other_images)},
            "dataset": {"dataset": ["roxford5k", "rparis6k"]}, "imsize": {"imsize": SIZE - 8},
            "plus1m": {"plus1m": True}, "multiscale": {"multiscale": True}, "crop_queries": {"crop_queries": True},
            "visualize": {"visualize": str(tmp_path / "pictures")}, "visualize_top": {"visualize_top": 3}}
    perturbations = {
        "student": {**data, "arch": {"arch": "resnet34", "resume": random_student(tmp_path / "34.pt", "resnet34")},
                    "resume": {"resume": random_student(tmp_path / "18.pt", seed=1)},
                    "embed_dim": {"embed_dim": 256, "resume": random_student(tmp_path / "256.pt", embed_dim=256)}},
        "teacher": {**data, "teacher": {"teacher": "barlowtwins"}, "pca": {"pca": False},
                    "path_to_pretrained_weights": {"path_to_pretrained_weights": str(weights_dir())},
                    "embed_dim": {"embed_dim": 256, "path_to_pretrained_weights": str(weights_dir(embed_dim=256))}},
        "bare teacher": {"embed_dim": {"embed_dim": 256}, "p": {"p": 1.0}},  # no PCA: the dimension changes nothing
        "timm teacher": timm_perturbations(),
    }

    def parts(params):
        return dataset_parts(params, RevisitedDataset(params.data_path, "roxford5k"))

    check_keys_follow_the_values(ImageEvalParams, bases, perturbations, parts, tmp_path)


def test_the_video_store_key_changes_exactly_when_the_frame_features_change(tmp_path):
    svd = make_toy_svd(tmp_path / "svd", n_queries=2, n_train_queries=1, positives=1, negatives=1, n_unlabeled=2,
                       frames=(3, 4), size=SIZE, seed=3)
    yaml_copy = tmp_path / "copy.yaml"
    shutil.copy(tmp_path / "svd" / "svd.yaml", yaml_copy)
    base = {"arch": "resnet18", "resume": random_student(tmp_path / "s.pt"), "dataset_meta": str(yaml_copy),
            "num_workers": 0, "no_progress": True, "crop_size": 32}
    perturbations = {**launch_perturbations(tmp_path),
                     "arch": {"arch": "resnet34", "resume": random_student(tmp_path / "34.pt", "resnet34")},
                     "resume": {"resume": random_student(tmp_path / "18.pt", seed=1)},
                     "embed_dim": {"embed_dim": 256, "resume": random_student(tmp_path / "256.pt", embed_dim=256)},
                     "dataset_meta": {"dataset_meta": str(tmp_path / "svd" / "svd.yaml")},
                     "batch_size": {"batch_size": 1}, "max_frames": {"max_frames": 2}, "stride": {"stride": 2},
                     "input_norm": {"input_norm": "imagenet"}, "crop_size": {"crop_size": 24},
                     "sim_fn": {"sim_fn": ["cf", "fme"]}, "topk": {"topk": [1, 2]},
                     "subset_eval": {"subset_eval": True}, "max_elements": {"max_elements": 8}}
    weights = tmp_path / "weights"
    shutil.copytree(weights_dir(), weights)
    teacher = {**{k: v for k, v in base.items() if k not in ("arch", "resume")}, "teacher": "mocov3",
               "path_to_pretrained_weights": str(weights_dir())}
    teacher_perturbations = {"teacher": {"teacher": "barlowtwins"}, "pca": {"pca": True},
                             "path_to_pretrained_weights": {"path_to_pretrained_weights": str(weights)}}
    assert svd["ids"]  # a toy with queries and candidates

    def parts(params):
        meta = SVDMeta.from_yaml(params.dataset_meta)
        return {"queries": video_part(params, meta, "q", meta.test_query_ids, "test query"),
                "candidates": video_part(params, meta, "c", meta.test_labeled_ids + meta.unlabeled_ids,
                                         "test candidate")}

    timm = {**{k: v for k, v in teacher.items() if k != "path_to_pretrained_weights"}, **timm_teacher()}
    check_keys_follow_the_values(VideoEvalParams, {"student": base, "teacher": teacher, "timm teacher": timm},
                                 {"student": perturbations, "teacher": teacher_perturbations,
                                  "timm teacher": timm_perturbations(p=3.0)}, parts, tmp_path)


def test_frame_counts_and_the_frame_folder_enter_the_video_key():
    counts = fingerprint(frames_key([10, 20, 30], "frames"))
    assert fingerprint(frames_key([10, 20, 31], "frames")) != counts  # one video's frames changed
    assert fingerprint(frames_key([10, 20, 30], "other_frames")) != counts


def test_an_entry_is_never_read_under_another_key(tmp_path):
    entry = StoreEntry(tmp_path, {"model": "a"}, n_items=3, shard_items=2)
    entry.write_shard(0, np.ones((2, 4), np.float32))
    entry.write_shard(1, np.ones((1, 4), np.float32))
    entry.finish(4)
    assert entry.complete
    manifest = json.loads(entry.manifest_file.read_text())
    manifest["key"] = "0" * 64
    entry.manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as exc:
        assert entry.complete
    assert_names(exc.value, entry.folder, "0" * 16, entry.key[:16])  # the folder, the key found, the key wanted
    assert not StoreEntry(tmp_path, {"model": "b"}, n_items=3, shard_items=2).complete


# -------------------------------------------------------------------------------------------- processes, SVD
@pytest.mark.slow
def test_two_ranks_write_what_one_rank_reads(toy, tmp_path):
    common = ["oxford_paris_eval.py", "-a", "resnet18", "-r", toy / "student.pt", "-dp", toy / "data", "--imsize",
              SIZE, "--num_workers", 0, "--no_progress", "--plus1m", "-d", "roxford5k", "rparis6k"]
    two = run_script(*common, "--feature_cache", tmp_path / "fc", "--output_json", tmp_path / "two.json",
                     launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_main(*common, "--feature_cache", tmp_path / "fc", "--output_json", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr[-3000:]
    plain = run_main(*common, "--output_json", tmp_path / "plain.json")
    assert plain.returncode == 0, plain.stderr[-3000:]
    records = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one", "plain")}
    assert all(r["feature_store"]["extracted"] == [] for r in records["one"])  # all read
    strip = lambda rs: [{k: v for k, v in without_store_info(r)[0].items() if k != "protocol"} for r in rs]  # noqa
    assert strip(records["two"]) == strip(records["one"]) == strip(records["plain"])


@pytest.mark.slow
def test_several_similarity_functions_equal_separate_runs(tmp_path):
    make_toy_svd(tmp_path / "svd", n_queries=3, n_train_queries=1, positives=2, negatives=1, n_unlabeled=4,
                 frames=(2, 5), size=SIZE, seed=1)
    torch.manual_seed(0)
    torch.save({"state_dict": student_checkpoint_state(build_student("resnet18"))}, tmp_path / "student.pt")

    def run(out, *extra):
        svd_eval.main(["-a", "resnet18", "-r", str(tmp_path / "student.pt"), "-dm", str(tmp_path / "svd" / "svd.yaml"),
                       "--num_workers", "0", "--no_progress", "--crop_size", "32", "--topk", "1", "3",
                       "--output_json", str(out), *map(str, extra)])
        return json.loads(out.read_text())

    together = run(tmp_path / "all.json", "--sim_fn", "fme", "fmx", "sme", "smx", "cf", "--feature_cache",
                   tmp_path / "fc")
    assert [r["sim_fn"] for r in together] == ["fme", "fmx", "sme", "smx", "cf"]
    assert len(together[0]["feature_store"]["extracted"]) == 3  # queries, labeled, unlabeled: once for all five
    for record in together:
        alone = run(tmp_path / f"{record['sim_fn']}.json", "--sim_fn", record["sim_fn"])
        assert alone["map"] == record["map"], record["sim_fn"]


HEAP_PROBE = """
import ctypes, os
from utils.runtime import release_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
resident = lambda: int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
start, chunks, pins = resident(), [], []
for _ in range(4000):  # 240 MB below glibc's mmap threshold (on the heap), each under a small live block,
    chunks.append(libc.malloc(60_000))  # as the small tensors kept after forwards
    ctypes.memset(chunks[-1], 1, 60_000)
    pins.append(libc.malloc(64))
for chunk in chunks:
    libc.free(chunk)
before = resident()
release_freed_memory()
print(start, before, resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_extraction_gives_freed_heap_memory_back(monkeypatch):
    """Freed heap chunks under live ones stay resident until trimmed (the mechanism behind 20 GB of RSS in a
    3,000-image CPU extraction); ``release_freed_memory`` returns them (in a fresh process, whose heap holds
    nothing else), and the extraction loop calls it."""
    res = subprocess.run([sys.executable, "-c", HEAP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    start, before, after = map(int, res.stdout.split())
    assert before - start > 150e6 and before - after > 150e6, (start, before, after)

    calls = []
    monkeypatch.setattr(utils.features, "release_freed_memory", lambda: calls.append(1))
    loader = [(torch.zeros(1, 2), torch.tensor([i])) for i in range(2 * utils.features.TRIM_EVERY + 1)]
    assert len(list(utils.features.embedded_batches(lambda x: x, loader, DistContext(), show_progress=False))) == 129
    assert len(calls) == 2


def test_edited_query_boxes_are_not_answered_from_the_store(toy, tmp_path):
    """--crop_queries reads the boxes of the ground truth: after they change, the store must not answer with the
    old crops' descriptors (the key named the image list and flags, not the boxes)."""
    import pickle

    data = tmp_path / "data"  # a copy: the module's toy data stay as they are
    shutil.copytree(toy / "data", data)
    shutil.copy(toy / "student.pt", tmp_path / "student.pt")
    run = lambda out: evaluate(tmp_path, out, "--crop_queries", "--feature_cache", tmp_path / "fc")  # noqa: E731
    first = run(tmp_path / "first.json")
    gnd_path = data / "roxford5k" / "gnd_roxford5k.pkl"
    gnd = pickle.loads(gnd_path.read_bytes())
    for g in gnd["gnd"]:
        x1, y1, x2, y2 = (float(v) for v in g["bbx"])
        g["bbx"] = [x1, y1, x1 + (x2 - x1) / 2 + 1, y1 + (y2 - y1) / 2 + 1]  # a quarter of each box
    gnd_path.write_bytes(pickle.dumps(gnd))
    cached = run(tmp_path / "cached.json")
    fresh = evaluate(tmp_path, tmp_path / "fresh.json", "--crop_queries")
    assert without_store_info(cached) == without_store_info(fresh)
    assert cached["feature_store"]["extracted"] == ["roxford5k queries"]  # the database is still read back
    assert without_store_info(first) != without_store_info(fresh)  # the boxes did change the result


