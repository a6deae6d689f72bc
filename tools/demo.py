"""The whole method on the embedded toy data, end to end, through the real scripts.

    python tools/demo.py                      # CPU: a few minutes; a GPU is used when present
    python tools/demo.py --fast               # a cheaper distillation (the test suite runs this)

Steps: toy GLDv2 + revisited-Oxford data -> teachers trained for about 30 s each on the toy landmarks (NO real
weights are shipped or downloaded; engine/teacher_pretraining.py), written in the published file layouts ->
gld_pca_learn.py per teacher -> gld_distill.py (ResNet18, random init) -> oxford_paris_eval.py (standard protocol:
cropped queries) for the whitened teachers, the student before and after distillation (--fast: the latter only, the
others evaluated in-process by the same functions), plus the fused teachers.
Ends with a table (parameters, GFLOPs, images/s, mAP E/M/H) and the paths of a retrieval picture and a training plot.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datasets.gld import GLDPairDataset  # noqa: E402
from datasets.oxford_paris import ImageList, RevisitedDataset, medium_label  # noqa: E402
from datasets.revisitop import RevisitedResult, evaluate_scores, similarity  # noqa: E402
from datasets.toy import make_toy_gld, make_toy_revisitop  # noqa: E402
from datasets.transforms import imagenet_normalize  # noqa: E402
from engine.teacher_pretraining import AUGMENTS, PretrainRecipe, pretrain_teacher  # noqa: E402
from models.embedder import Embedder, build_embedder  # noqa: E402
from models.students import build_student, student_checkpoint_state  # noqa: E402
from models.teachers import TEACHER_FILES, TEACHERS, build_teacher, write_published_layout  # noqa: E402
from utils.argtypes import int_at_least, positive_int, seed_int  # noqa: E402
from utils.checkpoint import save_atomic  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import atomic_write, read_jsonl, write_json, write_text  # noqa: E402
from utils.launch import run_tool  # noqa: E402
from utils.runtime import count_gflops  # noqa: E402
from utils.training_plot import plot_training_metrics  # noqa: E402
from utils.visualize import save_retrieval_grid  # noqa: E402

DEMO_MARKER = ".whiten_mtd_demo"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="demo_out", help="folder for data, weights, checkpoints, results")
    parser.add_argument("--teachers", nargs="+", default=["mocov3", "barlowtwins"], choices=list(TEACHERS),
                        help="teacher architectures, trained briefly on the toy landmarks; the ResNet50 ones keep "
                        "the demo quick on CPU")
    parser.add_argument("--teacher_steps", type=positive_int, default=60,
                        help="training steps of each teacher on the toy landmarks (about 0.5 s each on 2 CPU "
                        "cores); fewer give weaker teachers and a weaker student")
    parser.add_argument("--epochs", type=positive_int, default=64,
                        help="distillation epochs (64 = 256 steps of 16 pairs)")
    parser.add_argument("--imsize", type=int_at_least(32), default=64,
                        help="image size of the toy data, of PCA learning and of the evaluation")
    parser.add_argument("--distill_imsize", type=int_at_least(16), default=None,
                        help="crop size of the distillation (default --imsize, as the paper; --fast 32, whose steps "
                        "take about 60%% of the time of 64 px ones)")
    parser.add_argument("--embed_dim", type=positive_int, default=32,
                        help="PCA / student dimension (small data, small dimension; the paper's 512 needs more "
                        "than 512 training images)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--fast", action="store_true",
                        help="distillation on 32 px crops, and all but the student evaluated in-process (about 3 "
                        "minutes on 2 CPU cores instead of 4; a weaker student)")
    parser.add_argument("--save_asset", action="store_true",
                        help="copy the retrieval picture to assets/ (how the README's was made)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    if args.distill_imsize is None:
        args.distill_imsize = 32 if args.fast else args.imsize
    if args.device == "cuda" and not torch.cuda.is_available():  # before the teachers train, not after
        get_args_parser().error("--device cuda was requested but no GPU is visible; use --device cpu")
    if Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        get_args_parser().error(f"--work_dir {args.work_dir} is a file; give a new or empty folder")
    return args


def run(script: str, *flags: object, log: Path, follow: Callable[[], None] | None = None) -> float:
    """``python script flags`` with its whole output in ``log`` (the console keeps one line per stage); ``follow``
    is called twice a second while it runs (the distillation's progress bar). Returns the seconds it took; a failure
    shows the end of its log and ends the demo with its exit code."""
    cmd = [sys.executable, str(ROOT / script), *map(str, flags), "--no_progress"]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd[1:]) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if follow is not None:
                    follow()
    if follow is not None:
        follow()
    if proc.returncode != 0:
        print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
        print(f"demo: {script} failed (exit code {proc.returncode}); its whole log: {log}", file=sys.stderr)
        raise SystemExit(proc.returncode)
    return time.perf_counter() - start


class TrainingBar:
    """A progress bar over a training run's epochs, read from its ``metrics.jsonl`` as it grows: the loss, lr and
    images/s of the latest iteration record."""

    def __init__(self, metrics: Path, epochs: int) -> None:
        self.metrics, self.offset = metrics, 0
        self.bar = tqdm(total=epochs, desc="   distillation", unit="epoch", file=sys.stderr, mininterval=0.5,
                        dynamic_ncols=True)

    def __call__(self) -> None:
        if not self.metrics.is_file():
            return
        with open(self.metrics, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[:text.rfind(b"\n") + 1]  # what follows the last newline may be a line still being written
        self.offset += len(complete)
        for record in map(json.loads, complete.splitlines()):
            if record["type"] == "iter":
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}",
                                     img_s=f"{record['images_per_s']:.0f}", refresh=False)
            elif record["type"] == "epoch":
                self.bar.update(1)

    def close(self) -> None:
        self()
        self.bar.close()


def model_cost(model: torch.nn.Module, imsize: int, device: torch.device) -> tuple[float, float, float]:
    """(parameters in M, GFLOPs per image, measured images/s) at ``imsize``."""
    model = model.to(device).eval()
    x = torch.randn(8, 3, imsize, imsize, device=device)
    gflops = count_gflops(model, x[:1])
    with torch.inference_mode():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = 3 * x.shape[0] / (time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return params, gflops, rate


@torch.inference_mode()
def revisited_descriptors(ds: RevisitedDataset, models: dict[str, Embedder],
                          imsize: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(queries, database) descriptors of each model, as ``oxford_paris_eval.py --crop_queries`` computes them
    (single scale)."""
    transform = T.Compose([T.ToTensor(), imagenet_normalize()])
    queries, database = ds.queries(transform, imsize, crop=True), ds.database(transform, imsize)

    def embed(model: Embedder, images: ImageList) -> torch.Tensor:  # one by one: the images differ in size
        return torch.cat([model.single(images[i][0].unsqueeze(0)) for i in range(len(images))])

    return {label: (embed(model, queries), embed(model, database)) for label, model in models.items()}


def fused(descriptors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers' L2-normalised descriptors concatenated: its cosine similarity is the mean of theirs."""
    return tuple(torch.cat([F.normalize(d[part], dim=1) for d in descriptors], dim=1) for part in (0, 1))


def evaluate_descriptors(ds: RevisitedDataset, descriptors: tuple[torch.Tensor, torch.Tensor]) -> RevisitedResult:
    """The revisited protocol's result for (queries, database) descriptors, scored as ``oxford_paris_eval.py``."""
    queries, database = descriptors
    return evaluate_scores(similarity(database, queries), ds.gnd)


def map_percent(result: RevisitedResult) -> dict[str, float]:
    """mAP E/M/H in percent, as ``oxford_paris_eval.py --output_json`` writes it."""
    return {mode: 100 * value for mode, value in result.map.items()}


def comparison_rows(ds: RevisitedDataset, shown: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], RevisitedResult]],
                    imsize: int, n_queries: int = 3, top: int = 5) -> list[tuple]:
    """For the first ``n_queries`` queries with a Medium positive, one row per model of ``shown`` (label ->
    (descriptors, their result)): its Medium AP, the (cropped) query and its ``top`` results (image, Medium label,
    rank, score)."""
    chosen = [q for q, g in enumerate(ds.gnd) if len(g["easy"]) + len(g["hard"])][:n_queries]
    ranked = {}
    for label, ((queries, database), result) in shown.items():
        scores = similarity(database, queries)
        best = scores.topk(min(top, scores.shape[0]), dim=0)
        ranked[label] = (result.aps["M"], best.indices.T.tolist(), best.values.T.tolist())
    shown_q, shown_db = ds.queries(imsize=imsize, crop=True), ds.database(imsize=imsize)
    rows = []
    for q in chosen:
        for label, (aps, indices, values) in ranked.items():
            results = [(shown_db.load(i), medium_label(ds.gnd[q], i), r + 1, v)
                       for r, (i, v) in enumerate(zip(indices[q], values[q]))]
            rows.append((f"query {q}\n{label}\nAP {100 * aps[q]:.1f}", shown_q.load(q), results))
    return rows


def save_asset(picture: Path, target: Path) -> None:
    """The README's copy in 256 colours (a fifth of the size; the repository keeps every version)."""
    with Image.open(picture) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    with atomic_write(target, "wb") as f:
        small.save(f, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    if work.exists() and any(work.iterdir()):  # the demo's own folder is remade; nothing else is ever deleted
        if not (work / DEMO_MARKER).is_file():
            raise UserError(f"--work_dir {work} exists and was not made by the demo; give a new or empty folder "
                            "(nothing is deleted)")
        shutil.rmtree(work)
    gld, rev, weights, ckpt, results, logs = (work / n for n in ("gld", "revisitop", "weights", "ckpt", "results",
                                                                 "logs"))
    results.mkdir(parents=True)
    (work / DEMO_MARKER).write_text("made by tools/demo.py, which deletes and remakes this folder\n")
    n_landmarks, n_db, n_queries = 64, 60, 12
    common = ["--device", args.device, "--seed", args.seed, "--num_workers", 0, "--embed_dim", args.embed_dim]

    make_toy_gld(gld, n_landmarks=n_landmarks, imgs_per_landmark=4, size=args.imsize, seed=args.seed)
    make_toy_revisitop(rev, name="roxford5k", n_queries=n_queries, n_db=n_db, size=args.imsize, seed=args.seed)
    print(f"== toy data in {work}: {n_landmarks} landmarks x 4 photos (GLDv2 layout), a revisited Oxford of "
          f"{n_queries} queries and {n_db} images, {args.imsize} px", flush=True)

    print(f"== teachers: random ResNets trained for {args.teacher_steps} steps each on the toy landmarks and written "
          "in the published layouts (no real weights are shipped), then whitened (gld_pca_learn.py, "
          f"{args.embed_dim}-d)", flush=True)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    landmarks = GLDPairDataset(gld)
    teachers = {}
    for i, name in enumerate(args.teachers):
        torch.manual_seed(args.seed + i)
        teachers[name] = build_teacher(name)
        recipe = PretrainRecipe(steps=args.teacher_steps, augment=AUGMENTS[i % len(AUGMENTS)])
        start = time.perf_counter()
        losses = pretrain_teacher(teachers[name], landmarks, recipe, seed=args.seed + i, device=device)
        trained = time.perf_counter() - start
        write_published_layout(name, teachers[name], weights / TEACHER_FILES[name])
        pca_s = run("gld_pca_learn.py", "-t", name, "--gld_root_path", gld, "--path_to_pretrained_weights", weights,
                    "--imsize", args.imsize, "--num_samples", -1, "-b", 32, *common,
                    log=logs / f"pca_learn_{name}.log")
        print(f"   {name}: augment {recipe.augment}, seed {args.seed + i}, InfoNCE loss {losses[0]:.2f} -> "
              f"{losses[-1]:.2f} in {trained:.0f} s; PCA learned in {pca_s:.0f} s", flush=True)

    torch.manual_seed(args.seed)
    student_before = build_student("resnet18", embed_dim=args.embed_dim)
    save_atomic({"state_dict": student_checkpoint_state(student_before)}, ckpt / "student_before.pt")
    print(f"== distillation (gld_distill.py): a ResNet18 from random init learns the fused whitened teachers' "
          f"similarities, {args.epochs} epochs on {args.distill_imsize} px crops, teachers read from their cache",
          flush=True)
    bar = TrainingBar(ckpt / "metrics.jsonl", args.epochs)
    run("gld_distill.py", "-a", "resnet18", "-ts", *args.teachers, "-c", ckpt, "--gld_root_path", gld,
        "--path_to_pretrained_weights", weights, "--student_init", "random", "--imsize", args.distill_imsize,
        "--epochs", args.epochs, "-b", 16, "--lr", 1e-3, "--snapshot_step", args.epochs, "--save_every", args.epochs,
        # checkpoints at the end only: a 135 MB write per epoch of 4 steps took a third of the distillation's time;
        # softer similarity targets than the paper's 0.05 suit a student from random init on 16-pair batches; the
        # teacher cache (4 views per image) makes a step about 3x cheaper on CPU
        "-tt", 0.1, "-st", 0.1, "--teacher_cache", work / "teacher_cache", "--teacher_views", 4, *common,
        log=logs / "distill.log", follow=bar)
    bar.close()

    training_plot = results / "distillation_metrics.png"
    plot_training_metrics(read_jsonl(ckpt / "metrics.jsonl"), training_plot, title="distillation (tools/demo.py)")

    # every model is embedded here too (the picture and the fused row need the descriptors); the table takes the
    # mAP that oxford_paris_eval.py writes, except that --fast runs the script for the distilled student only
    teacher_labels = {f"teacher {n} + PCA": n for n in args.teachers}
    student_checkpoints = {"student before (random init)": ckpt / "student_before.pt",
                           "student after distillation": ckpt / "checkpoint_last.pt"}
    evaluations = {label: ["-t", n, "--pca"] for label, n in teacher_labels.items()}
    evaluations.update({label: ["-a", "resnet18", "-r", path] for label, path in student_checkpoints.items()})
    evaluations["student after distillation"] += ["--visualize", results / "retrieval", "--visualize_top", 6]
    embedders = {label: build_embedder(teacher=n, pca=True, weights_dir=str(weights), embed_dim=args.embed_dim)
                 for label, n in teacher_labels.items()}
    embedders.update({label: build_embedder("resnet18", str(path), embed_dim=args.embed_dim)
                      for label, path in student_checkpoints.items()})
    ds = RevisitedDataset(rev, "roxford5k")
    descriptors = revisited_descriptors(ds, embedders, args.imsize)
    evaluated = {label: evaluate_descriptors(ds, d) for label, d in descriptors.items()}
    in_process = {label: map_percent(result) for label, result in evaluated.items()}
    scripted = ["student after distillation"] if args.fast else list(evaluations)
    print(f"== evaluation on the toy revisited Oxford, cropped queries (oxford_paris_eval.py: {', '.join(scripted)}"
          f"{'; the others in-process, by the same functions' if args.fast else ''})", flush=True)
    rows = []
    for label, flags in evaluations.items():
        mAP = in_process[label]
        if label in scripted:
            out = results / ("_".join(w for w in label.split(" (")[0].split() if w != "+") + ".json")
            run("oxford_paris_eval.py", *flags, "-dp", rev, "--path_to_pretrained_weights", weights, "--imsize",
                args.imsize, "--crop_queries", "--output_json", out, *common, log=logs / f"eval_{out.stem}.log")
            mAP = json.loads(out.read_text())["map"]
        model = teachers[teacher_labels[label]] if label in teacher_labels else student_before
        params, gflops, rate = model_cost(model, args.imsize, device)
        rows.append({"model": label, "params_M": params, "gflops": gflops, "images_per_s": rate, **mAP})
    if len(args.teachers) > 1:  # the fused teachers: every teacher's cost, the mean of their similarities
        teacher_rows = [r for r in rows if r["model"] in teacher_labels]
        rows.insert(len(args.teachers), {
            "model": "teachers fused (concatenated, + PCA)",
            "params_M": sum(r["params_M"] for r in teacher_rows), "gflops": sum(r["gflops"] for r in teacher_rows),
            "images_per_s": 1 / sum(1 / r["images_per_s"] for r in teacher_rows),
            **map_percent(evaluate_descriptors(ds, fused([descriptors[label] for label in teacher_labels])))})
    shown = {label.removesuffix(" + PCA"): (descriptors[label], evaluated[label]) for label in teacher_labels}
    shown["student"] = (descriptors["student after distillation"], evaluated["student after distillation"])
    comparison = save_retrieval_grid(results / "retrieval_comparison.png",
                                     comparison_rows(ds, shown, args.imsize),
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
    gflops = {r["model"]: r["gflops"] for r in rows}
    by_model = {r["model"]: r for r in rows}
    best = max(teacher_labels, key=lambda label: by_model[label]["M"])
    after, before = by_model["student after distillation"], by_model["student before (random init)"]
    all_teachers = sum(gflops[label] for label in teacher_labels)
    print(f"The distilled student reaches {after['M'] / by_model[best]['M']:.0%} of the best teacher's Medium mAP "
          f"({after['M']:.1f} against {by_model[best]['M']:.1f}; {before['M']:.1f} before distillation) at "
          f"{after['gflops'] / gflops[best]:.0%} of its cost, {after['gflops'] / all_teachers:.0%} of the "
          f"{len(teacher_labels)} teachers' together (toy teachers trained for {args.teacher_steps} steps: the "
          "method at work, not the paper's accuracy).")
    print(f"retrieval picture: {comparison} (queries x the teachers and the student)")
    if pictures:
        print(f"retrieval strips of the student, one per query: {pictures[0].parent}")
    if args.save_asset:
        save_asset(comparison, ROOT / "assets" / "demo_retrieval.png")
    print(f"training plot (loss, lr, teachers' win shares): {training_plot}")
    print(f"results: {work / 'demo_results.md'}; each script's whole log: {logs}")
    return {"rows": rows, "pictures": [str(p) for p in pictures], "comparison": str(comparison),
            "training_plot": str(training_plot), "in_process_map": in_process, "logs": str(logs)}


if __name__ == "__main__":
    run_tool(main)
