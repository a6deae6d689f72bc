"""SVD video-retrieval scoring: video descriptors, query-candidate similarities, rankings and AP@k.

Similarity functions (``sim_fn``), as in the paper's code:

* ``fme`` / ``fmx``: one descriptor per video, the mean / element-wise max of its frame features, L2-normalised;
  the similarity is the dot product.
* ``sme`` / ``smx`` / ``cf``: the frame-to-frame dot products of every valid (query frame, candidate frame) pair
  are reduced by their mean / max / chamfer mean (for each valid query frame the max over the valid candidate
  frames, averaged over the valid query frames).

The frame-level functions never build more than ``max_elements`` pair similarities at once: the candidates (and,
if needed, the queries) are processed in chunks, each one matrix product plus vectorised masking.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets.ranking import HigherCounter

SIM_FNS = ("fme", "fmx", "sme", "smx", "cf")
POOLED_SIM_FNS = ("fme", "fmx")
DEFAULT_MAX_ELEMENTS = 2**26


def _check_sim_fn(sim_fn: str) -> None:
    if sim_fn not in SIM_FNS:
        raise ValueError(f"unknown --sim_fn {sim_fn!r}; choose one of {', '.join(SIM_FNS)}")


def _valid_mask(lens: torch.Tensor, num_frames: int, what: str, device: torch.device) -> torch.Tensor:
    """(N,) lengths -> (N, F) bool mask of the valid frames; every video needs 1..F frames."""
    lens = torch.as_tensor(lens).to(device=device, dtype=torch.long)
    if lens.numel() and (int(lens.min()) < 1 or int(lens.max()) > num_frames):
        raise ValueError(f"{what} lengths must lie in [1, {num_frames}] (the padded frame count); got "
                         f"min {int(lens.min())}, max {int(lens.max())}")
    return torch.arange(num_frames, device=device)[None, :] < lens[:, None]


def pad_frames(frames: torch.Tensor, lens: torch.Tensor, max_frames: int) -> torch.Tensor:
    """Concatenated frame features (sum(lens), D) -> zero-padded (N, max_frames, D)."""
    lens = torch.as_tensor(lens).long()
    if int(lens.sum()) != frames.shape[0]:
        raise ValueError(f"{frames.shape[0]} frame features but the lengths sum to {int(lens.sum())}")
    mask = _valid_mask(lens, max_frames, "video", frames.device)
    out = frames.new_zeros((lens.numel(), max_frames, frames.shape[-1]))
    out[mask] = frames  # row-major mask order = concatenation order
    return out


def _frame_sum(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, F, D) frames, (N, F) valid mask -> (N, D) sum of the valid frames.

    A batched (1, F) @ (F, D) product per video: no masked copy of the frames (about 15x faster than masking then
    summing). Padded rows are weighted by 0, so they must be finite (zero padding, as ``pad_frames`` writes)."""
    return torch.bmm(mask.to(frames.dtype)[:, None, :], frames).squeeze(1)


def video_descriptors(frame_feats: torch.Tensor, lens: torch.Tensor, sim_fn: str) -> torch.Tensor:
    """Padded frame features (N, F, D) -> what the similarity compares.

    ``fme``/``fmx``: (N, D) mean / max over the valid frames, L2-normalised. Frame-level functions: (N, F, D)
    with each valid frame L2-normalised and the padded rows zero.
    """
    _check_sim_fn(sim_fn)
    valid = _valid_mask(lens, frame_feats.shape[1], "video", frame_feats.device)
    mask = valid[..., None]
    if sim_fn == "fme":
        return F.normalize(_frame_sum(frame_feats, valid) / mask.sum(1), dim=-1)
    if sim_fn == "fmx":
        return F.normalize(frame_feats.masked_fill(~mask, float("-inf")).amax(1), dim=-1)
    return F.normalize(frame_feats, dim=-1).masked_fill(~mask, 0)


def _frame_level_block(q: torch.Tensor, qmask: torch.Tensor, c: torch.Tensor, cmask: torch.Tensor,
                       sim_fn: str, buffer: torch.Tensor) -> torch.Tensor:
    """(q, Fq, D) x (c, Fc, D) -> (q, c) through one (q*Fq, D) @ (D, c*Fc) product written into ``buffer``."""
    nq, fq, dim = q.shape
    nc, fc, _ = c.shape
    sims = buffer[: nq * fq * nc * fc].view(nq * fq, nc * fc)
    torch.mm(q.reshape(nq * fq, dim), c.reshape(nc * fc, dim).T, out=sims)
    sims = sims.view(nq, fq, nc, fc)
    # best valid candidate frame per query frame: one contiguous reduction over the innermost axis
    best = sims.masked_fill_(~cmask[None, None, :, :], float("-inf")).amax(dim=3)  # (q, Fq, c)
    if sim_fn == "smx":  # then the best valid query frame
        return best.masked_fill_(~qmask[:, :, None], float("-inf")).amax(dim=1)
    # chamfer: the best candidate frames averaged over the valid query frames
    return best.masked_fill_(~qmask[:, :, None], 0).sum(1) / qmask.sum(1)[:, None]


def frame_level_similarity(qfeats: torch.Tensor, qlens: torch.Tensor, cfeats: torch.Tensor, clens: torch.Tensor,
                           sim_fn: str, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """``sme``/``smx``/``cf`` of the given frames (no normalisation here) in chunks of <= max_elements pairs."""
    if sim_fn not in ("sme", "smx", "cf"):
        raise ValueError(f"frame-level similarity is sme, smx or cf, not {sim_fn!r}")
    if max_elements < 1:
        raise ValueError("max_elements must be positive")
    nq, fq, _ = qfeats.shape
    nc, fc, _ = cfeats.shape
    qmask = _valid_mask(qlens, fq, "query", qfeats.device)
    cmask = _valid_mask(clens, fc, "candidate", cfeats.device)
    if sim_fn == "sme":  # mean of all pair dot products = dot product of the frame sums / number of pairs
        pairs = qmask.sum(1)[:, None] * cmask.sum(1)[None, :]
        return (_frame_sum(qfeats, qmask) @ _frame_sum(cfeats, cmask).T) / pairs
    out = qfeats.new_empty((nq, nc))
    per_pair = fq * fc
    q_step = max(1, min(nq, max_elements // per_pair))
    c_step = max(1, min(nc, max_elements // (q_step * per_pair)))
    # one buffer for every chunk's pair similarities: fresh pages per chunk would cost a page fault each
    buffer = qfeats.new_empty(q_step * c_step * per_pair)
    for q0 in range(0, nq, q_step):
        for c0 in range(0, nc, c_step):
            out[q0:q0 + q_step, c0:c0 + c_step] = _frame_level_block(
                qfeats[q0:q0 + q_step], qmask[q0:q0 + q_step], cfeats[c0:c0 + c_step], cmask[c0:c0 + c_step],
                sim_fn, buffer)
    return out


def descriptor_similarity(qdesc: torch.Tensor, qlens: torch.Tensor, cdesc: torch.Tensor, clens: torch.Tensor,
                          sim_fn: str, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """(Q, C) similarities of descriptors made by ``video_descriptors``."""
    _check_sim_fn(sim_fn)
    if sim_fn in POOLED_SIM_FNS:
        return qdesc @ cdesc.T
    return frame_level_similarity(qdesc, qlens, cdesc, clens, sim_fn, max_elements)


def video_similarity(qfeats: torch.Tensor, qlens: torch.Tensor, cfeats: torch.Tensor, clens: torch.Tensor,
                     sim_fn: str, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """(Q, F, D), (C, F, D) zero-padded frame features with valid lengths -> (Q, C) similarities.

    ``fme``/``fmx`` pool, L2-normalise and take dot products; ``sme``/``smx``/``cf`` compare the given (already
    normalised) frames pair by pair.
    """
    _check_sim_fn(sim_fn)
    if sim_fn in POOLED_SIM_FNS:
        return video_descriptors(qfeats, qlens, sim_fn) @ video_descriptors(cfeats, clens, sim_fn).T
    return frame_level_similarity(qfeats, qlens, cfeats, clens, sim_fn, max_elements)


# --------------------------------------------------------------------------------------------------------------
# Rankings and AP@k (the paper's APScorer), without the (queries x candidates) matrix


def average_precision_at_k(sorted_labels: Sequence[int] | np.ndarray, k: int | None = None) -> float:
    """AP of a ranked label list cut at ``k`` (None = the whole list), normalised by the relevant items that
    lie *within* the top k (the paper's protocol); 0 when there are none."""
    labels = np.asarray(sorted_labels)[:k] > 0
    return average_precision_from_positions(np.flatnonzero(labels))


def average_precision_from_positions(positions: np.ndarray, k: int | None = None) -> float:
    """The same AP from the 0-based ranking positions of the relevant items (sorted): what the streamed ranking
    computes."""
    positions = np.asarray(positions)
    ranks = (positions[positions < k] if k is not None else positions) + 1  # 1-based positions within the top k
    if ranks.size == 0:
        return 0.0
    return float((np.arange(1, ranks.size + 1) / ranks).sum() / ranks.size)


def check_topk(topk: Sequence[int]) -> list[int]:
    bad = [k for k in topk if not isinstance(k, (int, np.integer)) or k <= 0]
    if bad:
        raise ValueError(f"--topk values must be positive integers, got {bad}")
    return [int(k) for k in topk]


class VideoRanking:
    """Each query's ranking, as the paper builds it, reduced to the positions of its relevant videos.

    A query's ranking holds the labeled candidates its ground truth names (with their labels; the other labeled
    videos are left out) and, for the full evaluation, every unlabeled video as a negative; ties keep candidate
    order, labeled first. The labeled candidates (a few per query) are ranked exactly; the unlabeled ones are only
    counted above each relevant video's score (``HigherCounter``), block by block and process by process, so no
    process holds the (queries x candidates) scores.
    """

    def __init__(self, query_ids: Sequence[str], gt: dict[str, dict[str, int]], labeled_ids: Sequence[str],
                 device: torch.device) -> None:
        column = {cid: j for j, cid in enumerate(labeled_ids)}
        self.columns = [np.array(sorted(column[c] for c in gt.get(q, {}) if c in column), dtype=np.int64)
                        for q in query_ids]
        self.labels = [np.array([gt[q][labeled_ids[j]] for j in cols], dtype=np.int64)
                       for q, cols in zip(query_ids, self.columns)]
        pair_q = np.concatenate([np.full(len(c), q) for q, c in enumerate(self.columns)] + [np.zeros(0, np.int64)])
        pair_c = np.concatenate(self.columns + [np.zeros(0, np.int64)])
        self.pair_q, self.pair_c = (torch.as_tensor(a, dtype=torch.long, device=device) for a in (pair_q, pair_c))
        self.pair_scores = torch.zeros(len(pair_q), device=device)
        self.pair_seen = torch.zeros(len(pair_q), device=device)
        self.device = device
        self.unlabeled: HigherCounter | None = None

    def add_labeled(self, block: torch.Tensor, start: int) -> None:
        """(queries x candidates) similarities of labeled candidates ``start, start + 1, ...``."""
        sel = (self.pair_c >= start) & (self.pair_c < start + block.shape[1])
        self.pair_scores[sel] = block[self.pair_q[sel], self.pair_c[sel] - start].float()
        self.pair_seen[sel] = 1

    def end_labeled(self, reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """All labeled candidates scored (``reduce`` sums over processes): the relevant videos' scores become the
        thresholds of the unlabeled count."""
        if reduce is not None:
            reduce(self.pair_scores)
            reduce(self.pair_seen)
        if not bool((self.pair_seen == 1).all()):
            raise RuntimeError("labeled candidates were scored more or less than once")
        scores = self.pair_scores.cpu().numpy()
        bounds = np.cumsum([0] + [len(c) for c in self.columns])
        self.scores = [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        relevant = [s[lab > 0] for s, lab in zip(self.scores, self.labels)]
        width = max([len(r) for r in relevant] + [1])
        item_scores = torch.zeros((len(relevant), width), device=self.device)
        for q, r in enumerate(relevant):
            item_scores[q, : len(r)] = torch.as_tensor(r, device=self.device)
        self.unlabeled = HigherCounter(item_scores, [len(r) for r in relevant])

    def add_unlabeled(self, block: torch.Tensor) -> None:
        """(queries x candidates) similarities of unlabeled candidates (any order, any process)."""
        self.unlabeled.add(block.float())

    def positions(self, reduce: Callable[[torch.Tensor], None] | None = None) -> list[np.ndarray]:
        """Per query, the sorted 0-based positions of its relevant videos in its full ranking."""
        if reduce is not None:
            reduce(self.unlabeled.counts)
        higher = self.unlabeled.higher().cpu().numpy()
        out = []
        for q, (scores, labels) in enumerate(zip(self.scores, self.labels)):
            order = np.argsort(-scores.astype(np.float64), kind="stable")  # labeled ties keep candidate order
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            rel = labels > 0
            out.append(np.sort(rank[rel] + higher[q, : int(rel.sum())]))
        return out


def mean_average_precision(positions: Sequence[np.ndarray], topk: Sequence[int]) -> dict[str, float]:
    """{'top-<k>': mAP@k for each k, 'top-inf': mAP over the full rankings}, as fractions, from each query's
    relevant positions (``VideoRanking.positions``)."""
    topk = check_topk(topk)
    if not positions:
        raise ValueError("no queries to evaluate")
    result = {f"top-{k}": float(np.mean([average_precision_from_positions(p, k) for p in positions])) for k in topk}
    result["top-inf"] = float(np.mean([average_precision_from_positions(p) for p in positions]))
    return result


def format_map(result: dict[str, float]) -> str:
    """``top-100 mAP: 0.xxxx | top-inf mAP: 0.xxxx`` (the paper's log line)."""
    return " | ".join(f"{name} mAP: {value:.4f}" for name, value in result.items())
