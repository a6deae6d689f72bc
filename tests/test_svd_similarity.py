"""SVD scoring against naive loop implementations: similarities, AP@k, ranking rules."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets.svd.eval import (
    SIM_FNS,
    VideoRanking,
    average_precision_at_k,
    average_precision_from_positions,
    check_topk,
    descriptor_similarity,
    mean_average_precision,
    pad_frames,
    video_descriptors,
    video_similarity,
)


def _naive_similarity(qf, ql, cf, cl, sim_fn):
    """Loops over queries, candidates and frames on plain Python floats."""
    out = torch.zeros(len(ql), len(cl), dtype=torch.float64)
    for i in range(len(ql)):
        for j in range(len(cl)):
            qv = [qf[i, a].double() for a in range(int(ql[i]))]
            cv = [cf[j, b].double() for b in range(int(cl[j]))]
            if sim_fn in ("fme", "fmx"):
                if sim_fn == "fme":
                    qd, cd = sum(qv) / len(qv), sum(cv) / len(cv)
                else:
                    qd, cd = torch.stack(qv).max(0).values, torch.stack(cv).max(0).values
                out[i, j] = float(qd @ cd) / (float(qd.norm()) * float(cd.norm()))
                continue
            pair = [[float(a @ b) for b in cv] for a in qv]
            if sim_fn == "sme":
                out[i, j] = sum(sum(row) for row in pair) / (len(qv) * len(cv))
            elif sim_fn == "smx":
                out[i, j] = max(max(row) for row in pair)
            else:  # chamfer
                out[i, j] = sum(max(row) for row in pair) / len(qv)
    return out


def _padded(n, frames, dim, lens, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, frames, dim, generator=g)
    for i, n_valid in enumerate(lens):
        x[i, n_valid:] = 0
    return x, torch.tensor(lens)


@pytest.mark.parametrize("sim_fn", SIM_FNS)
@pytest.mark.parametrize("max_elements", [2**26, 160, 7])
def test_video_similarity_matches_naive_loops(sim_fn, max_elements):
    qf, ql = _padded(4, 5, 8, [5, 1, 3, 2], seed=0)
    cf, cl = _padded(6, 5, 8, [1, 5, 2, 4, 3, 1], seed=1)
    if sim_fn in ("sme", "smx", "cf"):  # frame-level functions compare the given (normalised) frames
        qf, cf = F.normalize(qf, dim=-1), F.normalize(cf, dim=-1)
    got = video_similarity(qf, ql, cf, cl, sim_fn, max_elements=max_elements)
    want = _naive_similarity(qf, ql, cf, cl, sim_fn)
    assert got.shape == (4, 6)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sim_fn", SIM_FNS)
def test_padding_content_is_ignored_and_frame_counts_may_differ(sim_fn):
    """Garbage in the padded rows must not change anything; query and candidate F may differ."""
    qf, ql = _padded(3, 4, 6, [4, 2, 1], seed=2)
    cf, cl = _padded(5, 7, 6, [7, 1, 3, 6, 2], seed=3)
    want = video_similarity(qf, ql, cf, cl, sim_fn)
    qf2, cf2 = qf.clone(), cf.clone()
    qf2[1, 2:] = 100.0
    cf2[1, 1:] = -100.0
    got = video_similarity(qf2, ql, cf2, cl, sim_fn, max_elements=5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.double(), _naive_similarity(qf, ql, cf, cl, sim_fn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sim_fn", SIM_FNS)
def test_descriptors_then_similarity_equals_frame_similarity(sim_fn):
    """The evaluation path (model output concatenated -> pad -> descriptors -> score) equals the naive scores
    of the paper (frame-level functions normalise frames first)."""
    lens_q, lens_c = torch.tensor([3, 1, 2]), torch.tensor([2, 4])
    g = torch.Generator().manual_seed(4)
    q_cat, c_cat = torch.randn(int(lens_q.sum()), 5, generator=g), torch.randn(int(lens_c.sum()), 5, generator=g)
    qpad, cpad = pad_frames(q_cat, lens_q, 4), pad_frames(c_cat, lens_c, 4)
    assert torch.equal(qpad[0, :3], q_cat[:3]) and torch.equal(qpad[1, 0], q_cat[3]) and qpad[1, 1:].abs().sum() == 0
    qd, cd = video_descriptors(qpad, lens_q, sim_fn), video_descriptors(cpad, lens_c, sim_fn)
    if sim_fn in ("fme", "fmx"):
        assert qd.shape == (3, 5)
        torch.testing.assert_close(qd.norm(dim=-1), torch.ones(3))
    else:
        assert qd.shape == (3, 4, 5) and qd[1, 1:].abs().sum() == 0
    got = descriptor_similarity(qd, lens_q, cd, lens_c, sim_fn)
    qn = qpad if sim_fn in ("fme", "fmx") else F.normalize(qpad, dim=-1)
    cn = cpad if sim_fn in ("fme", "fmx") else F.normalize(cpad, dim=-1)
    torch.testing.assert_close(got.double(), _naive_similarity(qn, lens_q, cn, lens_c, sim_fn), rtol=1e-5, atol=1e-5)


def test_chunks_respect_the_element_budget(monkeypatch):
    import datasets.svd.eval as svd_eval

    blocks = []
    real = svd_eval._frame_level_block

    def spy(q, qmask, c, cmask, *rest):
        blocks.append(q.shape[0] * q.shape[1] * c.shape[0] * c.shape[1])
        return real(q, qmask, c, cmask, *rest)

    monkeypatch.setattr(svd_eval, "_frame_level_block", spy)
    qf, ql = _padded(5, 3, 4, [3, 1, 2, 3, 1], seed=6)
    cf, cl = _padded(9, 2, 4, [2, 1, 2, 2, 1, 1, 2, 2, 1], seed=7)
    full = svd_eval.video_similarity(qf, ql, cf, cl, "cf")
    assert blocks == [5 * 3 * 9 * 2]
    blocks.clear()
    chunked = svd_eval.video_similarity(qf, ql, cf, cl, "cf", max_elements=40)
    assert max(blocks) <= 40 and sum(blocks) == 5 * 3 * 9 * 2
    torch.testing.assert_close(chunked, full)


def test_bad_lengths_and_sim_fn_are_errors():
    qf, ql = _padded(2, 3, 4, [3, 2], seed=5)
    with pytest.raises(ValueError, match="lengths"):
        video_similarity(qf, torch.tensor([0, 2]), qf, ql, "cf")
    with pytest.raises(ValueError, match="lengths"):
        video_similarity(qf, ql, qf, torch.tensor([4, 2]), "fme")
    with pytest.raises(ValueError, match="sim_fn"):
        video_similarity(qf, ql, qf, ql, "cosine")


def _naive_ap(labels, k=None):
    top = list(labels) if k is None else list(labels)[:k]
    hits, total = 0, 0.0
    for i, lab in enumerate(top):
        if lab > 0:
            hits += 1
            total += hits / (i + 1)
    return total / hits if hits else 0.0


def test_average_precision_at_k_hand_computed():
    # relevant at ranks 1, 3, 6: AP = (1/1 + 2/3 + 3/6) / 3
    labels = [1, 0, 1, 0, 0, 1, 0]
    assert math.isclose(average_precision_at_k(labels), (1 + 2 / 3 + 3 / 6) / 3)
    # top-3 keeps ranks 1 and 3 and normalises by the 2 relevant items inside the cut (paper's protocol)
    assert math.isclose(average_precision_at_k(labels, 3), (1 + 2 / 3) / 2)
    assert average_precision_at_k(labels, 1) == 1.0
    assert average_precision_at_k([0, 0, 1], 2) == 0.0  # nothing relevant in the top 2
    assert average_precision_at_k([]) == 0.0
    assert average_precision_at_k([0, 2, 0, 1], 10) == (1 / 2 + 2 / 4) / 2  # labels > 0 are relevant; k > len is fine
    rng = np.random.default_rng(0)
    for _ in range(20):
        labs = rng.integers(0, 2, size=rng.integers(1, 30))
        for k in (None, 1, 5, 100):
            assert math.isclose(average_precision_at_k(labs, k), _naive_ap(labs, k), abs_tol=1e-12)


def rank(gt, labeled, lab_sims, unl_sims=None, unlabeled_blocks=1):
    """VideoRanking fed as the evaluation feeds it: labeled blocks, then unlabeled blocks in any order."""
    ranking = VideoRanking(["q1", "q2"], gt, labeled, torch.device("cpu"))
    ranking.add_labeled(lab_sims[:, :2], 0)  # two blocks, to cross a block boundary
    ranking.add_labeled(lab_sims[:, 2:], 2)
    ranking.end_labeled()
    if unl_sims is not None:
        for block in reversed(unl_sims.tensor_split(unlabeled_blocks, dim=1)):
            ranking.add_unlabeled(block)
    return ranking.positions()


def test_rankings_use_only_gt_labeled_and_add_unlabeled_as_negatives():
    gt = {"q1": {"a": 1, "c": 0}, "q2": {"b": 1}}
    labeled = ["a", "b", "c"]
    lab_sims = torch.tensor([[0.2, 0.9, 0.5], [0.1, 0.3, 0.8]])
    unl_sims = torch.tensor([[0.4, 0.1], [0.6, 0.2]])
    # subset: q1 sees a (0.2, +), c (0.5, 0) but not b, although b scores best; q2 sees only b
    assert [p.tolist() for p in rank(gt, labeled, lab_sims)] == [[1], [0]]
    # q1: c 0.5 (0), u1 0.4 (0), a 0.2 (1), u2 0.1 (0); q2: u1 0.6, b 0.3 (1), u2 0.2
    full = rank(gt, labeled, lab_sims, unl_sims, unlabeled_blocks=2)
    assert [p.tolist() for p in full] == [[2], [1]]
    res = mean_average_precision(full, [1, 3])
    assert res == pytest.approx({"top-1": 0.0, "top-3": (1 / 3 + 1 / 2) / 2, "top-inf": (1 / 3 + 1 / 2) / 2})
    assert list(res) == ["top-1", "top-3", "top-inf"]


def test_streamed_positions_equal_the_paper_sorted_ranking():
    """Random ground truth, ties included: the positions of the relevant videos and the APs equal those of the
    paper's construction (participants = gt labeled + all unlabeled, stable sort by score, labeled first)."""
    rng = np.random.default_rng(4)
    for trial in range(20):
        nq, nl, nu = 4, 9, int(rng.integers(0, 30))
        labeled = [f"c{j}" for j in range(nl)]
        gt = {f"q{q}": {labeled[j]: int(rng.integers(0, 2)) for j in rng.choice(nl, size=int(rng.integers(1, 6)),
                                                                                 replace=False)} for q in range(nq)}
        quant = 4 if trial % 2 else 1000  # few distinct values: many ties
        lab = torch.tensor(rng.integers(0, quant, size=(nq, nl)) / quant, dtype=torch.float32)
        unl = torch.tensor(rng.integers(0, quant, size=(nq, nu)) / quant, dtype=torch.float32)
        ranking = VideoRanking(list(gt), gt, labeled, torch.device("cpu"))
        ranking.add_labeled(lab, 0)
        ranking.end_labeled()
        for block in unl.tensor_split(3, dim=1):
            ranking.add_unlabeled(block)
        got = ranking.positions()
        for q, qid in enumerate(gt):
            cols = sorted(labeled.index(c) for c in gt[qid])
            scores = np.concatenate([lab[q, cols].double().numpy(), unl[q].double().numpy()])
            labels = np.concatenate([[gt[qid][labeled[j]] for j in cols], np.zeros(nu, dtype=int)])
            ranked = labels[np.argsort(-scores, kind="stable")]
            assert got[q].tolist() == np.flatnonzero(ranked > 0).tolist()
            for k in (None, 1, 3, 10):
                assert average_precision_from_positions(got[q], k) == average_precision_at_k(ranked, k)


def test_topk_must_be_positive_ints():
    assert check_topk([100, 5]) == [100, 5]
    for bad in ([0], [-3], [100, 0]):
        with pytest.raises(ValueError, match="--topk"):
            check_topk(bad)
    with pytest.raises(ValueError, match="--topk"):
        mean_average_precision([np.array([0])], [0])
