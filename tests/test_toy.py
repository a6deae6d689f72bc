"""Toy datasets: exact on-disk formats, determinism for a seed, and meaningful labels."""
import csv
import hashlib
import pickle
import re

import numpy as np
from PIL import Image

from datasets.oxford_paris import RevisitedDataset, distractor_images
from datasets.toy import make_toy_gld, make_toy_revisitop, render_scene, render_view
from tools.make_toy_data import main as make_toy_main


def tree_digest(root):
    """Relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_toy_main(["--out", str(tmp_path / name), "--parts", "gld", "revisitop", "--seed", str(seed),
                       "--size", "40", "--gld_landmarks", "3",
                       "--gld_images", "2", "--queries", "2", "--database", "10", "--distractors", "3"])
        digests.append(tree_digest(tmp_path / name))
    assert digests[0] == digests[1]
    assert len(digests[0]) == 3 * 2 + 2 + 2 * (2 + 10 + 1) + 3 + 1  # gld imgs + meta, 2 x (q + db + gnd), r1m
    assert set(digests[0].values()).isdisjoint(set(digests[2].values()))


def test_gld_format(tmp_path):
    groups = make_toy_gld(tmp_path, n_landmarks=4, imgs_per_landmark=3, size=48, seed=5, n_singletons=2)
    with open(tmp_path / "meta" / "train_clean.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["landmark_id"]) for r in rows] == sorted(groups)
    parsed = {int(r["landmark_id"]): r["images"].split(" ") for r in rows}
    assert parsed == groups
    assert sorted(len(v) for v in parsed.values()) == [1, 1, 3, 3, 3, 3]
    ids = (tmp_path / "meta" / "train_clean_ids.txt").read_text().splitlines()
    assert ids == [i for lid in sorted(groups) for i in groups[lid]] and len(set(ids)) == len(ids)
    for image_id in ids:
        assert re.fullmatch(r"[0-9a-f]{16}", image_id)
        img = Image.open(tmp_path / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
        assert img.format == "JPEG" and max(img.size) == 48


def test_revisitop_format_and_labels(tmp_path):
    cfg = make_toy_revisitop(tmp_path, "rparis6k", n_queries=6, n_db=20, size=48, seed=2, n_distractors=4)
    with open(tmp_path / "rparis6k" / "gnd_rparis6k.pkl", "rb") as f:
        assert pickle.load(f) == cfg
    ds = RevisitedDataset(tmp_path, "rparis6k")  # the restricted loader accepts what the writer wrote
    assert ds.n_database == 20 and ds.n_queries == 6
    assert not ds.database().missing() and not ds.queries().missing()
    assert not set(ds.qimlist) & set(ds.imlist)
    for g, name in zip(ds.gnd, ds.qimlist):
        easy, hard, junk = (set(g[k]) for k in ("easy", "hard", "junk"))
        assert not (easy & hard or easy & junk or hard & junk)
        assert hard and junk
        w, h = Image.open(tmp_path / "rparis6k" / "jpg" / f"{name}.jpg").size
        x1, y1, x2, y2 = g["bbx"]
        assert all(isinstance(v, float) for v in g["bbx"]) and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert any(not g["easy"] for g in ds.gnd) and any(g["easy"] for g in ds.gnd)
    labelled = set().union(*(set(g["easy"]) | set(g["hard"]) | set(g["junk"]) for g in ds.gnd))
    assert len(labelled) < ds.n_database  # negatives exist
    lines = (tmp_path / "revisitop1m" / "revisitop1m.txt").read_text().splitlines()
    assert len(lines) == 4 and all(line.endswith(".jpg") for line in lines)
    assert len(distractor_images(tmp_path)) == 4


def test_views_of_a_scene_resemble_it_more_than_other_scenes():
    """Retrieval on the toy sets is meaningful: a clear view is closer (pixel colour histogram) to another view
    of its scene than to views of other scenes."""
    rng = np.random.default_rng(0)
    scenes = [render_scene(rng, 96) for _ in range(4)]

    def hist(img):
        a = np.asarray(img.resize((32, 32))).reshape(-1, 3) // 64
        h = np.bincount(a[:, 0] * 16 + a[:, 1] * 4 + a[:, 2], minlength=64).astype(float)
        return h / np.linalg.norm(h)

    views = [[hist(render_view(s, rng, (48, 36), "easy")) for _ in range(2)] for s in scenes]
    for i in range(4):
        same = views[i][0] @ views[i][1]
        assert all(same > views[i][0] @ views[j][1] for j in range(4) if j != i)
