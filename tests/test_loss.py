"""Distillation loss against a naive loop implementation (value, gradients, win counts) and a 2-process run.

Random strategies: the loss draws ``torch.randint(0, n_teachers, (N, N))`` from the global torch RNG, once for
the row term and then once for the transposed term. The naive version re-seeds torch and draws the same two
masks in that order, then uses them entry by entry.
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.loss import STRATEGIES, MultiTeacherDistillLoss
from utils.distributed import DistContext

ST, TT = 0.07, 0.05
TEACHERS = ["t_a", "t_b", "t_c"]


def _batch(n=6, d_stu=5, d_tch=4, n_tch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s1, s2 = torch.randn(n, d_stu, generator=g), torch.randn(n, d_stu, generator=g)
    t1 = [torch.randn(n, d_tch, generator=g) for _ in range(n_tch)]
    t2 = [t + 0.5 * torch.randn(n, d_tch, generator=g) for t in t1]  # correlated views: clear positives
    return s1, s2, t1, t2


def _unit_rows(x):
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def _naive_fuse(sims, strategy, mask):
    """sims: list over teachers of N x N nested Python lists; returns (fused N x N list, diagonal winners)."""
    n, k = len(sims[0]), len(sims)
    fused = [[0.0] * n for _ in range(n)]
    winners = []
    for i in range(n):
        for j in range(n):
            vals = [sims[t][i][j] for t in range(k)]
            if strategy == "mean":
                fused[i][j] = sum(vals) / k
            elif strategy == "rand":
                fused[i][j] = vals[mask[i][j]]
            elif i == j:
                fused[i][j] = max(vals)
                winners.append(vals.index(max(vals)))
            elif strategy == "maxmin":
                fused[i][j] = min(vals)
            elif strategy == "maxmean":
                fused[i][j] = sum(vals) / k
            else:  # maxrand
                fused[i][j] = vals[mask[i][j]]
    return fused, winners


def _naive_kl(stu_sim, fused):
    """batchmean KL(softmax(fused/TT) || softmax(stu_sim/ST)), one row at a time."""
    n = len(fused)
    total = 0.0
    for i in range(n):
        row = [f / TT for f in fused[i]]
        m = max(row)
        z = sum(math.exp(r - m) for r in row)
        target = [math.exp(r - m) / z for r in row]
        log_p = stu_sim[i] / ST - torch.logsumexp(stu_sim[i] / ST, dim=0)
        for j in range(n):
            total = total + target[j] * (math.log(target[j]) - log_p[j])
    return total / n


def _naive_loss(s1, s2, t1, t2, strategy, seed):
    stu_sim = _unit_rows(s1) @ _unit_rows(s2).T
    sims = [(_unit_rows(a) @ _unit_rows(b).T).tolist() for a, b in zip(t1, t2)]
    sims_t = [[list(col) for col in zip(*m)] for m in sims]  # transposes, element by element
    torch.manual_seed(seed)
    n = s1.shape[0]
    mask_rows = torch.randint(0, len(t1), (n, n)).tolist()
    mask_cols = torch.randint(0, len(t1), (n, n)).tolist()
    fused_rows, win_rows = _naive_fuse(sims, strategy, mask_rows)
    fused_cols, win_cols = _naive_fuse(sims_t, strategy, mask_cols)
    loss = _naive_kl(stu_sim, fused_rows) + _naive_kl(stu_sim.T, fused_cols)
    counts = [(win_rows + win_cols).count(t) for t in range(len(t1))]
    return loss, counts


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_naive_value_gradient_and_counts(strategy):
    s1, s2, t1, t2 = _batch(seed=STRATEGIES.index(strategy))
    a1, a2 = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    loss_fn = MultiTeacherDistillLoss(st=ST, tt=TT, strategy=strategy, teachers=TEACHERS)
    torch.manual_seed(11)
    out = loss_fn(a1, a2, t1, t2)
    assert list(out) == ["distill loss"]
    out["distill loss"].backward()

    b1, b2 = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    ref, counts = _naive_loss(b1, b2, t1, t2, strategy, seed=11)
    ref.backward()
    torch.testing.assert_close(out["distill loss"].detach(), ref.detach().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1.grad, b1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a2.grad, b2.grad, rtol=1e-4, atol=1e-6)
    assert loss_fn.pos_win_count.tolist() == counts
    if strategy in ("mean", "rand"):
        assert sum(counts) == 0 and loss_fn.win_shares() == [0.0, 0.0, 0.0]
    else:
        assert sum(counts) == 2 * s1.shape[0]  # the row term and the transposed term both count
        assert loss_fn.win_shares() == pytest.approx([c / sum(counts) for c in counts])


def test_random_strategies_follow_the_torch_seed():
    s1, s2, t1, t2 = _batch(seed=4)
    loss_fn = MultiTeacherDistillLoss(strategy="rand", teachers=TEACHERS)
    torch.manual_seed(3)
    first = loss_fn(s1, s2, t1, t2)["distill loss"]
    torch.manual_seed(3)
    again = loss_fn(s1, s2, t1, t2)["distill loss"]
    other = loss_fn(s1, s2, t1, t2)["distill loss"]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_win_counts_accumulate_and_bad_arguments():
    s1, s2, t1, t2 = _batch(seed=5)
    loss_fn = MultiTeacherDistillLoss(strategy="maxmin", teachers=TEACHERS)
    loss_fn(s1, s2, t1, t2)
    loss_fn(s1, s2, t1, t2)
    assert int(loss_fn.pos_win_count.sum()) == 4 * s1.shape[0]
    assert "pos_win_count" in loss_fn.state_dict()
    with pytest.raises(ValueError, match="maxmin, maxmean"):
        MultiTeacherDistillLoss(strategy="maxfix", teachers=TEACHERS)
    with pytest.raises(ValueError, match="3 teacher"):
        loss_fn(s1, s2, t1[:2], t2[:2])


# ---- two processes (gloo): each rank holds half of the batch, gradients averaged as DDP does ----

def _distributed_case(x1, x2, t1, t2, strategy, ctx=None):
    """A linear student on inputs x; returns loss, its parameter grads and the input grads."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(x1.shape[1], 5)
    x1, x2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    loss_fn = MultiTeacherDistillLoss(st=ST, tt=TT, strategy=strategy, teachers=TEACHERS, ctx=ctx)
    loss = loss_fn(proj(x1), proj(x2), t1, t2)["distill loss"]
    loss.backward()
    return loss.detach(), [p.grad for p in proj.parameters()], x1.grad, x2.grad, loss_fn.pos_win_count


def _worker(rank, world, init_file, out_dir, strategy):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x1, x2, t1, t2 = _batch(n=8, d_stu=7, seed=9)
        rows = slice(rank * 4, rank * 4 + 4)
        loss, grads, g1, g2, wins = _distributed_case(x1[rows], x2[rows], [t[rows] for t in t1],
                                                      [t[rows] for t in t2], strategy,
                                                      DistContext(rank=rank, world_size=world))
        for g in grads:  # DDP's gradient averaging
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": loss, "grads": grads, "g1": g1, "g2": g2, "wins": wins}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["maxmin"])
def test_two_process_gloo_equals_single_process(tmp_path, strategy):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "pg_init"), str(tmp_path), strategy), nprocs=world, join=True)
    x1, x2, t1, t2 = _batch(n=8, d_stu=7, seed=9)
    loss, grads, g1, g2, wins = _distributed_case(x1, x2, t1, t2, strategy)
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(res["loss"] / world, loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(res["grads"], grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        rows = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(res["g1"] / world, g1[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["g2"] / world, g2[rows], rtol=1e-4, atol=1e-6)
        assert torch.equal(res["wins"], wins)
