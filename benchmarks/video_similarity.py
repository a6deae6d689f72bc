"""Video similarity (SVD): this project's chunked ``video_similarity`` against the paper's masked computation.

Q query and C candidate videos of up to F frames (D-d features, random lengths 1..F, zero-padded) are scored with
every ``sim_fn``:

* reference: the paper's way, re-implemented here: for a batch of candidates, one broadcast batched
  matmul builds the full (Q, C_batch, F, F) frame-similarity tensor, masks of the valid frames are filled with
  Python loops over the videos, masked entries become -inf (cf, smx) or 0 (sme), then the reduction;
  ``fme``/``fmx`` pool each video's frames (mask built in a loop), L2-normalise and take dot products;
* this project: ``datasets.svd.eval.video_similarity`` (``smx``/``cf``: one (Q*F, D) @ (D, C*F) product per chunk
  into a reused buffer, vectorised masks; ``sme``: the dot products of the frame sums, with no pairwise product).

Every run asserts that both agree (allclose, atol 1e-5).

    python benchmarks/video_similarity.py                                   # 100 x 500 x 60 x 512
    python benchmarks/video_similarity.py --queries 200 --candidates 2000   # the larger setting
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import common
from datasets.svd.eval import POOLED_SIM_FNS, SIM_FNS, video_descriptors, video_similarity


# ------------------------------------------------------------------------------------------------ synthetic data
def synthetic_videos(n_videos: int, max_frames: int, dim: int, g: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, F, D) zero-padded frame features and (N,) lengths in 1..F."""
    lens = torch.randint(1, max_frames + 1, (n_videos,), generator=g)
    feats = torch.randn(n_videos, max_frames, dim, generator=g)
    feats[torch.arange(max_frames)[None, :] >= lens[:, None]] = 0
    return feats, lens


def prepare(feats: torch.Tensor, lens: torch.Tensor, sim_fn: str) -> torch.Tensor:
    """What ``video_similarity`` takes: raw frames for the pooled functions, L2-normalised frames otherwise."""
    return feats if sim_fn in POOLED_SIM_FNS else video_descriptors(feats, lens, sim_fn)


# ------------------------------------------------------------------------------------------------ reference path
def _loop_mask(lens: torch.Tensor, max_frames: int) -> torch.Tensor:
    """(N, F) valid-frame mask, one video at a time (as the paper builds it)."""
    mask = torch.zeros(len(lens), max_frames, dtype=torch.bool)
    for i, n in enumerate(lens.tolist()):
        mask[i, :n] = True
    return mask


def reference_similarity(qfeats: torch.Tensor, qlens: torch.Tensor, cfeats: torch.Tensor, clens: torch.Tensor,
                         sim_fn: str, batch: int = 64) -> torch.Tensor:
    """The paper's masked computation, candidates ``batch`` at a time (its loader batch)."""
    qmask = _loop_mask(qlens, qfeats.shape[1]).to(qfeats.device)
    cmask = _loop_mask(clens, cfeats.shape[1]).to(cfeats.device)
    if sim_fn in POOLED_SIM_FNS:
        def pool(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            if sim_fn == "fme":
                return F.normalize((x * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1)
            return F.normalize(x.masked_fill(~m[..., None], float("-inf")).max(1).values, dim=-1)
        return pool(qfeats, qmask) @ pool(cfeats, cmask).T
    out = []
    for start in range(0, len(cfeats), batch):
        c, cm = cfeats[start:start + batch], cmask[start:start + batch]
        sims = torch.matmul(qfeats[:, None], c.transpose(1, 2)[None])  # (Q, Cb, F, F)
        pair_mask = qmask[:, None, :, None] & cm[None, :, None, :]
        if sim_fn == "sme":
            out.append(sims.masked_fill(~pair_mask, 0).sum((2, 3)) / pair_mask.sum((2, 3)))
        elif sim_fn == "smx":
            out.append(sims.masked_fill(~pair_mask, float("-inf")).amax((2, 3)))
        else:  # cf: max over candidate frames, mean over the valid query frames
            row_max = sims.masked_fill(~pair_mask, float("-inf")).amax(3)
            row_max = row_max.masked_fill(~qmask[:, None, :], 0)
            out.append(row_max.sum(2) / qmask.sum(1)[:, None])
    return torch.cat(out, dim=1)


def check_equal(qfeats: torch.Tensor, qlens: torch.Tensor, cfeats: torch.Tensor, clens: torch.Tensor,
                sim_fn: str, batch: int = 64) -> torch.Tensor:
    """Assert project == reference (allclose 1e-5) and return the project's similarities."""
    fast = video_similarity(qfeats, qlens, cfeats, clens, sim_fn)
    ref = reference_similarity(qfeats, qlens, cfeats, clens, sim_fn, batch)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{sim_fn}: {m}")
    return fast


def gflop(sim_fn: str, nq: int, nc: int, frames: int, dim: int, path: str) -> float:
    """Multiply-adds of the similarity products a path computes (padded frames included).

    The paper's frame-level path multiplies every (query frame, candidate frame) pair; so does the project for
    ``smx``/``cf``. The project's ``sme`` multiplies frame sums (mean of dot products = dot product of sums), one
    (Q, D) @ (D, C) product like ``fme``/``fmx``."""
    if sim_fn in POOLED_SIM_FNS or (sim_fn == "sme" and path == "project"):
        return 2 * nq * nc * dim / 1e9
    return 2 * nq * nc * frames * frames * dim / 1e9


# ------------------------------------------------------------------------------------------------ benchmark
def bench(args: argparse.Namespace, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    with common.stage("synthetic videos"):
        qraw, qlens = synthetic_videos(args.queries, args.frames, args.dim, g)
        craw, clens = synthetic_videos(args.candidates, args.frames, args.dim, g)
    return [bench_one(args, sim_fn, prepare(qraw, qlens, sim_fn).to(device), qlens,
                      prepare(craw, clens, sim_fn).to(device), clens, device) for sim_fn in args.sim_fns]


def bench_one(args: argparse.Namespace, sim_fn: str, q: torch.Tensor, qlens: torch.Tensor, c: torch.Tensor,
              clens: torch.Tensor, device: torch.device) -> dict:
    """Check, time (interleaved with the matmul peak probe) and measure the peak memory of both paths."""
    def project():
        return video_similarity(q, qlens, c, clens, sim_fn)

    def reference():
        return reference_similarity(q, qlens, c, clens, sim_fn, args.ref_batch)

    with common.stage(f"{sim_fn}: equality check"):
        check_equal(q, qlens, c, clens, sim_fn, args.ref_batch)
    probe, probe_flop = common.matmul_probe(device)
    times = common.time_interleaved({"project": project, "reference": reference, "matmul peak": probe},
                                    repeats=args.repeats, warmup=args.warmup, device=device)
    project_s, reference_s = common.median(times["project"]), common.median(times["reference"])
    peak = probe_flop / common.median(times["matmul peak"]) / 1e9
    sizes = (args.queries, args.candidates, args.frames, args.dim)
    work, ref_work = gflop(sim_fn, *sizes, path="project"), gflop(sim_fn, *sizes, path="paper")
    print(f"{sim_fn}: reference {reference_s:.3f} s, project {project_s:.3f} s", file=sys.stderr, flush=True)
    return {"sim_fn": sim_fn, "reference_gflop": ref_work, "project_gflop": work, "reference_s": reference_s,
            "project_s": project_s, "speedup": reference_s / project_s, "project_gflops": work / project_s,
            "matmul_peak_gflops": peak, "project_peak_frac": work / project_s / peak,
            "reference_peak_frac": ref_work / reference_s / peak,
            "project_peak_mib": common.mib(common.peak_memory(project, device)),
            "reference_peak_mib": common.mib(common.peak_memory(reference, device)),
            "project_runs_s": times["project"], "reference_runs_s": times["reference"], "equal": True}


COLUMNS = [("sim_fn", "sim_fn", ""), ("reference_gflop", "paper's GFLOP", ".2f"),
           ("project_gflop", "project GFLOP", ".2f"), ("reference_s", "paper's (s)", ".3f"),
           ("project_s", "project (s)", ".3f"), ("speedup", "speed-up", ".1f"),
           ("project_gflops", "project GFLOP/s", ".1f"), ("matmul_peak_gflops", "matmul peak GFLOP/s", ".0f"),
           ("project_peak_frac", "of matmul peak", ".0%"),
           ("reference_peak_frac", "paper's of peak", ".0%"), ("reference_peak_mib", "paper's peak (MiB)", ".0f"),
           ("project_peak_mib", "project peak (MiB)", ".0f"), ("equal", "equal (1e-5)", "")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100, help="query videos Q (default 100)")
    parser.add_argument("--candidates", type=int, default=500, help="candidate videos C (default 500)")
    parser.add_argument("--frames", type=int, default=60, help="max frames per video F (60 in the paper)")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument("--sim_fns", nargs="+", default=list(SIM_FNS), choices=SIM_FNS, help="similarities to time")
    parser.add_argument("--ref_batch", type=int, default=64, help="candidates per batch in the paper's path")
    common.add_common_args(parser, repeats=3, warmup=1)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    device = common.setup(args)
    machine = common.machine_info(device)
    rows = bench(args, device)
    title = (f"Video similarity, {args.queries} x {args.candidates} videos x {args.frames} frames x {args.dim}-d, "
             f"medians of {args.repeats}; float32 matmul peak timed alongside "
             f"[{common.describe_machine(machine)}]")
    common.print_table(title, rows, COLUMNS)
    common.write_json(args.json, "video_similarity", args, machine, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
