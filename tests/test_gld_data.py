"""GLDv2 reading, the paper's distributed group sampler and the shared transforms."""
import math
import random
import re
import shutil

import pytest
import torch
from helpers import assert_names

from datasets.gld import (
    DistributedGroupSampler,
    GLDDataError,
    GLDImageDataset,
    GLDPairDataset,
    image_path,
    pair_collate,
    read_groups,
    read_image_ids,
)
from datasets.toy import make_toy_gld
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, gld_train_transform
from utils.checkpoint import load_file, save_atomic


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("gld")
    groups = make_toy_gld(root, n_landmarks=6, imgs_per_landmark=3, size=32, seed=3, n_singletons=2)
    return root, groups


def test_groups_ids_and_layout(toy):
    root, groups = toy
    # naive reading of the CSV: every row's space-separated ids, keeping rows with >= 2 images
    lines = (root / "meta/train_clean.csv").read_text().splitlines()
    assert lines[0] == "landmark_id,images"
    expected = [row.split(",", 1)[1].split(" ") for row in lines[1:]]
    expected = [g for g in expected if len(g) >= 2]
    assert read_groups(root) == expected
    assert len(expected) == 6 and sorted(map(tuple, expected)) == sorted(tuple(g) for g in groups.values()
                                                                        if len(g) >= 2)
    all_ids = [i for g in groups.values() for i in g]
    assert sorted(read_image_ids(root)) == sorted(all_ids)
    some = expected[0][0]
    assert image_path(root, some) == root / "train" / some[0] / some[1] / some[2] / f"{some}.jpg"
    assert image_path(root, some).is_file()


def test_pair_dataset_indexing_and_collate(toy):
    root, _ = toy
    ds = GLDPairDataset(root, gld_train_transform(24))
    groups = read_groups(root)
    assert len(ds) == sum(len(g) for g in groups)  # a real __len__ (B21)
    for group_ids, group_idx in zip(groups, ds.groups):
        assert [ds.image_ids[i] for i in group_idx] == group_ids
    x = ds[5]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    x1, x2 = pair_collate([torch.full((3, 2, 2), float(i)) for i in range(6)])
    assert x1[:, 0, 0, 0].tolist() == [0, 1, 2] and x2[:, 0, 0, 0].tolist() == [3, 4, 5]


def test_image_dataset_returns_index_and_normalised_tensor(toy):
    root, _ = toy
    ids = read_image_ids(root)[:4]
    ds = GLDImageDataset(root, ids, gld_train_transform(16))
    assert len(ds) == 4
    img, idx = ds[2]
    assert idx == 2 and img.shape == (3, 16, 16)
    # the transform ends with ImageNet normalisation: undoing it lands in [0, 1]
    raw = img * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def _reference_batches(groups, batch_size, world, rank, epoch, seed, rng):
    """The paper's sampler written out naively: groups permuted with seed + epoch, truncated to a multiple of the
    world size, dealt out rank::world, batches of b groups, two images of each drawn with random.Random(rank)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(len(groups), generator=g).tolist()
    if len(groups) % world != 0:
        per_rank = math.ceil((len(groups) - world) / world)
    else:
        per_rank = len(groups) // world
    mine = [perm[i] for i in range(rank, per_rank * world, world)]
    chosen = []
    for start in range(0, len(mine), batch_size):
        chosen.append([rng.sample(groups[i], 2) for i in mine[start:start + batch_size]])
    # this project's one deviation: a last batch of a single pair joins the one before (the paper crashes there)
    if len(chosen) > 1 and len(chosen[-1]) == 1:
        chosen[-2:] = [chosen[-2] + chosen[-1]]
    return [[c[0] for c in batch] + [c[1] for c in batch] for batch in chosen]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_matches_paper_and_partitions_groups(world):
    sizes = [2, 5, 3, 2, 4, 6, 2, 3, 2, 7, 3]  # 11 groups: not a multiple of 2 or 3
    groups, start = [], 0
    for n in sizes:
        groups.append(list(range(start, start + n)))
        start += n
    group_of = {i: gi for gi, g in enumerate(groups) for i in g}
    b = 2
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            sampler = DistributedGroupSampler(groups, b, world, rank, seed=0)
            ref_rng = random.Random()
            ref_rng.seed(rank)  # the paper: random.seed(rank)
            for e in range(epoch + 1):  # the pair RNG carries over epochs
                sampler.set_epoch(e)
                batches = list(sampler)
                ref = _reference_batches(groups, b, world, rank, e, 0, ref_rng)
            assert batches == ref
            per_rank = len(groups) // world
            assert len(sampler) == len(batches) == per_rank // b  # 5, 2 and 1 groups per rank: odd tails merged
            assert len(batches[-1]) == 2 * (b + 1)
            for batch in batches:
                half = len(batch) // 2
                firsts, seconds = batch[:half], batch[half:]
                for a, c in zip(firsts, seconds):
                    assert a != c and group_of[a] == group_of[c]  # two different images of one landmark
                seen.extend(group_of[a] for a in firsts)
        assert len(seen) == len(set(seen)) == (len(groups) // world) * world  # disjoint ranks, tail dropped


def test_sampler_epochs_differ_and_seed_changes_order():
    groups = [[2 * i, 2 * i + 1] for i in range(20)]
    s = DistributedGroupSampler(groups, 4)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0
    other = DistributedGroupSampler(groups, 4, seed=5)
    assert list(other) != e0


def test_sampler_state_roundtrip_resumes_identically(tmp_path):
    groups = [list(range(5 * i, 5 * i + 5)) for i in range(9)]
    a = DistributedGroupSampler(groups, 2, world_size=2, rank=1, seed=7)
    a.set_epoch(0)
    list(a)
    save_atomic(a.state_dict(), tmp_path / "s.pt")
    a.set_epoch(1)
    expected = list(a)
    b = DistributedGroupSampler(groups, 2, world_size=2, rank=1, seed=7)
    b.load_state_dict(load_file(tmp_path / "s.pt"))  # plain types: loads with weights_only
    b.set_epoch(1)
    assert list(b) == expected
    with pytest.raises(ValueError, match="world size"):
        DistributedGroupSampler(groups, 2, world_size=3, rank=0, seed=7).load_state_dict(a.state_dict())


def test_sampler_rejects_bad_groups():
    with pytest.raises(ValueError, match="fewer than 2"):
        DistributedGroupSampler([[0, 1], [2]], 2)
    with pytest.raises(GLDDataError) as exc:
        DistributedGroupSampler([[0, 1], [2, 3]], 2, world_size=3, rank=0)
    assert_names(exc.value, "2 training", "3 process", "0 per process")  # the groups, the processes, the share
    # one group per process and epoch: a batch of one pair, no BatchNorm and no negatives
    with pytest.raises(GLDDataError) as exc:
        DistributedGroupSampler([[0, 1], [2, 3], [4, 5]], 2, world_size=2, rank=0)
    assert_names(exc.value, "3 training", "2 process", "1 per process")
    with pytest.raises(ValueError) as exc:
        DistributedGroupSampler([[0, 1], [2, 3], [4, 5]], 1)
    assert_names(exc.value, "--batch_size", "2")  # the flag and its minimum


@pytest.mark.parametrize("n_groups, batch, world", [(8, 7, 1), (8, 3, 2), (24, 23, 1), (9, 4, 2), (7, 2, 1),
                                                     (17, 5, 3), (4, 8, 1)])
def test_every_batch_holds_two_pairs_and_ranks_stay_in_step(n_groups, batch, world):
    """The crash of the paper's sampler: a rank's last batch of one pair. Here every batch of every rank holds
    at least 2 pairs, all ranks make the same number of equally sized batches, each kept group once."""
    groups = [[2 * i, 2 * i + 1] for i in range(n_groups)]
    plans = []
    for rank in range(world):
        sampler = DistributedGroupSampler(groups, batch, world, rank)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        plans.append([len(b) // 2 for b in batches])
        assert all(2 <= n <= batch + 1 for n in plans[-1])
        assert sum(plans[-1]) == n_groups // world  # nothing dropped beyond the paper's world-size truncation
    assert all(p == plans[0] for p in plans)


def test_bad_inputs_name_the_file(toy, tmp_path):
    root, _ = toy
    with pytest.raises(GLDDataError, match="train_clean.csv"):
        read_groups(tmp_path)
    with pytest.raises(GLDDataError, match="train_clean_ids.txt"):
        read_image_ids(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/train_clean.csv").write_text("landmark_id,pictures\n1,a b\n")
    with pytest.raises(GLDDataError, match="'images' column"):
        read_groups(tmp_path)
    (tmp_path / "meta/train_clean.csv").write_text("landmark_id,images\n1,abc\n2,abd\n")
    with pytest.raises(GLDDataError) as exc:
        read_groups(tmp_path)
    assert_names(exc.value, tmp_path / "meta/train_clean.csv", "2 images")  # the file, and the minimum per landmark
    # a missing and a corrupt image: the error names the file
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    ds = GLDPairDataset(copy, gld_train_transform(16))
    gone = image_path(copy, ds.image_ids[0])
    gone.unlink()
    with pytest.raises(GLDDataError, match=re.escape(str(gone))):
        ds[0]
    broken = image_path(copy, ds.image_ids[1])
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(GLDDataError, match="corrupt"):
        ds[1]
    with pytest.raises(ValueError, match="imsize"):
        gld_train_transform(0)
