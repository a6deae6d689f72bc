"""The whole method on the embedded toy data, end to end, through the real scripts.

    python tools/demo.py                      # CPU: a few minutes; a GPU is used when present
    python tools/demo.py --fast               # reduced sizes (the test suite runs this)

Steps: toy GLDv2 + revisited-Oxford data -> randomly initialised teachers written in the published file layouts
(NO real weights are shipped or downloaded) -> gld_pca_learn.py per teacher -> gld_distill.py (ResNet18, random
init) -> oxford_paris_eval.py for the whitened teachers, the student before and after distillation. Ends with a
table (parameters, GFLOPs, images/s, mAP E/M/H) and the path of a retrieval picture.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402

from datasets.oxford_paris import (  # noqa: E402
    ImageList,
    RevisitedDataset,
    evaluate_scores,
    medium_label,
    similarity,
)
from datasets.toy import make_toy_gld, make_toy_revisitop  # noqa: E402
from datasets.transforms import imagenet_normalize  # noqa: E402
from models.embedder import Embedder, build_embedder  # noqa: E402
from models.students import build_student, student_checkpoint_state  # noqa: E402
from models.teachers import TEACHER_FILES, TEACHERS, build_teacher, write_published_layout  # noqa: E402
from utils.argtypes import int_at_least, positive_int, seed_int  # noqa: E402
from utils.checkpoint import save_atomic  # noqa: E402
from utils.files import read_jsonl, write_json, write_text  # noqa: E402
from utils.runtime import count_gflops  # noqa: E402
from utils.training_plot import plot_training_metrics  # noqa: E402
from utils.visualize import save_retrieval_grid  # noqa: E402

DEMO_MARKER = ".whiten_mtd_demo"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="demo_out", help="folder for data, weights, checkpoints, results")
    parser.add_argument("--teachers", nargs="+", default=["mocov3", "barlowtwins"], choices=list(TEACHERS),
                        help="teacher architectures (random weights); ResNet50 ones keep the demo quick on CPU")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="distillation epochs (default 12, --fast 16)")
    parser.add_argument("--imsize", type=int_at_least(32), default=64,
                        help="image size of the toy data and training crops")
    parser.add_argument("--embed_dim", type=positive_int, default=32,
                        help="PCA / student dimension (small data, small dim)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--fast", action="store_true", help="reduced sizes (about 1.5 minutes on 2 CPU cores)")
    parser.add_argument("--save_asset", action="store_true", help="copy the retrieval picture to assets/")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    if args.epochs is None:
        # --fast, 16 epochs (32 steps): Medium mAP improves for seeds 0-4 and Hard for 0-3 (seed 4: -1.2); with
        # 8, seed 0 lost on both since the per-item augmentation seeds changed the random streams
        args.epochs = 16 if args.fast else 12
    return args


def run(script: str, *flags: object) -> None:
    cmd = [sys.executable, str(ROOT / script), *map(str, flags), "--no_progress"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def model_cost(model: torch.nn.Module, imsize: int, device: str) -> tuple[float, float, float]:
    """(parameters in M, GFLOPs per image, measured images/s) at ``imsize``."""
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    model = model.to(dev).eval()
    x = torch.randn(8, 3, imsize, imsize, device=dev)
    gflops = count_gflops(model, x[:1])
    with torch.inference_mode():
        model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rate = 3 * x.shape[0] / (time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return params, gflops, rate


@torch.inference_mode()
def comparison_rows(revisitop: Path, models: dict[str, Embedder], imsize: int, n_queries: int = 3,
                    top: int = 5) -> list[tuple]:
    """For the first ``n_queries`` queries with a Medium positive, one row per model: its Medium AP, the query and
    its ``top`` results (image, Medium label, rank, score), scored as ``oxford_paris_eval.py`` scores (single
    scale, cosine similarity)."""
    ds = RevisitedDataset(revisitop, "roxford5k")
    transform = T.Compose([T.ToTensor(), imagenet_normalize()])
    queries, database = ds.queries(transform, imsize), ds.database(transform, imsize)
    chosen = [q for q, g in enumerate(ds.gnd) if len(g["easy"]) + len(g["hard"])][:n_queries]
    ranked = {}
    for label, model in models.items():
        def embed(images: ImageList, model: Embedder = model) -> torch.Tensor:  # the images differ in size
            return torch.cat([model.single(images[i][0].unsqueeze(0)) for i in range(len(images))])

        scores = similarity(embed(database), embed(queries))
        best = scores.topk(min(top, scores.shape[0]), dim=0)
        ranked[label] = (evaluate_scores(scores, ds.gnd).aps["M"], best.indices.T.tolist(), best.values.T.tolist())
    shown_q, shown_db = ds.queries(imsize=imsize), ds.database(imsize=imsize)
    rows = []
    for q in chosen:
        for label, (aps, indices, values) in ranked.items():
            results = [(shown_db.load(i), medium_label(ds.gnd[q], i), r + 1, v)
                       for r, (i, v) in enumerate(zip(indices[q], values[q]))]
            rows.append((f"query {q}\n{label}\nAP {100 * aps[q]:.1f}", shown_q.load(q), results))
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    if work.exists() and any(work.iterdir()):  # the demo's own folder is remade; nothing else is ever deleted
        if not (work / DEMO_MARKER).is_file():
            raise SystemExit(f"tools/demo.py: error: --work_dir {work} exists and was not made by the demo; give a "
                             "new or empty folder (nothing is deleted)")
        shutil.rmtree(work)
    gld, rev, weights, ckpt, results = (work / n for n in ("gld", "revisitop", "weights", "ckpt", "results"))
    results.mkdir(parents=True)
    (work / DEMO_MARKER).write_text("made by tools/demo.py, which deletes and remakes this folder\n")
    n_landmarks, n_db, n_queries = (24, 36, 6) if args.fast else (64, 60, 12)
    common = ["--device", args.device, "--seed", args.seed, "--num_workers", 0, "--embed_dim", args.embed_dim]

    print(f"== toy data in {work}", flush=True)
    make_toy_gld(gld, n_landmarks=n_landmarks, imgs_per_landmark=4, size=args.imsize, seed=args.seed)
    make_toy_revisitop(rev, name="roxford5k", n_queries=n_queries, n_db=n_db, size=args.imsize, seed=args.seed)

    print("== teachers: RANDOM weights written in the published layouts (no real weights are shipped)", flush=True)
    teachers = {}
    for i, name in enumerate(args.teachers):
        torch.manual_seed(args.seed + i)
        teachers[name] = build_teacher(name)
        write_published_layout(name, teachers[name], weights / TEACHER_FILES[name])
        run("gld_pca_learn.py", "-t", name, "--gld_root_path", gld, "--path_to_pretrained_weights", weights,
            "--imsize", args.imsize, "--num_samples", -1, "-b", 32, *common)

    torch.manual_seed(args.seed)
    student_before = build_student("resnet18", embed_dim=args.embed_dim)
    save_atomic({"state_dict": student_checkpoint_state(student_before)}, ckpt / "student_before.pt")
    run("gld_distill.py", "-a", "resnet18", "-ts", *args.teachers, "-c", ckpt, "--gld_root_path", gld,
        "--path_to_pretrained_weights", weights, "--student_init", "random", "--imsize", args.imsize,
        "--epochs", args.epochs, "-b", 16, "--lr", 1e-3, "--snapshot_step", args.epochs, *common)

    training_plot = results / "distillation_metrics.png"
    plot_training_metrics(read_jsonl(ckpt / "metrics.jsonl"), training_plot, title="distillation (tools/demo.py)")

    evaluations = {f"teacher {n} + PCA": ["-t", n, "--pca"] for n in args.teachers}
    evaluations["student before (random init)"] = ["-a", "resnet18", "-r", ckpt / "student_before.pt"]
    evaluations["student after distillation"] = ["-a", "resnet18", "-r", ckpt / "checkpoint_last.pt",
                                                 "--visualize", results / "retrieval", "--visualize_top", 6]
    rows = []
    for label, flags in evaluations.items():
        out = results / ("_".join(w for w in label.split(" (")[0].split() if w != "+") + ".json")
        run("oxford_paris_eval.py", *flags, "-dp", rev, "--path_to_pretrained_weights", weights, "--imsize",
            args.imsize, "--output_json", out, *common)
        mAP = json.loads(out.read_text())["map"]
        model = teachers[flags[1]] if flags[0] == "-t" else student_before
        params, gflops, rate = model_cost(model, args.imsize, args.device)
        rows.append({"model": label, "params_M": params, "gflops": gflops, "images_per_s": rate, **mAP})

    models = {f"teacher {n}": build_embedder(teacher=n, pca=True, weights_dir=str(weights), embed_dim=args.embed_dim)
              for n in args.teachers}
    models["student"] = build_embedder("resnet18", str(ckpt / "checkpoint_last.pt"), embed_dim=args.embed_dim)
    comparison = save_retrieval_grid(results / "retrieval_comparison.png",
                                     comparison_rows(rev, models, args.imsize),
                                     title="toy ROxford: teachers (+ PCA) and the distilled student, Medium labels")

    table = [f"| model | params (M) | GFLOPs/img @{args.imsize}px | img/s | mAP E | mAP M | mAP H |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['params_M']:.1f} | {r['gflops']:.2f} | {r['images_per_s']:.0f} | "
              f"{r['E']:.2f} | {r['M']:.2f} | {r['H']:.2f} |" for r in rows]
    text = "\n".join(table)
    write_text(work / "demo_results.md", text + "\n")
    write_json(work / "demo_results.json", rows)
    pictures = sorted((results / "retrieval").glob("*.png"))
    print("\n" + text + "\n")
    print("teachers have random weights: the numbers show the mechanics (the student learns the fused whitened "
          "teachers' similarities), not the paper's accuracy.")
    print(f"retrieval picture: {comparison} (queries x the teachers and the student)")
    if pictures:
        print(f"retrieval strips of the student, one per query: {pictures[0].parent}")
    if args.save_asset:
        shutil.copy(comparison, ROOT / "assets" / "demo_retrieval.png")
    print(f"training plot (loss, lr, teachers' win shares): {training_plot}")
    print(f"results: {work / 'demo_results.md'}")
    return {"rows": rows, "pictures": [str(p) for p in pictures], "comparison": str(comparison),
            "training_plot": str(training_plot)}


if __name__ == "__main__":
    main()
