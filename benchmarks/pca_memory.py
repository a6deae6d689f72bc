"""PCA learning's peak memory per rank: the features all-gathered (the path before) against their sufficient
statistics (count, sum, X^T X in float64, one all-reduce; ``utils.features.feature_moments``).

N x D synthetic L2-normalised descriptors (D = 2048, a ResNet101 teacher's size) over 2 gloo ranks; each rank's
peak is measured around the extraction and the reduction to what the fit needs (the fit itself, one D x D
``eigh`` on rank 0, is the same in both paths). The gathered path grows linearly in N; the table extrapolates both
to GLDv2-clean's 1.58M images.

    python benchmarks/pca_memory.py                      # N = 2k, 8k, 32k (about 2 minutes on 2 cores)
    python benchmarks/pca_memory.py --items 2000 8000 --dim 512
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks import common
from utils.features import distributed_loader, feature_moments
from utils.launch import free_port, init_distributed

GLDV2_CLEAN = 1_580_470  # images of GLDv2-clean (the README's PCA command embeds them all)
WORLD = 2
COLUMNS = [("path", "path", ""), ("items", "N", ",d"), ("features_mib", "N x D float32 (MiB)", ".1f"),
           ("peak_mib", "peak per rank (MiB)", ".1f"), ("of_gather", "of the gathered path", ".1%")]


def synthetic_embed(dim: int):
    """``common.synthetic_embed`` L2-normalised, as a teacher's features are before PCA learning."""
    return lambda x: F.normalize(common.synthetic_embed(x, dim), dim=-1)


def _rank(local_rank: int, path: str, n: int, dim: int, dist_url: str, result: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed(local_rank, False, dist_url, 0, WORLD)
    common.map_large_allocations()
    try:
        embed = synthetic_embed(dim)
        with common.PeakMemory(torch.device("cpu")) as mem:
            if path == "gathered":  # every rank assembles every feature, as PCA learning did before
                items = common.Synthetic(n)
                loader = torch.utils.data.DataLoader(items, batch_size=256, sampler=torch.utils.data.DistributedSampler(
                    items, WORLD, local_rank, shuffle=False))
                feats = common.gather_all_features(embed, loader, n, ctx)
                x = feats - feats.mean(0, keepdim=True)
                _ = x.T @ x / n
            else:
                loader = distributed_loader(common.Synthetic(n), ctx, batch_size=256)
                moments = feature_moments(embed, loader, ctx, show_progress=False)
                _ = moments.gram / moments.count
        peaks: list = [None] * WORLD
        dist.all_gather_object(peaks, mem.peak_bytes)
        if ctx.is_main:
            Path(result).write_text(json.dumps(peaks))
    finally:
        dist.destroy_process_group()


def peak_per_rank(path: str, n: int, dim: int, work: Path) -> float:
    result = work / f"{path}_{n}.json"
    torch.multiprocessing.spawn(_rank, nprocs=WORLD, args=(path, n, dim, f"tcp://127.0.0.1:{free_port()}",
                                                           str(result)))
    return max(p for p in json.loads(result.read_text()) if p is not None) / common.MIB


def extrapolate(rows: list[dict], path: str, n: int) -> float:
    """The gathered path: linear in N through its two largest measurements; the moments: flat in N, so the
    largest measurement (the D x D sums and the loader's batches)."""
    measured = [(r["items"], r["peak_mib"]) for r in rows if r["path"] == path]
    if path == "moments":
        return max(m for _, m in measured)
    (n1, m1), (n2, m2) = measured[-2:]
    return m2 + (m2 - m1) / (n2 - n1) * (n - n2)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[2000, 8000, 32000], help="values of N")
    parser.add_argument("--dim", type=int, default=2048, help="descriptor size D")
    common.add_common_args(parser, repeats=1, warmup=0)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    device = common.setup(args)
    machine = common.machine_info(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("gathered", "moments"):
            for n in sorted(args.items):
                with common.stage(f"{path}, {n} x {args.dim}, {WORLD} gloo ranks"):
                    rows.append({"path": path, "items": n, "features_mib": n * args.dim * 4 / common.MIB,
                                 "peak_mib": peak_per_rank(path, n, args.dim, Path(tmp))})
    if len(args.items) >= 2:
        for path in ("gathered", "moments"):
            rows.append({"path": f"{path} (extrapolated)", "items": GLDV2_CLEAN,
                         "features_mib": GLDV2_CLEAN * args.dim * 4 / common.MIB,
                         "peak_mib": extrapolate(rows, path, GLDV2_CLEAN)})
    gathered = {r["items"]: r["peak_mib"] for r in rows if r["path"].startswith("gathered")}
    for row in rows:
        row["of_gather"] = row["peak_mib"] / gathered[row["items"]] if row["items"] in gathered else None
    common.print_table(f"PCA learning, peak memory per rank, D = {args.dim}, {WORLD} gloo ranks "
                       f"[{common.describe_machine(machine)}]", rows, COLUMNS)
    common.write_json(args.json, "pca_memory", args, machine, rows)
    return rows


if __name__ == "__main__":
    main()
