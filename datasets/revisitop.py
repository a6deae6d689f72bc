"""The revisitop evaluation: its metric, and the ranking positions it needs, computed without sorting the scores.

* ``compute_map`` is revisitop's metric on a full ranking (trapezoid AP, junk removed from the ranking, queries
  without positives excluded); ``map_from_positions`` is the same metric from the ranking positions of the labelled
  items only, which is all the evaluation computes.
* The (database x query) score matrix is never sorted: the rank of each labelled item is the number of items that
  score strictly higher plus the number of equal-scoring items with a lower database index, which is exactly its
  position in ``torch.argsort(-scores, dim=0, stable=True)``.
* ``result_from_positions`` turns those positions into the E/M/H result; the streamed evaluation (engine) and
  ``evaluate_scores`` (a whole score matrix: demo, tests, benchmarks) both end there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from datasets.oxford_paris import MODES, revisited_ground_truth
from datasets.ranking import HigherCounter, TopK

KAPPAS = (1, 5, 10)


def trapezoid_average_precision(ok_pos: np.ndarray, junk_pos: np.ndarray, n_ok: int,
                                kappas: Sequence[int] = ()) -> tuple[float, np.ndarray]:
    """AP and precision@k of one query from the sorted 0-based ranking positions of its ok and junk items.

    Positives are first moved up by the number of junk items ranked before them; AP accumulates trapezoids of the
    precision-recall curve with recall step ``1 / n_ok``; ``kq = min(max position (1-based), k)``.
    """
    ok_pos = np.sort(np.asarray(ok_pos, dtype=np.int64))
    junk_pos = np.sort(np.asarray(junk_pos, dtype=np.int64))
    pos = ok_pos - np.searchsorted(junk_pos, ok_pos, side="left")
    j = np.arange(len(pos), dtype=np.float64)
    r = pos.astype(np.float64)
    prec0 = np.where(pos == 0, 1.0, j / np.maximum(r, 1.0))
    prec1 = (j + 1) / (r + 1)
    ap = float(np.sum((prec0 + prec1) * (1.0 / n_ok) / 2.0))
    prs = np.zeros(len(kappas))
    if len(pos):
        one_based = pos + 1
        for i, k in enumerate(kappas):
            kq = min(int(one_based.max()), int(k))
            prs[i] = np.count_nonzero(one_based <= kq) / kq
    return ap, prs


def map_from_positions(positions: Sequence[tuple[np.ndarray, np.ndarray]], gnd: Sequence[dict],
                       kappas: Sequence[int] = ()) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """``(map, aps, pr, prs)`` as revisitop's ``compute_map`` from per-query ``(ok positions, junk positions)``."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for q in range(nq):
        n_ok = np.asarray(gnd[q]["ok"]).reshape(-1).shape[0]
        if n_ok == 0:  # no positives: excluded from the means
            aps[q] = np.nan
            prs[q] = np.nan
            continue
        aps[q], prs[q] = trapezoid_average_precision(*positions[q], n_ok, kappas)
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def compute_map(ranks: np.ndarray, gnd: Sequence[dict],
                kappas: Sequence[int] = ()) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map``: ``ranks`` (db x queries, 0-based database indices, best first), ``gnd`` a list
    of ``{'ok', 'junk'}``. Returns ``(map, aps, pr, prs)``; queries without positives get NaN and are excluded."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (db, {len(gnd)} queries), got shape {ranks.shape}")
    positions = []
    for q, g in enumerate(gnd):
        column = ranks[:, q]
        ok = np.flatnonzero(np.isin(column, np.asarray(g["ok"]).reshape(-1)))
        junk = np.flatnonzero(np.isin(column, np.asarray(g.get("junk", [])).reshape(-1)))
        positions.append((ok, junk))
    return map_from_positions(positions, gnd, kappas)


def padded_items(items: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """(queries x width) indices, zero-padded, and each query's count."""
    sizes = [len(np.asarray(it).reshape(-1)) for it in items]
    idx = torch.zeros((len(items), max(sizes + [1])), dtype=torch.long, device=device)
    for q, it in enumerate(items):
        idx[q, : sizes[q]] = torch.as_tensor(np.asarray(it, dtype=np.int64).reshape(-1), device=device)
    return idx, sizes


def item_positions(scores: torch.Tensor, items: Sequence[np.ndarray], chunk_size: int = 65536) -> list[np.ndarray]:
    """Positions (0-based) of ``items[q]`` (database indices) in the ranking of query ``q``, without sorting.

    Equal to the full sort ``torch.argsort(-scores, dim=0, stable=True)`` inverted at those items, ties included:
    the scores strictly above (``HigherCounter``) plus the equal scores of lower database index.
    """
    if scores.ndim != 2 or scores.shape[1] != len(items):
        raise ValueError(f"scores must be (db, {len(items)} queries), got {tuple(scores.shape)}")
    n_db, nq = scores.shape
    idx, sizes = padded_items(items, scores.device)
    counter = HigherCounter(scores.gather(0, idx.T).T, sizes)  # item scores: padding columns are ignored
    width = counter.thresholds.shape[1]
    ties: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, n_db, chunk_size):
        block = scores[start:start + chunk_size].T.contiguous()  # (nq, c)
        left = counter.add(block)
        tied = counter.thresholds.gather(1, left.clamp_(max=width - 1)) == block  # never in the padding bucket
        q_t, j_t = torch.nonzero(tied, as_tuple=True)
        ties.append((q_t, j_t + start, left[q_t, j_t]))
    item_left = torch.searchsorted(counter.thresholds, counter.item_scores, right=False)
    tie_q, tie_j, tie_g = (torch.cat(t).cpu().numpy() for t in zip(*ties))
    higher, item_left = counter.higher().cpu().numpy(), item_left.cpu().numpy()
    out = []
    for q in range(nq):
        it = np.asarray(items[q], dtype=np.int64).reshape(-1)
        sel = tie_q == q
        # (group, db index) pairs of this query's ties, sorted so a searchsorted counts lower indices per group
        keys = tie_g[sel] * (n_db + 1) + tie_j[sel]
        keys.sort()
        own = item_left[q, : sizes[q]] * (n_db + 1)
        before = np.searchsorted(keys, own + it, side="left") - np.searchsorted(keys, own, side="left")
        out.append(higher[q, : sizes[q]] + before)
    return out


@dataclass
class RevisitedResult:
    """E/M/H results of one evaluation; ``map``/``mpr`` are fractions (print them x100)."""

    dataset: str
    kappas: tuple[int, ...]
    map: dict[str, float] = field(default_factory=dict)
    mpr: dict[str, np.ndarray] = field(default_factory=dict)
    aps: dict[str, np.ndarray] = field(default_factory=dict)
    n_evaluated: dict[str, int] = field(default_factory=dict)

    def to_json(self, n_queries: int, n_database: int, n_distractors: int, protocol: dict) -> dict:
        """The ``--output_json`` record (README): unrounded percentages (NaN -> null), the counts, the protocol."""
        pct = lambda v: None if not math.isfinite(float(v)) else float(v) * 100
        return {"dataset": self.dataset,
                "map": {m: pct(self.map[m]) for m in MODES},
                "mpr": {m: [pct(v) for v in self.mpr[m]] for m in MODES},
                "kappas": list(self.kappas),
                "n_queries": int(n_queries),
                "n_evaluated": dict(self.n_evaluated),
                "n_database": int(n_database),
                "n_distractors": int(n_distractors),
                "protocol": protocol}

    def lines(self) -> list[str]:
        """The two lines cirtorch/revisitop print (percent, 2 decimals)."""
        pct = {m: np.around(self.map[m] * 100, decimals=2) for m in MODES}
        mpr = {m: np.around(self.mpr[m] * 100, decimals=2) for m in MODES}
        ks = "[" + " ".join(str(k) for k in self.kappas) + "]"
        return [f">> {self.dataset}: mAP E: {pct['E']}, M: {pct['M']}, H: {pct['H']}",
                f">> {self.dataset}: mP@k{ks} E: {mpr['E']}, M: {mpr['M']}, H: {mpr['H']}"]


def labelled_items(gnd: Sequence[dict]) -> list[np.ndarray]:
    """Each query's easy, hard and junk database indices (the only positions the metrics need), sorted, unique."""
    return [np.unique(np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1)
                                      for k in ("easy", "hard", "junk")])) for g in gnd]


def result_from_positions(items: Sequence[np.ndarray], positions: Sequence[np.ndarray], gnd: Sequence[dict],
                          dataset: str = "", kappas: Sequence[int] = KAPPAS) -> RevisitedResult:
    """E/M/H mAP and mP@k from the ranking positions of each query's ``labelled_items``."""
    lookup = [dict(zip(it.tolist(), p.tolist())) for it, p in zip(items, positions)]
    result = RevisitedResult(dataset=dataset, kappas=tuple(int(k) for k in kappas))
    for mode in MODES:
        sets = revisited_ground_truth(gnd, mode)
        pos = [(np.sort([lk[i] for i in np.unique(s["ok"])]).astype(np.int64),
                np.sort([lk[i] for i in np.unique(s["junk"])]).astype(np.int64)) for lk, s in zip(lookup, sets)]
        result.map[mode], result.aps[mode], result.mpr[mode], _ = map_from_positions(pos, sets, kappas)
        result.n_evaluated[mode] = int(np.count_nonzero(~np.isnan(result.aps[mode])))
    return result


def evaluate_scores(scores: torch.Tensor, gnd: Sequence[dict], dataset: str = "",
                    kappas: Sequence[int] = KAPPAS, chunk_size: int = 65536) -> RevisitedResult:
    """E/M/H mAP and mP@k from a (database [+ distractors]) x queries score matrix, without a full sort.

    The whole matrix in one call, through the same steps the streamed evaluation takes (``labelled_items`` ->
    ``item_positions`` -> ``result_from_positions``), so both turn scores into a result one way only.
    """
    items = labelled_items(gnd)
    return result_from_positions(items, item_positions(scores, items, chunk_size), gnd, dataset, kappas)


def similarity(database: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(db x queries) cosine similarity of L2-normalised features, as the paper scores."""
    return F.normalize(database, dim=1) @ F.normalize(queries, dim=1).T


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(queries x k) best database indices per query, in the order of the stable full sort (ties included)."""
    best = TopK(scores.shape[1], min(k, scores.shape[0]), scores.device)
    best.add(scores.T, 0)
    return best.rows
