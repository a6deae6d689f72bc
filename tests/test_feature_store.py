"""The feature store: a hit equals a fresh extraction bitwise; every key component makes a new entry; a killed
extraction resumes without recomputing its completed shards; entries written by 2 ranks read by 1; distractors
embedded once for two datasets; several SVD similarity functions from one extraction; a corrupt shard is one
clear error."""
import argparse
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, torch_threads, torchrun, weights_dir

import engine.features
import oxford_paris_eval
import svd_eval
import utils.features
from datasets.oxford_paris import ImageList
from datasets.toy import make_toy_revisitop, make_toy_svd
from engine.features import Part, PartExtractor, model_components
from engine.image_retrieval import image_protocol
from models.embedder import Embedder
from models.students import build_student, student_checkpoint_state
from utils.distributed import DistContext
from utils.feature_store import StoreEntry, StoreError
from utils.files import fingerprint

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
    assert f"feature store shard {shard} is missing, truncated or corrupt" in str(exc.value.code)
    assert "--refresh_cache" in str(exc.value.code)
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
def key_args(toy, **overrides):
    args = dict(arch="resnet18", resume=str(toy / "student.pt"), teacher=None, pca=False, embed_dim=512, p=3.0,
                imsize=SIZE, multiscale=False, amp="none", path_to_pretrained_weights=None, feature_cache="fc",
                cache_dtype="float32", crop_queries=False)
    args.update(overrides)
    return argparse.Namespace(**args)


def keys(args, names=("a", "b", "c")):
    extractor = PartExtractor(lambda x: x, DistContext(), args, model_components(args))
    part = lambda crop: Part("p", ImageList([]), list(names), image_protocol(args, crop))  # noqa: E731
    return extractor.entry(part(False)).key, extractor.entry(part(args.crop_queries)).key


def test_every_key_component_makes_another_entry(toy, tmp_path):
    base_db, base_q = keys(key_args(toy))
    assert keys(key_args(toy)) == (base_db, base_q)  # deterministic
    other_file = tmp_path / "other.pt"
    shutil.copy(toy / "student.pt", other_file)
    with open(other_file, "ab") as f:
        f.write(b"\0")  # other bytes, same name and flags
    variants = {"model file bytes": key_args(toy, resume=str(other_file)), "-p": key_args(toy, p=1.0),
                "--embed_dim": key_args(toy, embed_dim=256), "--imsize": key_args(toy, imsize=64),
                "-ms": key_args(toy, multiscale=True), "--amp": key_args(toy, amp="bf16"),
                "-a": key_args(toy, arch="resnet34"), "--cache_dtype": key_args(toy, cache_dtype="float16")}
    for what, args in variants.items():
        db, q = keys(args)
        assert db != base_db and q != base_q, what
    assert keys(key_args(toy), names=("a", "c", "b"))[0] != base_db  # the item list's order
    db, q = keys(key_args(toy, crop_queries=True))
    assert db == base_db and q != base_q  # --crop_queries changes the queries only


def test_teacher_keys_cover_the_teacher_and_pca_files(tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(weights_dir(), weights)
    args = argparse.Namespace(arch=None, resume=None, teacher="mocov3", pca=True, embed_dim=512, p=1.0,
                              path_to_pretrained_weights=str(weights))
    before = model_components(args)
    pca = next((weights / "pca_weights").glob("mocov3_*"))
    pca.write_bytes(pca.read_bytes() + b"\0")
    assert model_components(args)["pca_sha256"] != before["pca_sha256"]
    assert model_components(args)["file_sha256"] == before["file_sha256"]
    teacher_file = weights / "mocov3_1000ep.pth.tar"
    teacher_file.write_bytes(teacher_file.read_bytes() + b"\0")
    assert model_components(args)["file_sha256"] != before["file_sha256"]
    without_pca = model_components(argparse.Namespace(**{**vars(args), "pca": False}))
    other_teacher = model_components(argparse.Namespace(**{**vars(args), "teacher": "barlowtwins"}))
    assert len({fingerprint(c) for c in (model_components(args), without_pca, other_teacher)}) == 3


def test_every_svd_protocol_flag_changes_the_key():
    from engine.video_retrieval import video_protocol

    base = dict(max_frames=60, stride=1, crop_size=224, input_norm="none", amp="none")
    variants = {"--max_frames": {"max_frames": 30}, "--stride": {"stride": 2}, "--crop_size": {"crop_size": 112},
                "--input_norm": {"input_norm": "imagenet"}, "--amp": {"amp": "bf16"}}
    reference = fingerprint(video_protocol(argparse.Namespace(**base)))
    for what, change in variants.items():
        assert fingerprint(video_protocol(argparse.Namespace(**{**base, **change}))) != reference, what


def test_an_entry_is_never_read_under_another_key(tmp_path):
    entry = StoreEntry(tmp_path, {"model": "a"}, n_items=3, shard_items=2)
    entry.write_shard(0, np.ones((2, 4), np.float32))
    entry.write_shard(1, np.ones((1, 4), np.float32))
    entry.finish(4)
    assert entry.complete
    manifest = json.loads(entry.manifest_file.read_text())
    manifest["key"] = "0" * 64
    entry.manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="holds another entry"):
        assert entry.complete
    assert not StoreEntry(tmp_path, {"model": "b"}, n_items=3, shard_items=2).complete


# -------------------------------------------------------------------------------------------- processes, SVD
@pytest.mark.slow
def test_two_ranks_write_what_one_rank_reads(toy, tmp_path):
    common = ["oxford_paris_eval.py", "-a", "resnet18", "-r", toy / "student.pt", "-dp", toy / "data", "--imsize",
              SIZE, "--num_workers", 0, "--no_progress", "--plus1m", "-d", "roxford5k", "rparis6k"]
    two = run_script(*common, "--feature_cache", tmp_path / "fc", "--output_json", tmp_path / "two.json",
                     launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_script(*common, "--feature_cache", tmp_path / "fc", "--output_json", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr[-3000:]
    plain = run_script(*common, "--output_json", tmp_path / "plain.json")
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


def test_another_data_root_or_other_frame_counts_make_another_key(toy, tmp_path):
    from engine.video_retrieval import video_protocol

    args = key_args(toy, data_path=str(toy / "data"))
    base = keys(args)
    shutil.copytree(toy / "data", tmp_path / "data")
    moved = keys(key_args(toy, data_path=str(tmp_path / "data")))
    assert moved[0] != base[0] and moved[1] != base[1]
    flags = argparse.Namespace(max_frames=60, stride=1, crop_size=224, input_norm="none", amp="none")
    counts = fingerprint(video_protocol(flags, [10, 20, 30], "frames"))
    assert fingerprint(video_protocol(flags, [10, 20, 31], "frames")) != counts  # one video's frames changed
    assert fingerprint(video_protocol(flags, [10, 20, 30], "other_frames")) != counts
