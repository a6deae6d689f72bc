"""Feature store: what it saves a user of the paper's tables, at CPU-sized scales.

(a) the second evaluation of a model against the first (``oxford_paris_eval.py`` as a user runs it: whole
    processes, wall time), toy ROxf of 2,000 database + 20,000 distractor images at 64 px, ResNet18; plus the
    float16 store's effect on mAP;
(b) peak memory per rank, 2 gloo processes, N x 2048 synthetic descriptors: the all-gather extraction
    (``benchmarks.common.gather_all_features``, how PCA learning gathered features before; measured at N/4 and N/2,
    extrapolated to N: at N = 200k it needs more
    memory than a 24 GiB machine has) against the shards of ``engine.features`` streamed into a +1M-style count
    (``datasets.ranking.HigherCounter``), at N and 2N;
(c) the paper's table plans (``tools/paper_tables.py``): how many times each model embeds R1M and the SVD videos,
    planned as the paper's README runs them and with the store, and counted in a run on toy data.

    python benchmarks/feature_store.py                  # all three (about 10 minutes on 2 cores)
    python benchmarks/feature_store.py --parts a --distractors 2000 --database 200
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from benchmarks import common
from datasets.ranking import HigherCounter
from utils.launch import free_port, init_distributed

ROOT = common.REPO_ROOT


# ------------------------------------------------------------------------------------------------------ (a)
def run_eval(data: Path, ckpt: Path, out: Path, *extra: str) -> tuple[float, dict]:
    cmd = [sys.executable, str(ROOT / "oxford_paris_eval.py"), "-a", "resnet18", "-r", str(ckpt), "-dp", str(data),
           "--imsize", "64", "--plus1m", "--num_workers", "2", "--no_progress", "--output_json", str(out), *extra]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexited with {res.returncode}:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
    return seconds, json.loads(out.read_text())


def second_evaluation(args: argparse.Namespace, work: Path) -> list[dict]:
    from datasets.toy import make_toy_revisitop
    from models.students import build_student, student_checkpoint_state

    data = work / "data"
    with common.stage(f"toy ROxf: {args.database} database + {args.distractors} distractor images"):
        make_toy_revisitop(data, "roxford5k", n_queries=20, n_db=args.database, size=64, seed=0,
                           n_distractors=args.distractors)
    torch.manual_seed(0)
    ckpt = work / "student.pt"
    torch.save({"state_dict": student_checkpoint_state(build_student("resnet18"))}, ckpt)
    rows = []
    plain_s, plain = run_eval(data, ckpt, work / "plain.json")
    rows.append({"run": "no store", "seconds": plain_s, "M": plain["map"]["M"], "H": plain["map"]["H"]})
    for dtype in ("float32", "float16"):
        store = work / f"store_{dtype}"
        first_s, first = run_eval(data, ckpt, work / f"first_{dtype}.json", "--feature_cache", str(store),
                                  "--cache_dtype", dtype)
        second_s, second = run_eval(data, ckpt, work / f"second_{dtype}.json", "--feature_cache", str(store),
                                    "--cache_dtype", dtype)
        disk = sum(p.stat().st_size for p in store.rglob("*.npy"))
        for name, seconds, rec in (("first (extracts)", first_s, first), ("second (reads)", second_s, second)):
            rows.append({"run": f"{name}, {dtype}", "seconds": seconds, "speedup": first_s / seconds,
                         "M": rec["map"]["M"], "H": rec["map"]["H"], "dM": rec["map"]["M"] - plain["map"]["M"],
                         "dH": rec["map"]["H"] - plain["map"]["H"], "disk_mib": disk / common.MIB})
    return rows


# ------------------------------------------------------------------------------------------------------ (b)
def _memory_rank(local_rank: int, path: str, n: int, procs: int, dist_url: str, store: str, result: str) -> None:

    from engine.features import Extraction, Part, PartExtractor

    torch.set_num_threads(1)
    ctx = init_distributed(local_rank, False, dist_url, 0, procs)
    common.map_large_allocations()
    queries = torch.nn.functional.normalize(common.synthetic_embed(torch.arange(70.0)[:, None] * 997), dim=1)
    try:
        with common.PeakMemory(torch.device("cpu")) as mem:
            if path == "all-gather":  # today's path: every rank assembles every descriptor, then scores
                items = common.Synthetic(n)
                loader = DataLoader(items, batch_size=1024, sampler=torch.utils.data.DistributedSampler(
                    items, procs, local_rank, shuffle=False))
                feats = common.gather_all_features(common.synthetic_embed, loader, n, ctx)
                scores = (queries @ torch.nn.functional.normalize(feats, dim=1).T)
                HigherCounter(scores[:, :8].contiguous(), [8] * 70).add(scores)
            else:  # the store: each rank writes and scores its shards, one at a time
                how = Extraction(store=str(store), progress=False)
                extractor = PartExtractor(common.synthetic_embed, ctx, how, {"model": "synthetic"})
                part = Part(f"synthetic {n}", common.Synthetic(n), [str(i) for i in range(n)], {}, batch_size=1024)
                counter = HigherCounter(queries[:, :8].contiguous(), [8] * 70)
                for shard in extractor.shards(part):
                    counter.add(queries @ torch.nn.functional.normalize(shard.feats, dim=1).T)
                dist.all_reduce(counter.counts)
        peaks = [None] * procs
        dist.all_gather_object(peaks, mem.peak_bytes)
        if ctx.is_main:
            Path(result).write_text(json.dumps(peaks))
    finally:
        dist.destroy_process_group()


def peak_per_rank(path: str, n: int, work: Path, procs: int = 2) -> list[int]:
    result = work / f"peaks_{path}_{n}.json"
    torch.multiprocessing.spawn(_memory_rank, nprocs=procs, args=(path, n, procs, f"tcp://127.0.0.1:{free_port()}",
                                                                  str(work / f"store_{n}"), str(result)))
    return json.loads(result.read_text())


def bounded_memory(args: argparse.Namespace, work: Path) -> list[dict]:
    """The all-gather path at N/4 and N/2 (at N it needs more than this machine's 24 GiB: about 8 GiB per rank of
    copies), extrapolated linearly to N; the store at N and 2N."""
    rows = []
    base = args.items
    for path, n in (("all-gather", base // 4), ("all-gather", base // 2), ("store", base), ("store", 2 * base)):
        with common.stage(f"{path}, {n} x 2048, 2 gloo ranks"):
            peaks = peak_per_rank(path, n, work)
        rows.append({"path": path, "items": n, "gib": n * 2048 * 4 / 2**30,
                     "peak_mib": max(p for p in peaks if p is not None) / common.MIB})
    slope = (rows[1]["peak_mib"] - rows[0]["peak_mib"]) / (rows[1]["items"] - rows[0]["items"])
    gather_at_n = rows[1]["peak_mib"] + slope * (base - rows[1]["items"])
    rows.insert(2, {"path": "all-gather (extrapolated)", "items": base, "gib": base * 2048 * 4 / 2**30,
                    "peak_mib": gather_at_n})
    for row in rows:
        row["of_all_gather"] = row["peak_mib"] / gather_at_n if row["items"] == base else None
    return rows


# ------------------------------------------------------------------------------------------------------ (c)
def table_plans(args: argparse.Namespace, work: Path) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tools"))
    import paper_tables

    parser = paper_tables.get_args_parser()
    fns = ["fme", "fmx", "sme", "smx", "cf"]
    rows = []
    paper = parser.parse_args(["--plus1m"])  # the paper's README: one run per model, dataset and sim_fn
    paper_plan = paper_tables.plan(paper)
    r1m_paper = sum("--plus1m" in e.command for e in paper_plan if e.table == "image")
    svd_models = len([e for e in paper_plan if e.table == "video"])
    store = parser.parse_args(["--plus1m", "--feature_cache", "FC", "--sim_fn", *fns])
    store_plan = paper_tables.plan(store)
    r1m_store = sum("--plus1m" in e.command for e in store_plan if e.table == "image")
    svd_store = len([e for e in store_plan if e.table == "video"])
    rows.append({"what": "R1M embedded (8 image models, 2 datasets)", "paper_plan": r1m_paper,
                 "store_plan": r1m_store})
    rows.append({"what": "SVD videos embedded (4 models, 5 sim_fns)", "paper_plan": svd_models * len(fns),
                 "store_plan": svd_store})
    if args.toy_tables:
        counted = toy_table_run(work, fns)
        rows[0]["toy_first_run"], rows[0]["toy_second_run"] = counted["distractors"]
        rows[1]["toy_first_run"], rows[1]["toy_second_run"] = counted["svd"]
    return rows


def toy_table_run(work: Path, fns: list[str]) -> dict[str, tuple[int, int]]:
    """paper_tables.py on toy data with random-weight models in the published layouts, run twice with one store;
    counts the distractor and SVD parts each run embedded (its JSON reports)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import helpers

    from datasets.toy import make_toy_revisitop, make_toy_svd
    from models.students import build_student, student_checkpoint_state

    data, ckpts = work / "tables_data", work / "tables_ckpts"
    with common.stage("toy data and random-weight models"):
        make_toy_revisitop(data, "roxford5k", n_queries=3, n_db=9, size=40, seed=0, n_distractors=6)
        make_toy_revisitop(data, "rparis6k", n_queries=3, n_db=9, size=40, seed=1)
        make_toy_svd(work / "tables_svd", n_queries=2, n_train_queries=1, positives=1, negatives=1, n_unlabeled=2,
                     frames=(2, 3), size=40, seed=2)
        weights = helpers.weights_dir(("resnet101_gem", "resnet101_ap_gem", "resnet101_solar", "resnet101_delg",
                                       "resnet101_dolg", "mocov3", "barlowtwins"))
        ckpts.mkdir(parents=True, exist_ok=True)
        for name, arch in {"rg_rag_rs_to_r18_ep200": "resnet18", "ro_re_to_r18_ep3k": "resnet18",
                           "ro_re_to_r34_ep3k": "resnet34", "mc_bt_to_r18_ep3k": "resnet18",
                           "mc_bt_to_r34_ep3k": "resnet34"}.items():
            torch.save({"state_dict": student_checkpoint_state(build_student(arch))}, ckpts / f"{name}.pth")
    counts = {"distractors": [], "svd": []}
    for run in ("first", "second"):
        results = work / f"tables_{run}"
        cmd = [sys.executable, str(ROOT / "tools" / "paper_tables.py"), "--data_path", str(data), "--weights",
               str(weights), "--checkpoints", str(ckpts), "--svd_meta", str(work / "tables_svd" / "svd.yaml"),
               "--results_dir", str(results), "--plus1m", "--feature_cache", str(work / "tables_store"),
               "--sim_fn", *fns]
        with common.stage(f"paper_tables.py, {run} run"):
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode != 0:
            raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
        reports = [json.loads(p.read_text()) for p in results.glob("*.run.json")]
        reports = [(r[0] if isinstance(r, list) else r)["feature_store"]["extracted"] for r in reports]
        counts["distractors"].append(sum("revisitop1m distractors" in r for r in reports))
        counts["svd"].append(sum("svd queries" in r for r in reports))
    return {k: tuple(v) for k, v in counts.items()}


COLUMNS_A = [("run", "run", ""), ("seconds", "wall (s)", ".1f"), ("speedup", "vs first", ".1f"),
             ("M", "mAP M", ".2f"), ("H", "mAP H", ".2f"), ("dM", "dM vs no store", "+.3f"),
             ("dH", "dH", "+.3f"), ("disk_mib", "store (MiB)", ".1f")]
COLUMNS_B = [("path", "path", ""), ("items", "descriptors", "d"), ("gib", "GiB of descriptors", ".2f"),
             ("peak_mib", "peak per rank (MiB)", ".0f"), ("of_all_gather", "of all-gather", ".3f")]
COLUMNS_C = [("what", "", ""), ("paper_plan", "as the paper's README", "d"), ("store_plan", "with the store", "d"),
             ("toy_first_run", "toy run 1", "d"), ("toy_second_run", "toy run 2", "d")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--database", type=int, default=2000, help="(a) database images")
    parser.add_argument("--distractors", type=int, default=20000, help="(a) distractor images")
    parser.add_argument("--items", type=int, default=200_000, help="(b) descriptors (then twice as many)")
    parser.add_argument("--no_toy_tables", dest="toy_tables", action="store_false",
                        help="(c) only count the plans, without the toy paper_tables run")
    parser.add_argument("--work_dir", default=None, help="keep the data and stores here (default: a temp dir)")
    common.add_common_args(parser, repeats=1, warmup=0)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    device = common.setup(args)
    machine = common.machine_info(device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "a" in args.parts:
            results["a"] = second_evaluation(args, work)
            common.print_table(f"(a) oxford_paris_eval.py, toy ROxf {args.database} + {args.distractors} images, "
                               f"64 px, ResNet18 [{common.describe_machine(machine)}]", results["a"], COLUMNS_A)
        if "b" in args.parts:
            results["b"] = bounded_memory(args, work)
            common.print_table(f"(b) peak memory per rank, 2 gloo ranks [{common.describe_machine(machine)}]",
                               results["b"], COLUMNS_B)
        if "c" in args.parts:
            results["c"] = table_plans(args, work)
            common.print_table("(c) embeddings of R1M and of the SVD videos for the paper's tables", results["c"],
                               COLUMNS_C)
    common.write_json(args.json, "feature_store", args, machine, results)
    return results


if __name__ == "__main__":
    main()
