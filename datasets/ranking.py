"""Ranking without sorting the scores: the machinery both evaluations share.

``HigherCounter`` counts, per query, how many scores lie strictly above each of a few item scores, block by block;
its counts add up over blocks and over processes, so a million distractors are streamed, never held. ``TopK`` keeps
the best rows per query over blocks, in the stable full sort's order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class HigherCounter:
    """Per query, how many scores lie strictly above each of its item scores, without sorting the scores.

    Each query's item scores are sorted once (a few hundred values, the thresholds); every block of scores added is
    bucketed among them with ``searchsorted`` and counted. Memory is O(queries x block); the counts add up over
    blocks, and over processes (``counts`` can be all-reduced), so a million rows can be streamed from a store.
    """

    def __init__(self, item_scores: torch.Tensor, sizes: Sequence[int]) -> None:
        nq, width = item_scores.shape
        device = item_scores.device
        valid = torch.arange(width, device=device)[None, :] < torch.tensor(list(sizes), device=device)[:, None]
        pad = torch.finfo(item_scores.dtype).max
        self.item_scores = item_scores.contiguous()
        self.thresholds = torch.sort(torch.where(valid, item_scores, torch.full_like(item_scores, pad)), dim=1).values
        self.counts = torch.zeros((nq, width + 1), dtype=torch.long, device=device)
        self._offsets = torch.arange(nq, device=device)[:, None] * (width + 1)

    def add(self, block: torch.Tensor) -> torch.Tensor:
        """Count a (queries x rows) block; returns each score's bucket (the number of thresholds below it)."""
        if not bool(torch.isfinite(block).all()):  # per block: a whole-matrix check would cost ~7 bytes per score
            raise ValueError("scores contain NaN or infinite values; check the extracted features")
        nq, width = self.thresholds.shape[0], self.thresholds.shape[1]
        block = block.contiguous()
        left = torch.searchsorted(self.thresholds, block, right=False)
        left += self._offsets  # in place (as below): the block's temporaries stay at two (nq, c) tensors
        self.counts += torch.bincount(left.view(-1), minlength=nq * (width + 1)).view(nq, width + 1)
        left -= self._offsets
        return left

    def higher(self) -> torch.Tensor:
        """(queries x items): the number of added scores strictly above each item's score."""
        above = self.counts.flip(1).cumsum(1).flip(1)  # above[q, b] = #scores in buckets >= b
        item_right = torch.searchsorted(self.thresholds, self.item_scores, right=True)
        return above.gather(1, item_right)  # item_right <= width: padding never ties with a real score


class TopK:
    """The best ``k`` rows per query over blocks added in row order, in the stable full sort's order (a higher
    score first, equal scores by lower row): for the retrieval pictures at +1M without the full score matrix."""

    def __init__(self, n_queries: int, k: int, device: torch.device) -> None:
        self.k = k
        self.scores = torch.empty((n_queries, 0), device=device)
        self.rows = torch.empty((n_queries, 0), dtype=torch.long, device=device)

    def add(self, block: torch.Tensor, start: int) -> None:
        """``block``: (queries x rows) scores of rows ``start, start + 1, ...`` (blocks may come in any order)."""
        rows = torch.arange(start, start + block.shape[1], device=block.device).expand(block.shape[0], -1)
        self.merge(block, rows)

    def merge(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        scores, rows = torch.cat([self.scores, scores], 1), torch.cat([self.rows, rows], 1)
        by_row = torch.argsort(rows, dim=1, stable=True)  # ties then resolve by row, whatever the block order
        scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
        best = torch.argsort(-scores, dim=1, stable=True)[:, : self.k]
        self.scores, self.rows = scores.gather(1, best), rows.gather(1, best)
