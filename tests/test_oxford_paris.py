"""Revisited Oxford/Paris: revisitop metric, rank-free evaluation, safe ground truth, image loading."""
import math
import pickle

import numpy as np
import pytest
import torch
from helpers import assert_names, naive_map
from PIL import Image

from datasets.oxford_paris import (
    DatasetError,
    GroundTruthError,
    RevisitedDataset,
    distractor_images,
    load_ground_truth,
    revisited_ground_truth,
)
from datasets.revisitop import compute_map, evaluate_scores, item_positions, similarity, top_k
from datasets.toy import make_toy_revisitop


def random_gnd(rng, n_db, nq, empty_every=4):
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n_db)
        n_ok = 0 if q % empty_every == 0 else int(rng.integers(1, 6))
        n_junk = int(rng.integers(0, 5))
        gnd.append({"ok": perm[:n_ok], "junk": perm[n_ok:n_ok + n_junk]})
    return gnd


def test_compute_map_matches_naive_protocol():
    rng = np.random.default_rng(0)
    n_db, nq, kappas = 40, 12, (1, 5, 10)
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    gnd = random_gnd(rng, n_db, nq)
    # a query whose junk items lead the ranking, ahead of every positive
    ranks[:, 1] = np.arange(n_db)
    gnd[1] = {"ok": np.array([5, 9, 30]), "junk": np.array([0, 1, 2, 6])}
    got = compute_map(ranks, gnd, kappas)
    want = naive_map(ranks, gnd, kappas)
    assert got[0] == pytest.approx(want[0], abs=1e-12)
    np.testing.assert_allclose(got[1], want[1], atol=1e-12)  # NaN where no positives, in the same places
    np.testing.assert_allclose(got[2], want[2], atol=1e-12)
    np.testing.assert_allclose(got[3], want[3], atol=1e-12)
    assert np.isnan(got[1][0]) and not np.isnan(got[1][1])


def test_compute_map_closed_form():
    # positives at ranks 0 and 2 of 2: AP = ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2
    ranks = np.array([[3], [0], [1], [2]])
    gnd = [{"ok": [3, 1], "junk": []}]
    m, aps, pr, _ = compute_map(ranks, gnd, (1, 5))
    assert m == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    assert pr.tolist() == pytest.approx([1.0, 2 / 3])  # k=5: kq = min(3, 5) = 3 and 2 positives in the top 3
    # a junk item at rank 1 moves the second positive up to rank 1: AP = (1 + (1/1 + 2/2)/2) / 2 = 1
    m, _, _, _ = compute_map(ranks, [{"ok": [3, 1], "junk": [0]}], ())
    assert m == pytest.approx(1.0)


def ranks_from_scores(scores):
    """The full-sort ranking (db x queries) the evaluation must equal: ties keep the lower database index first."""
    return torch.argsort(-scores, dim=0, stable=True)


def test_item_positions_equal_full_sort_including_ties():
    rng = np.random.default_rng(1)
    for trial in range(30):
        n_db, nq = int(rng.integers(5, 50)), int(rng.integers(1, 6))
        if trial % 2:  # few distinct values: many ties
            scores = torch.tensor(rng.integers(0, 4, size=(n_db, nq)).astype(np.float32))
        else:
            scores = torch.tensor(rng.standard_normal((n_db, nq)).astype(np.float32))
        ranks = ranks_from_scores(scores).numpy()
        chunk = int(rng.integers(1, n_db + 2))
        items = [rng.choice(n_db, size=int(rng.integers(0, n_db + 1)), replace=False) for _ in range(nq)]
        for q, pos in enumerate(item_positions(scores, items, chunk_size=chunk)):
            assert np.array_equal(pos, np.argsort(ranks[:, q])[items[q]])


def test_evaluate_scores_identical_to_full_sort_path():
    rng = np.random.default_rng(2)
    n_db, nq = 60, 9
    for scores in (torch.tensor(rng.standard_normal((n_db, nq)).astype(np.float32)),
                   torch.tensor(rng.integers(0, 3, size=(n_db, nq)).astype(np.float32))):
        gnd = []
        for _ in range(nq):
            perm = rng.permutation(n_db)
            e, h, j = (int(v) for v in rng.integers(0, 5, size=3))
            gnd.append({"easy": perm[:e].tolist(), "hard": perm[e:e + h].tolist(), "junk": perm[e + h:e + h + j]})
        result = evaluate_scores(scores, gnd, "toy", chunk_size=7)
        ranks = ranks_from_scores(scores).numpy()
        for mode in "EMH":
            m, aps, pr, _ = compute_map(ranks, revisited_ground_truth(gnd, mode), (1, 5, 10))
            assert (math.isnan(m) and math.isnan(result.map[mode])) or m == result.map[mode]
            np.testing.assert_array_equal(aps, result.aps[mode])
            np.testing.assert_array_equal(pr, result.mpr[mode])
            # compute_map shares map_from_positions with the evaluation: the naive walk is the independent check
            want = naive_map(ranks, revisited_ground_truth(gnd, mode), (1, 5, 10))
            np.testing.assert_allclose(result.aps[mode], want[1], atol=1e-12)
            np.testing.assert_allclose(result.mpr[mode], want[2], atol=1e-12)


def test_revisited_ground_truth_modes():
    gnd = [{"easy": [1, 2], "hard": [3], "junk": [4]}]
    sets = {m: revisited_ground_truth(gnd, m)[0] for m in "EMH"}
    assert sorted(sets["E"]["ok"]) == [1, 2] and sorted(sets["E"]["junk"]) == [3, 4]
    assert sorted(sets["M"]["ok"]) == [1, 2, 3] and sorted(sets["M"]["junk"]) == [4]
    assert sorted(sets["H"]["ok"]) == [3] and sorted(sets["H"]["junk"]) == [1, 2, 4]
    with pytest.raises(ValueError) as exc:
        revisited_ground_truth(gnd, "X")
    assert_names(exc.value, "'X'", "'E'", "'M'", "'H'")  # the mode given, and the valid ones


def test_top_k_follows_full_sort_with_ties():
    scores = torch.tensor([[0.5, 1.0], [0.9, 1.0], [0.5, 0.2], [0.9, 1.0], [0.1, 0.3]])
    ranks = ranks_from_scores(scores)
    assert torch.equal(top_k(scores, 3), ranks[:3].T)
    s = similarity(torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0]]))
    assert s.flatten().tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])


# --- ground truth files ------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_accepts_gnd_and_refuses_code(tmp_path):
    good = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
            "gnd": [{"bbx": np.array([1.5, 2.0, 10.0, 12.5]), "easy": np.array([0], dtype=np.int64),
                     "hard": [np.int64(1)], "junk": [2]}]}
    for protocol in (2, 4, 5):
        path = tmp_path / f"gnd_{protocol}.pkl"
        path.write_bytes(pickle.dumps(good, protocol=protocol))
        cfg = load_ground_truth(path)
        assert cfg["imlist"] == ["a", "b", "c"]
        np.testing.assert_array_equal(cfg["gnd"][0]["bbx"], good["gnd"][0]["bbx"])
        assert int(cfg["gnd"][0]["hard"][0]) == 1

    marker = tmp_path / "pwned"
    evil = tmp_path / "gnd_evil.pkl"
    evil.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": _Exploit(marker)}))
    with pytest.raises(GroundTruthError) as err:
        load_ground_truth(evil)
    assert str(evil) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


def test_ground_truth_errors(tmp_path):
    with pytest.raises(GroundTruthError) as exc:
        RevisitedDataset(tmp_path, "roxford5k")
    assert_names(exc.value, tmp_path, "gnd_roxford5k.pkl", "not found")
    bad = tmp_path / "gnd_bad.pkl"
    bad.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(GroundTruthError) as exc:
        load_ground_truth(bad)
    assert_names(exc.value, bad, "gnd[0]['easy']")  # the file and the entry holding the bad index
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(GroundTruthError) as exc:
        load_ground_truth(bad)
    assert_names(exc.value, bad, "corrupt")


# --- images ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisitop")
    make_toy_revisitop(root, "roxford5k", n_queries=4, n_db=12, size=64, seed=3, n_distractors=5)
    return root


def test_query_cropping_changes_only_queries(toy_root):
    ds = RevisitedDataset(toy_root, "roxford5k")
    for imsize in (None, 48):
        plain, cropped = ds.queries(imsize=imsize), ds.queries(imsize=imsize, crop=True)
        for q in range(ds.n_queries):
            full = Image.open(ds.queries().paths[q])
            x1, y1, x2, y2 = ds.gnd[q]["bbx"]
            crop_size = (round(x2) - round(x1), round(y2) - round(y1))
            img = cropped.load(q)
            if imsize is None:
                assert img.size == crop_size
                assert np.array_equal(np.asarray(img), np.asarray(full.convert("RGB").crop((x1, y1, x2, y2))))
            else:  # cirtorch: the crop's long side is bounded by imsize * max(crop) / max(full)
                assert max(img.size) == min(max(crop_size), math.floor(imsize * max(crop_size) / max(full.size)))
                assert max(plain.load(q).size) == min(imsize, max(full.size))
        for i in range(ds.n_database):
            assert np.array_equal(np.asarray(ds.database(imsize=imsize).load(i)),
                                  np.asarray(ds.database(imsize=imsize).load(i)))
    # thumbnail only shrinks, LANCZOS
    big = ds.database(imsize=1000).load(0)
    assert big.size == Image.open(ds.database().paths[0]).size
    small = ds.database(imsize=20).load(0)
    ref = Image.open(ds.database().paths[0]).convert("RGB")
    ref.thumbnail((20, 20), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(small), np.asarray(ref))


def test_image_errors_name_the_file(toy_root, tmp_path):
    ds = RevisitedDataset(toy_root, "roxford5k")
    images = ds.database()
    images.paths[0] = tmp_path / "gone.jpg"
    with pytest.raises(DatasetError) as exc:
        images[0]
    assert_names(exc.value, tmp_path / "gone.jpg", "not found", "roxford5k")  # the file, and the dataset it is from
    assert images.missing() == [tmp_path / "gone.jpg"]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 definitely not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(images.paths[1].read_bytes()[:300])
    for path in (corrupt, truncated):
        images.paths[2] = path
        with pytest.raises(DatasetError) as exc:
            images[2]
        assert_names(exc.value, path, "corrupt")


def test_distractors(toy_root, tmp_path):
    d = distractor_images(toy_root)
    assert len(d) == 5 and all(p.suffix == ".jpg" and p.is_file() for p in d.paths)
    img, index = d[4]
    assert index == 4 and img.mode == "RGB"
    with pytest.raises(DatasetError, match="revisitop1m.txt"):
        distractor_images(tmp_path)
