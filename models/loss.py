"""Multi-teacher similarity distillation loss (the paper's ``loss.py``).

Student and teachers produce two views' embeddings; over the whole global batch the student's cross-view
similarity matrix ``S = s1 s2^T`` is pulled (KL divergence of row-wise softmaxes, in both directions) towards a
fusion of the teachers' matrices ``T_k = t1_k t2_k^T``. The fusion strategy decides, per entry, which teacher
to trust: positives (the diagonal) and negatives (off-diagonal) are fused separately.

Random strategies draw with the global torch RNG on the similarities' device, one
``torch.randint(0, n_teachers, (N, N))`` per KL term, the row term first and then the transposed term
(as the paper); seeding torch reproduces them.

The global batch and the world-size factor come from the ``DistContext`` the builder passes (``ctx``); without one,
from the context the launcher made for this process (``DistContext.current()``), never from torch's globals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.distributed import DistContext, all_gather_with_grad

STRATEGIES = ("mean", "maxmin", "maxmean", "maxrand", "rand")


class MultiTeacherDistillLoss(nn.Module):
    """``KL(S, fuse(T)) + KL(S^T, fuse(T^T))`` over the global batch, times the world size (DDP averages grads)."""

    def __init__(self, st: float = 0.05, tt: float = 0.05, strategy: str = "maxmin",
                 teachers: list[str] | tuple[str, ...] = (), ctx: DistContext | None = None) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown --strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
        if len(teachers) == 0:
            raise ValueError("MultiTeacherDistillLoss needs the list of teacher names (at least one)")
        self.st = st
        self.tt = tt
        self.strategy = strategy
        self.teachers = list(teachers)
        self.ctx = ctx  # None: the process's current context, looked up at each call
        self.kl = nn.KLDivLoss(reduction="batchmean")
        # how often each teacher gave the largest positive similarity (max-based strategies only)
        self.register_buffer("pos_win_count", torch.zeros(len(self.teachers), dtype=torch.long))

    def forward(self, stu1: torch.Tensor, stu2: torch.Tensor, tch1: list[torch.Tensor],
                tch2: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(tch1) != len(self.teachers) or len(tch2) != len(self.teachers):
            raise ValueError(f"the loss was built for {len(self.teachers)} teacher(s) {self.teachers} but got "
                             f"{len(tch1)} and {len(tch2)} teacher outputs")
        ctx = DistContext.current() if self.ctx is None else self.ctx
        # float32 even under autocast: similarities divided by a 0.05 temperature need the precision
        with torch.autocast(device_type=stu1.device.type, enabled=False):
            s1 = all_gather_with_grad(F.normalize(stu1.float(), p=2, dim=-1), ctx)
            s2 = all_gather_with_grad(F.normalize(stu2.float(), p=2, dim=-1), ctx)
            t1 = [all_gather_with_grad(F.normalize(t.float(), p=2, dim=-1).contiguous(), ctx) for t in tch1]
            t2 = [all_gather_with_grad(F.normalize(t.float(), p=2, dim=-1).contiguous(), ctx) for t in tch2]
            stu_sim = s1.mm(s2.t())
            tch_sims = torch.stack([a.mm(b.t()) for a, b in zip(t1, t2)], dim=0)  # (n_teachers, N, N)
            loss = self._kl_term(stu_sim, tch_sims) + self._kl_term(stu_sim.t(), tch_sims.transpose(1, 2))
        # each rank back-propagates through its own shard only; DDP's averaging then yields the global gradient
        return {"distill loss": loss * ctx.world_size}

    def _kl_term(self, stu_sim: torch.Tensor, tch_sims: torch.Tensor) -> torch.Tensor:
        target = F.softmax(self.fuse(tch_sims) / self.tt, dim=-1)
        return self.kl(F.log_softmax(stu_sim / self.st, dim=-1), target)

    def fuse(self, sims: torch.Tensor) -> torch.Tensor:
        """(n_teachers, N, N) -> (N, N) per the strategy; counts positive wins for the max-based ones."""
        if self.strategy == "mean":
            return sims.mean(dim=0)
        if self.strategy == "rand":
            return self._random_pick(sims)
        diag_max, winner = sims.max(dim=0)
        self._count_wins(winner.diagonal())
        if self.strategy == "maxmin":
            off_diag = sims.min(dim=0).values
        elif self.strategy == "maxmean":
            off_diag = sims.mean(dim=0)
        else:  # maxrand
            off_diag = self._random_pick(sims)
        eye = torch.eye(sims.shape[1], sims.shape[2], dtype=torch.bool, device=sims.device)
        return torch.where(eye, diag_max, off_diag)

    @staticmethod
    def _random_pick(sims: torch.Tensor) -> torch.Tensor:
        """Each entry from a uniformly drawn teacher (global torch RNG, on the sims' device)."""
        pick = torch.randint(0, sims.shape[0], sims.shape[1:], device=sims.device)
        return sims.gather(0, pick.unsqueeze(0)).squeeze(0)

    @torch.no_grad()
    def _count_wins(self, winners: torch.Tensor) -> None:
        counts = F.one_hot(winners, num_classes=len(self.teachers)).sum(dim=0)
        self.pos_win_count += counts.to(self.pos_win_count)

    def win_shares(self) -> list[float]:
        """Share of positive wins per teacher (0s before any count, and always for mean/rand)."""
        total = int(self.pos_win_count.sum())
        if total == 0:
            return [0.0] * len(self.teachers)
        return [int(c) / total for c in self.pos_win_count.tolist()]

    def extra_repr(self) -> str:
        shares = " | ".join(f"{n}: {s * 100:.2f}%" for n, s in zip(self.teachers, self.win_shares()))
        return f"strategy={self.strategy}, st={self.st}, tt={self.tt}, positive wins: {shares}"
