"""SVD metadata parsing, bad metadata, and the frame datasets/sampler."""
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_names
from PIL import Image

from datasets.svd.data import (
    DistributedFrameSampler,
    FrameList,
    TrainFrames,
    VideoFrames,
    eval_frame_indices,
    sample_pca_frames,
    video_collate,
)
from datasets.svd.meta import USED_KEYS, SVDMeta, SVDMetaError

ROOT = Path(__file__).resolve().parent.parent


def _write_meta(tmp_path: Path, counts=None, train_gt=None) -> Path:
    files = {
        "query_id": "q1.mp4\nq2.mp4\n\n",
        "labeled_id": "a.mp4\nb.mp4\nc\n",
        "unlabeled_id": "u1.mp4\nu2.mp4\n",
        "train_groundtruth": train_gt or "t1.mp4 t2.mp4 1\nt1.mp4 t3.mp4 0\nt4.mp4 t2.mp4 1\nt3.mp4 t5.mp4 0\n",
        "test_groundtruth": "q2.mp4 b.mp4 1\nq1.mp4 a.mp4 1\nq2.mp4 a.mp4 0\nq1.mp4 c.mp4 1\n",
        "frame_count_file": counts or "".join(f"{v} 3\n" for v in
                                              ["q1", "q2", "a", "b", "c", "u1", "u2", "t1", "t2", "t3", "t4", "t5"]),
    }
    config = {}
    for key, text in files.items():
        (tmp_path / key).write_text(text)
        config[key] = str(tmp_path / key)
    config.update(frame_root_path=str(tmp_path / "frames"), all_video_id="/nowhere/all",
                  video_root_paths=["/nowhere/q"], feature_root_path="/nowhere/f", groundtruth="/nowhere/gt")
    (tmp_path / "frames").mkdir(exist_ok=True)
    path = tmp_path / "svd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_template_has_the_paper_keys():
    config = yaml.safe_load((ROOT / "config" / "svd.yaml").read_text())
    for key in (*USED_KEYS, "all_video_id", "groundtruth", "video_root_paths", "feature_root_path"):
        assert key in config
    assert len(config["video_root_paths"]) == 30  # query, labeled-0..1, unlabeled-0..26 (as the paper's file)


def test_parsing(tmp_path):
    meta = SVDMeta.from_yaml(_write_meta(tmp_path))
    assert meta.query_ids == ["q1", "q2"]  # .mp4 stripped, blank line ignored
    assert meta.labeled_ids == ["a", "b", "c"]
    assert meta.unlabeled_ids == ["u1", "u2"]
    # first-appearance orders of queries and candidates
    assert meta.test_query_ids == ["q2", "q1"]
    assert meta.test_labeled_ids == ["b", "a", "c"]
    assert meta.test_groundtruth == {"q2": {"b": 1, "a": 0}, "q1": {"a": 1, "c": 1}}
    assert meta.train_ids == ["t1", "t2", "t3", "t4", "t5"]
    assert meta.check_videos(["t1", "u2"], "training") == [3, 3]
    assert meta.frame_root == str(tmp_path / "frames")


def test_missing_file_names_key_and_path(tmp_path):
    path = _write_meta(tmp_path)
    (tmp_path / "test_groundtruth").unlink()
    meta = SVDMeta.from_yaml(path)
    with pytest.raises(SVDMetaError) as exc:
        _ = meta.test_query_ids
    assert_names(exc.value, "'test_groundtruth'", tmp_path / "test_groundtruth")  # the yaml key and its path
    config = yaml.safe_load(path.read_text())
    del config["unlabeled_id"]
    with pytest.raises(SVDMetaError) as exc:
        _ = SVDMeta(config).unlabeled_ids
    assert_names(exc.value, "'unlabeled_id'")
    with pytest.raises(SVDMetaError) as exc:
        SVDMeta.from_yaml(tmp_path / "missing.yaml")
    assert_names(exc.value, tmp_path / "missing.yaml", "--dataset_meta")  # the file, and the flag that names it


def test_unknown_video_and_zero_frames(tmp_path):
    meta = SVDMeta.from_yaml(_write_meta(tmp_path, counts="t1 4\nt2 0\nt3 2\nt4 1\n"))
    with pytest.raises(SVDMetaError) as exc:
        meta.check_videos(meta.train_ids, "training")
    assert_names(exc.value, tmp_path / "frame_count_file", "'t5'")  # the count file, and the video without a count
    with pytest.raises(SVDMetaError) as exc:
        meta.check_videos(["t1", "t2"], "training")
    assert_names(exc.value, tmp_path / "frame_count_file", "'t2'", "0 frames")


def test_malformed_lines(tmp_path):
    meta = SVDMeta.from_yaml(_write_meta(tmp_path, train_gt="t1 t2\n"))
    with pytest.raises(SVDMetaError) as exc:
        _ = meta.train_ids
    assert_names(exc.value, f"{tmp_path / 'train_groundtruth'}:1")  # file:line
    meta = SVDMeta.from_yaml(_write_meta(tmp_path, counts="t1 many\n"))
    with pytest.raises(SVDMetaError) as exc:
        _ = meta.frame_counts
    assert_names(exc.value, f"{tmp_path / 'frame_count_file'}:1")


def test_frame_sampler_one_frame_per_video_and_resume():
    counts = [3, 1, 5, 2, 4, 2, 6]
    offsets = [0, 3, 4, 9, 11, 15, 17]
    world = 2
    seen = Counter()
    for rank in range(world):
        sampler = DistributedFrameSampler(counts, batch_size=2, world_size=world, rank=rank)
        sampler.set_epoch(1)
        batches = list(sampler)
        # 7 videos -> 3 per rank (drop last): a batch of 2 + 1, the single leftover video joins the batch
        assert len(batches) == len(sampler) == 1 and len(batches[0]) == 3
        for idx in (i for b in batches for i in b):
            video = max(v for v, off in enumerate(offsets) if off <= idx)
            assert idx - offsets[video] < counts[video]
            seen[video] += 1
    assert sum(seen.values()) == 6 and max(seen.values()) == 1  # ranks get disjoint videos
    # resume: a fresh sampler loaded with the state after epoch 1 draws what the continuing one draws
    a = DistributedFrameSampler(counts, batch_size=3, seed=5)
    a.set_epoch(1)
    list(a)
    b = DistributedFrameSampler(counts, batch_size=3, seed=5)
    b.load_state_dict(a.state_dict())
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    # seed 0: the frame RNG of rank r is random.Random(r) (the paper's random.seed(rank))
    import random
    c = DistributedFrameSampler([10] * 4, batch_size=4, world_size=2, rank=1)
    rng = random.Random(1)
    assert [i % 10 for i in next(iter(c))] == [rng.randint(0, 9) for _ in range(2)]
    with pytest.raises(SVDMetaError) as exc:
        DistributedFrameSampler([3], batch_size=2, world_size=2, rank=0)
    assert_names(exc.value, "1 training", "2 process", "0 per process")  # the videos, the processes, the share
    with pytest.raises(SVDMetaError) as exc:
        DistributedFrameSampler([3, 3, 3], batch_size=2, world_size=2, rank=0)
    assert_names(exc.value, "3 training", "2 process", "1 per process")


def _frames(tmp_path, videos):
    for vid, n in videos.items():
        (tmp_path / vid).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 6), (i * 20, 0, 0)).save(tmp_path / vid / f"{i:04d}.jpg")


def test_frame_datasets(tmp_path):
    _frames(tmp_path, {"v1": 3, "v2": 7})
    train = TrainFrames(str(tmp_path), ["v1", "v2"], [3, 7])
    assert len(train) == 10 and train.locate(0) == ("v1", 0) and train.locate(3) == ("v2", 0)
    assert train.locate(9) == ("v2", 6)
    assert list(eval_frame_indices(7, max_frames=5, stride=2)) == [0, 2, 4]  # the first frames, not uniform
    videos = VideoFrames(str(tmp_path), ["v2", "v1"], [7, 3], transform=lambda im: torch.zeros(3, 2, 2),
                         max_frames=5, stride=2)
    assert len(videos) == 2
    frames, lens, idx = video_collate([videos[0], videos[1]])
    assert frames.shape == (5, 3, 2, 2) and lens.tolist() == [3, 2] and idx.tolist() == [0, 1]
    pca = sample_pca_frames(["v1", "v2"], [3, 7], per_video=4, seed=0)
    assert Counter(v for v, _ in pca) == {"v1": 3, "v2": 4} and len(set(pca)) == 7
    assert pca == sample_pca_frames(["v1", "v2"], [3, 7], per_video=4, seed=0)
    assert FrameList(str(tmp_path), pca)[2][1] == 2
    with pytest.raises(SVDMetaError) as exc:
        TrainFrames(str(tmp_path), ["v1"], [4])[3]
    assert_names(exc.value, tmp_path / "v1" / "0003.jpg", "not found")


def test_toy_svd_writer_is_consistent_and_deterministic(tmp_path):
    from datasets.toy import make_toy_svd

    info = make_toy_svd(tmp_path / "a", n_queries=2, n_train_queries=1, positives=2, negatives=1, n_unlabeled=3,
                        frames=(1, 3), size=24, seed=3)
    make_toy_svd(tmp_path / "b", n_queries=2, n_train_queries=1, positives=2, negatives=1, n_unlabeled=3,
                 frames=(1, 3), size=24, seed=3)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix == ".jpg":
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    meta = SVDMeta.from_yaml(tmp_path / "a" / "svd.yaml")
    assert meta.test_query_ids == info["ids"]["test_query"] and len(meta.test_query_ids) == 2
    assert len(meta.train_ids) == 1 + 3 and len(meta.unlabeled_ids) == 3
    assert all(sum(v > 0 for v in cands.values()) == 2 for cands in meta.test_groundtruth.values())
    assert (tmp_path / "a" / "metadata-release" / "query-id").read_text().splitlines()[0].endswith(".mp4")
    videos = meta.test_query_ids + meta.test_labeled_ids + meta.unlabeled_ids + meta.train_ids
    for vid, n in zip(videos, meta.check_videos(videos, "toy")):
        assert sorted(p.name for p in (tmp_path / "a" / "frames" / vid).iterdir()) == [f"{i:04d}.jpg" for i in range(n)]


def test_svd_transforms_follow_the_paper():
    import torchvision.transforms as T

    from datasets.transforms import (
        PILGaussianBlur,
        PILSolarize,
        svd_distill_transform,
        svd_pca_transform,
        svd_test_transform,
    )

    def probs(compose):
        out = {}
        for t in compose.transforms:
            if isinstance(t, T.RandomApply):
                out[type(t.transforms[0]).__name__] = t.p
        return out

    two = svd_distill_transform()
    assert probs(two.view1) == {"ColorJitter": 0.8, PILGaussianBlur.__name__: 1.0}
    assert probs(two.view2) == {"ColorJitter": 0.8, PILGaussianBlur.__name__: 0.1, PILSolarize.__name__: 0.2}
    assert probs(svd_pca_transform()) == {"ColorJitter": 0.8, PILGaussianBlur.__name__: 0.5,
                                          PILSolarize.__name__: 0.2}
    img = Image.new("RGB", (300, 260), (255, 128, 0))
    x1, x2 = two(img)
    assert x1.shape == x2.shape == (3, 224, 224)
    plain = svd_test_transform()(img)  # no Normalize by default (the paper's evaluation, B15)
    assert plain.shape == (3, 224, 224) and float(plain.max()) <= 1.0 and float(plain.min()) >= 0.0
    normed = svd_test_transform("imagenet")(img)
    torch.testing.assert_close(normed[0], (plain[0] - 0.485) / 0.229)
    with pytest.raises(ValueError, match="input_norm"):
        svd_test_transform("bgr")
