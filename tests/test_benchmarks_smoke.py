"""The benchmarks' core comparisons at tiny sizes: the project's fast paths equal the paper-style references."""
import pytest
import torch

from benchmarks.ranking import assert_identical, synthetic_benchmark
from benchmarks.video_similarity import check_equal, prepare, reference_similarity, synthetic_videos
from datasets.svd.eval import SIM_FNS, video_similarity


def test_ranking_fast_equals_full_sort_and_compute_map():
    scores, gnd = synthetic_benchmark(n_queries=6, n_database=300, n_distractors=500, dim=16, n_ties=12, seed=1)
    maps = assert_identical(scores, gnd)  # raises on any differing position, AP or mP@k
    assert set(maps) == {"E", "M", "H"}
    assert all(0.0 <= v <= 1.0 for v in maps.values())


@pytest.mark.parametrize("sim_fn", SIM_FNS)
def test_video_similarity_equals_paper_masked_computation(sim_fn):
    g = torch.Generator().manual_seed(0)
    qraw, qlens = synthetic_videos(5, 7, 16, g)
    craw, clens = synthetic_videos(11, 7, 16, g)
    q, c = prepare(qraw, qlens, sim_fn), prepare(craw, clens, sim_fn)
    fast = check_equal(q, qlens, c, clens, sim_fn, batch=4)
    assert fast.shape == (5, 11)


def test_video_reference_is_independent_of_padding_content():
    """Sanity of the reference itself: garbage in padded frames must not change the masked result."""
    g = torch.Generator().manual_seed(2)
    qraw, qlens = synthetic_videos(3, 6, 8, g)
    craw, clens = synthetic_videos(4, 6, 8, g)
    q, c = prepare(qraw, qlens, "cf"), prepare(craw, clens, "cf")
    noisy = c.clone()
    noisy[torch.arange(6)[None, :] >= clens[:, None]] = 5.0
    torch.testing.assert_close(reference_similarity(q, qlens, noisy, clens, "cf", 2),
                               reference_similarity(q, qlens, c, clens, "cf", 2))
    torch.testing.assert_close(video_similarity(q, qlens, c, clens, "cf"),
                               reference_similarity(q, qlens, c, clens, "cf", 3))
