"""Ranking at +1M scale: this project's sort-free ranking + mAP against the paper's full argsort + revisitop.

70 queries against 5,000 database images + N distractors, with synthetic L2-normalised features (512-d) and a
synthetic revisited ground truth (easy / hard / junk per query; some queries without hard positives, so the
Hard setup excludes them as NaN). Duplicate rows are planted so exact score ties with labelled images occur.

* reference: ``ranks = argsort(-scores, dim=0)`` (stable: ties keep the lower index, the order both sides
  define) then revisitop's ``compute_map`` (re-implemented here from its description) for Easy, Medium, Hard;
* this project: ``datasets.revisitop.evaluate_scores`` (positions of the labelled images by counting, no sort).

Both start from the (database x queries) score matrix; computing it is the same matrix product for both and is
timed apart. Every run asserts that the two agree exactly: the ranking position of every labelled image and
every AP / mP@k value.

    python benchmarks/ranking.py                          # N = 0, 100k (a minute on 2 CPU cores)
    python benchmarks/ranking.py --distractors 1000000    # the +1M setting
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common
from datasets.oxford_paris import MODES, revisited_ground_truth
from datasets.revisitop import KAPPAS, evaluate_scores, item_positions


# ------------------------------------------------------------------------------------------------ synthetic data
def _near(anchor: torch.Tensor, cosine: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Unit vectors at (about) the given cosine similarity to the unit vector ``anchor``."""
    noise = F.normalize(torch.randn(len(cosine), anchor.numel(), generator=g), dim=1)
    noise = F.normalize(noise - (noise @ anchor)[:, None] * anchor, dim=1)  # orthogonal to the anchor
    return cosine[:, None] * anchor + (1 - cosine[:, None] ** 2).sqrt() * noise


def synthetic_benchmark(n_queries: int = 70, n_database: int = 5000, n_distractors: int = 0, dim: int = 512,
                        n_ties: int = 32, seed: int = 0, chunk: int = 65536) -> tuple[torch.Tensor, list[dict]]:
    """(database + distractors) x queries float32 cosine scores and a revisitop ``gnd`` list.

    Per query: 5-40 easy images (cosine 0.25-0.7), 0-60 hard (0.08-0.3), 0-40 junk (0.1-0.5); query 0 has no hard
    image. Distractors are random unit vectors, generated chunk by chunk so the features never exist in full.
    ``n_ties`` distractor rows copy the scores of labelled images (and one another): exact ties."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    queries = F.normalize(torch.randn(n_queries, dim, generator=g), dim=1)
    database = F.normalize(torch.randn(n_database, dim, generator=g), dim=1)
    gnd = []
    for q in range(n_queries):
        n_easy, n_hard, n_junk = rng.integers(5, 41), 0 if q == 0 else rng.integers(0, 61), rng.integers(0, 41)
        picked = rng.permutation(n_database)[: n_easy + n_hard + n_junk]
        easy, hard, junk = np.split(picked, [n_easy, n_easy + n_hard])
        for idx, (lo, hi) in ((easy, (0.25, 0.7)), (hard, (0.08, 0.3)), (junk, (0.1, 0.5))):
            if len(idx):
                cosine = lo + (hi - lo) * torch.rand(len(idx), generator=g)
                database[torch.as_tensor(idx)] = _near(queries[q], cosine, g)
        gnd.append({"easy": np.sort(easy), "hard": np.sort(hard), "junk": np.sort(junk)})
    scores = torch.empty(n_database + n_distractors, n_queries)
    scores[:n_database] = database @ queries.T
    for start in range(0, n_distractors, chunk):
        rows = min(chunk, n_distractors - start)
        block = F.normalize(torch.randn(rows, dim, generator=g), dim=1)
        scores[n_database + start: n_database + start + rows] = block @ queries.T
    if n_ties and len(scores) > n_database:
        labelled = np.unique(np.concatenate([np.concatenate([x["easy"], x["hard"], x["junk"]]) for x in gnd]))
        n_rows = len(scores)
        copies = torch.as_tensor(rng.choice(np.arange(n_database, n_rows), size=min(n_ties, n_rows - n_database),
                                            replace=False))
        sources = torch.as_tensor(rng.choice(labelled, size=len(copies)))
        scores[copies] = scores[sources]  # a distractor identical to a labelled image
        scores[copies[1::2]] = scores[copies[::2]][: len(copies[1::2])]  # and pairs of identical distractors
    return scores, gnd


# ------------------------------------------------------------------------------------------------ reference path
def reference_compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS
                          ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map`` step by step: find the ok/junk positions in each ranking column, walk the
    junk list to move every positive up by the junk ranked before it, trapezoid AP, mP@k with
    ``kq = min(max position, k)``; queries without positives are NaN and left out of the means."""
    n_queries = len(gnd)
    aps = np.zeros(n_queries)
    prs = np.zeros((n_queries, len(kappas)))
    n_empty = 0
    for q in range(n_queries):
        ok = np.asarray(gnd[q]["ok"])
        if ok.shape[0] == 0:
            aps[q], prs[q] = float("nan"), float("nan")
            n_empty += 1
            continue
        junk = np.asarray(gnd[q].get("junk", []))
        column = ranks[:, q]
        pos = np.arange(column.shape[0])[np.isin(column, ok)]
        junk_pos = np.arange(column.shape[0])[np.isin(column, junk)]
        shift, j = 0, 0
        for i in range(len(pos)):
            while j < len(junk_pos) and pos[i] > junk_pos[j]:
                shift += 1
                j += 1
            pos[i] -= shift
        ap, step = 0.0, 1.0 / ok.shape[0]
        for i, rank in enumerate(pos):
            precision_0 = 1.0 if rank == 0 else float(i) / rank
            precision_1 = float(i + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * step / 2.0
        aps[q] = ap
        pos = pos + 1
        for i, k in enumerate(kappas):
            kq = min(pos.max(), k)
            prs[q, i] = (pos <= kq).sum() / kq
    valid = n_queries - n_empty
    m = float(np.nansum(aps) / valid) if valid else float("nan")
    pr = np.nansum(prs, axis=0) / valid if valid else np.full(len(kappas), np.nan)
    return m, aps, pr, prs


def full_sort_ranks(scores: torch.Tensor) -> np.ndarray:
    """The paper's ranking: every column fully sorted (stable, so ties keep the lower index first)."""
    return torch.argsort(-scores, dim=0, stable=True).numpy()


def reference_evaluate(scores: torch.Tensor, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS,
                       split: dict[str, list[float]] | None = None) -> dict[str, tuple]:
    """Full argsort, then ``compute_map`` for Easy/Medium/Hard; ``split`` collects the sort / mAP seconds."""
    start = time.perf_counter()
    ranks = full_sort_ranks(scores)
    sorted_at = time.perf_counter()
    out = {mode: reference_compute_map(ranks, revisited_ground_truth(gnd, mode), kappas) for mode in MODES}
    if split is not None:
        split.setdefault("sort", []).append(sorted_at - start)
        split.setdefault("map", []).append(time.perf_counter() - sorted_at)
    return out


# ------------------------------------------------------------------------------------------------ equality check
def labelled_items(gnd: Sequence[dict]) -> list[np.ndarray]:
    return [np.unique(np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in ("easy", "hard", "junk")]))
            for g in gnd]


def assert_identical(scores: torch.Tensor, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS) -> dict[str, float]:
    """Fast and reference paths agree exactly: positions of every labelled image, then every AP and mP@k."""
    ranks = full_sort_ranks(scores)
    items = labelled_items(gnd)
    fast_positions = item_positions(scores, items)
    where = np.empty(ranks.shape[0], dtype=np.int64)
    for q, it in enumerate(items):
        where[ranks[:, q]] = np.arange(ranks.shape[0])
        if not np.array_equal(where[it], fast_positions[q]):
            bad = np.flatnonzero(where[it] != fast_positions[q])[:5]
            raise AssertionError(f"query {q}: ranking positions differ for images {it[bad].tolist()}: full sort "
                                 f"{where[it][bad].tolist()}, project {fast_positions[q][bad].tolist()}")
    fast = evaluate_scores(scores, gnd, kappas=kappas)
    maps = {}
    for mode in MODES:
        ref_map, ref_aps, ref_pr, _ = reference_compute_map(ranks, revisited_ground_truth(gnd, mode), kappas)
        np.testing.assert_allclose(fast.aps[mode], ref_aps, rtol=1e-12, atol=0, equal_nan=True,
                                   err_msg=f"per-query AP ({mode}) differs")
        np.testing.assert_allclose(fast.mpr[mode], ref_pr, rtol=1e-12, atol=0, err_msg=f"mP@k ({mode}) differs")
        np.testing.assert_allclose(fast.map[mode], ref_map, rtol=1e-12, atol=0, err_msg=f"mAP ({mode}) differs")
        maps[mode] = ref_map
    return maps


# ------------------------------------------------------------------------------------------------ benchmark
def bench_size(args: argparse.Namespace, n_distractors: int, device: torch.device) -> dict:
    with common.stage(f"scores for {args.database} + {n_distractors} images"):
        start = time.perf_counter()
        scores, gnd = synthetic_benchmark(args.queries, args.database, n_distractors, args.dim, args.ties, args.seed)
        make_seconds = time.perf_counter() - start
    with common.stage("equality check"):
        maps = assert_identical(scores, gnd)
    scores = scores.to(device)
    split: dict[str, list[float]] = {}
    times = common.time_interleaved({"project": lambda: evaluate_scores(scores, gnd, kappas=KAPPAS),
                                     "reference": lambda: reference_evaluate(scores.cpu(), gnd, split=split)},
                                    repeats=args.repeats, warmup=args.warmup, device=device)
    mem_project = common.peak_memory(lambda: evaluate_scores(scores, gnd, kappas=KAPPAS), device)
    mem_reference = common.peak_memory(lambda: reference_evaluate(scores.cpu(), gnd), torch.device("cpu"))
    n_rows = scores.shape[0]
    project, reference = common.median(times["project"]), common.median(times["reference"])
    return {
        "n_distractors": n_distractors, "n_rows": n_rows, "n_queries": args.queries,
        "project_s": project, "reference_s": reference, "speedup": reference / project,
        "reference_sort_s": common.median(split["sort"][-args.repeats:]),
        "reference_map_s": common.median(split["map"][-args.repeats:]),
        "project_runs_s": times["project"], "reference_runs_s": times["reference"],
        "project_peak_mib": common.mib(mem_project), "reference_peak_mib": common.mib(mem_reference),
        "index_matrix_mib": n_rows * args.queries * 8 / 2**20, "scores_mib": scores.numel() * 4 / 2**20,
        "scores_make_s": make_seconds, "map_E": maps["E"] * 100, "map_M": maps["M"] * 100, "map_H": maps["H"] * 100,
        "identical": True,
    }


COLUMNS = [("n_rows", "db + distractors", ","), ("reference_s", "full sort + compute_map (s)", ".2f"),
           ("reference_sort_s", "of which sort (s)", ".2f"), ("project_s", "project (s)", ".3f"),
           ("speedup", "speed-up", ".1f"), ("reference_peak_mib", "ref. peak (MiB)", ".0f"),
           ("project_peak_mib", "project peak (MiB)", ".0f"), ("index_matrix_mib", "N x 70 int64 ranks (MiB)", ".0f"),
           ("map_M", "mAP M (%)", ".2f"), ("map_H", "mAP H (%)", ".2f"), ("identical", "identical", "")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distractors", type=int, nargs="+", default=[0, 100_000],
                        help="distractor counts N (default 0 100000; the paper's setting is 1000000)")
    parser.add_argument("--queries", type=int, default=70, help="queries (70 in ROxford/RParis)")
    parser.add_argument("--database", type=int, default=5000, help="database images before distractors")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("--ties", type=int, default=32, help="distractor rows duplicating other rows")
    common.add_common_args(parser, repeats=3, warmup=1)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    device = common.setup(args)
    machine = common.machine_info(device)
    rows = [bench_size(args, n, device) for n in args.distractors]
    common.print_table(f"Ranking + mAP (E/M/H), {args.queries} queries, medians of {args.repeats} "
                       f"[{common.describe_machine(machine)}]", rows, COLUMNS)
    common.write_json(args.json, "ranking", args, machine, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
