"""Reproduce the evaluations of the paper's tables and print them as markdown.

    python tools/paper_tables.py --data_path DATA --weights W --checkpoints CKPTS --svd_meta config/svd.yaml
    python tools/paper_tables.py ... --dry_run          # only print the commands

Each evaluation writes ``--output_json`` into ``--results_dir``; an existing JSON is read instead of re-run, so an
interrupted reproduction continues where it stopped. Released students are looked up in ``--checkpoints`` as
``<name>.pth``, ``<name>.pt`` or ``<name>/checkpoint*.pt*``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TEACHERS = ["resnet101_gem", "resnet101_ap_gem", "resnet101_solar", "resnet101_delg", "resnet101_dolg"]
VIDEO_TEACHERS = ["mocov3", "barlowtwins"]
IMAGE_STUDENTS = {"rg_rag_rs_to_r18_ep200": "resnet18", "ro_re_to_r18_ep3k": "resnet18",
                  "ro_re_to_r34_ep3k": "resnet34"}
VIDEO_STUDENTS = {"mc_bt_to_r18_ep3k": "resnet18", "mc_bt_to_r34_ep3k": "resnet34"}
IMAGE_DATASETS = ["roxford5k", "rparis6k"]


@dataclass
class Evaluation:
    table: str  # "image" or "video"
    model: str
    dataset: str
    command: list[str] = field(default_factory=list)

    @property
    def json_name(self) -> str:
        return f"{self.table}_{self.model}_{self.dataset}.json"


def find_checkpoint(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.pth", folder / f"{name}.pt", *sorted((folder / name).glob("checkpoint*.pt*"))):
        if candidate.is_file():
            return candidate
    return folder / f"{name}.pth"  # reported as missing when run


def plan(args: argparse.Namespace) -> list[Evaluation]:
    py = sys.executable
    image_common = ["-dp", args.data_path, "--embed_dim", "512", "-ms", "-p", "3"]
    if args.plus1m:
        image_common.append("--plus1m")
    video_common = ["-dm", args.svd_meta, "--sim_fn", "cf", "--embed_dim", "512"]
    evals = []
    for dataset in IMAGE_DATASETS:
        for t in IMAGE_TEACHERS:
            evals.append(Evaluation("image", t, dataset, [py, "oxford_paris_eval.py", "-t", t, "--pca", "-d", dataset,
                                                          "--path_to_pretrained_weights", args.weights, *image_common]))
        for name, arch in IMAGE_STUDENTS.items():
            ckpt = find_checkpoint(Path(args.checkpoints), name)
            evals.append(Evaluation("image", name, dataset, [py, "oxford_paris_eval.py", "-a", arch, "-r", str(ckpt),
                                                             "-d", dataset, *image_common]))
    for t in VIDEO_TEACHERS:
        evals.append(Evaluation("video", t, "svd", [py, "svd_eval.py", "-t", t, "--pca", "-p", "1",
                                                    "--path_to_pretrained_weights", args.weights, *video_common]))
    for name, arch in VIDEO_STUDENTS.items():
        ckpt = find_checkpoint(Path(args.checkpoints), name)
        evals.append(Evaluation("video", name, "svd", [py, "svd_eval.py", "-a", arch, "-r", str(ckpt), *video_common]))
    return evals


def render(results: dict[str, dict], evals: list[Evaluation]) -> str:
    """Markdown tables in the paper's layout: ROxf/RPar M/H for images, top-100/top-inf for SVD."""
    lines = ["| model | ROxf M | ROxf H | RPar M | RPar H |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(e.model for e in evals if e.table == "image"):
        cells = []
        for dataset in IMAGE_DATASETS:
            res = results.get(Evaluation("image", model, dataset).json_name)
            cells += [f"{res['map']['M']:.2f}", f"{res['map']['H']:.2f}"] if res else ["-", "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| model | SVD top-100 mAP | SVD top-inf mAP |", "|---|---|---|"]
    for model in dict.fromkeys(e.model for e in evals if e.table == "video"):
        res = results.get(Evaluation("video", model, "svd").json_name)
        cells = [f"{res['map']['top-100']:.4f}", f"{res['map']['top-inf']:.4f}"] if res else ["-", "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reproduce the paper's tables.")
    parser.add_argument("--data_path", default="/path/to/datasets", help="revisited Oxford/Paris root (-dp)")
    parser.add_argument("--weights", default="/path/to/pretrained_weights", help="teachers and pca_weights/")
    parser.add_argument("--checkpoints", default="/path/to/checkpoints", help="folder of the released students")
    parser.add_argument("--svd_meta", default="config/svd.yaml", help="SVD metadata yaml (-dm)")
    parser.add_argument("--results_dir", default="paper_results", help="where the evaluation JSONs go")
    parser.add_argument("--plus1m", action="store_true", help="evaluate with the 1M distractors")
    parser.add_argument("--only", choices=["image", "video"], default=None, help="only one of the two tables")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--read_only", action="store_true", help="only tabulate the JSONs already in --results_dir")
    return parser


def main(argv: list[str] | None = None) -> str:
    args = get_args_parser().parse_args(argv)
    evals = [e for e in plan(args) if args.only in (None, e.table)]
    results_dir = Path(args.results_dir)
    results = {}
    for e in evals:
        out = results_dir / e.json_name
        cmd = [*e.command, "--output_json", str(out)]
        if args.dry_run:
            print(" ".join(cmd))
            continue
        if not out.is_file() and args.read_only:
            continue
        if not out.is_file():
            results_dir.mkdir(parents=True, exist_ok=True)
            print("$ " + " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print(f"failed: {e.model} on {e.dataset} (see the message above); continuing", flush=True)
                continue
        results[e.json_name] = json.loads(out.read_text())
    if args.dry_run:
        return ""
    text = render(results, evals)
    print(text)
    return text


if __name__ == "__main__":
    main()
