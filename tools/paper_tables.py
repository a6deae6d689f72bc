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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.released import RELEASED_STUDENTS, released_checkpoint  # noqa: E402
from utils.argtypes import output_dir  # noqa: E402
from utils.files import write_json  # noqa: E402

IMAGE_TEACHERS = ["resnet101_gem", "resnet101_ap_gem", "resnet101_solar", "resnet101_delg", "resnet101_dolg"]
VIDEO_TEACHERS = ["mocov3", "barlowtwins"]
IMAGE_STUDENTS = {name: arch for name, (arch, data) in RELEASED_STUDENTS.items() if data == "gldv2"}
VIDEO_STUDENTS = {name: arch for name, (arch, data) in RELEASED_STUDENTS.items() if data == "svd"}
IMAGE_DATASETS = ["roxford5k", "rparis6k"]


@dataclass
class Evaluation:
    """One run of an evaluation script; its records fill one results JSON per (model, dataset or sim_fn)."""

    table: str  # "image" or "video"
    model: str
    datasets: list[str]  # image: roxford5k/rparis6k; video: svd (cf, the paper's table) or svd_<sim_fn>
    command: list[str] = field(default_factory=list)

    def json_name(self, dataset: str) -> str:
        return f"{self.table}_{self.model}_{dataset}.json"

    @property
    def output(self) -> str:
        """The run's own --output_json: the record itself for one dataset, a list for several."""
        return self.json_name(self.datasets[0]) if len(self.datasets) == 1 else f"{self.table}_{self.model}.run.json"


def video_names(sim_fns: list[str]) -> list[str]:
    return ["svd" if fn == "cf" else f"svd_{fn}" for fn in sim_fns]


def plan(args: argparse.Namespace) -> list[Evaluation]:
    """The paper's evaluations. Without --feature_cache one run per model and dataset, as the paper's README; with
    it one run per model for both datasets (the distractors are embedded once) and for every --sim_fn."""
    py = sys.executable
    image_common = ["-dp", args.data_path, "--embed_dim", "512", "-ms", "-p", "3"]
    video_common = ["-dm", args.svd_meta, "--sim_fn", *args.sim_fn, "--embed_dim", "512"]
    if args.plus1m:
        image_common.append("--plus1m")
    if args.feature_cache:
        image_common += ["--feature_cache", args.feature_cache]
        video_common += ["--feature_cache", args.feature_cache]
    evals = []
    for datasets in [IMAGE_DATASETS] if args.feature_cache else [[d] for d in IMAGE_DATASETS]:
        for t in IMAGE_TEACHERS:
            evals.append(Evaluation("image", t, datasets, [py, "oxford_paris_eval.py", "-t", t, "--pca", "-d",
                                                           *datasets, "--path_to_pretrained_weights", args.weights,
                                                           *image_common]))
        for name, arch in IMAGE_STUDENTS.items():
            ckpt = released_checkpoint(args.checkpoints, name)
            evals.append(Evaluation("image", name, datasets, [py, "oxford_paris_eval.py", "-a", arch, "-r", str(ckpt),
                                                              "-d", *datasets, *image_common]))
    video_models = [(t, ["-t", t, "--pca", "-p", "1", "--path_to_pretrained_weights", args.weights])
                    for t in VIDEO_TEACHERS]
    video_models += [(name, ["-a", arch, "-r", str(released_checkpoint(args.checkpoints, name))])
                     for name, arch in VIDEO_STUDENTS.items()]
    evals += [Evaluation("video", model, video_names(args.sim_fn), [py, "svd_eval.py", *flags, *video_common])
              for model, flags in video_models]
    return evals


def render(results: dict[str, dict], evals: list[Evaluation]) -> str:
    """Markdown tables in the paper's layout: ROxf/RPar M/H for images, top-100/top-inf (cf) for SVD."""
    lines = ["| model | ROxf M | ROxf H | RPar M | RPar H |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(e.model for e in evals if e.table == "image"):
        cells = []
        for dataset in IMAGE_DATASETS:
            res = results.get(f"image_{model}_{dataset}.json")
            cells += [f"{res['map']['M']:.2f}", f"{res['map']['H']:.2f}"] if res else ["-", "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| model | SVD top-100 mAP | SVD top-inf mAP |", "|---|---|---|"]
    for model in dict.fromkeys(e.model for e in evals if e.table == "video"):
        res = results.get(f"video_{model}_svd.json")
        cells = [f"{res['map']['top-100']:.4f}", f"{res['map']['top-inf']:.4f}"] if res else ["-", "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reproduce the paper's tables.")
    parser.add_argument("--data_path", default="/path/to/datasets", help="revisited Oxford/Paris root (-dp)")
    parser.add_argument("--weights", default="/path/to/pretrained_weights", help="teachers and pca_weights/")
    parser.add_argument("--checkpoints", default="/path/to/checkpoints", help="folder of the released students")
    parser.add_argument("--svd_meta", default="config/svd.yaml", help="SVD metadata yaml (-dm)")
    parser.add_argument("--results_dir", default="paper_results", type=output_dir, help="where the evaluation JSONs go")
    parser.add_argument("--plus1m", action="store_true", help="evaluate with the 1M distractors")
    parser.add_argument("--only", choices=["image", "video"], default=None, help="only one of the two tables")
    parser.add_argument("--feature_cache", default=None, metavar="DIR", type=output_dir,
                        help="feature store of the evaluations: each part is embedded once per model (one run per "
                             "model for both datasets, so the distractors once), later runs read it")
    parser.add_argument("--sim_fn", nargs="+", default=["cf"], choices=["fme", "fmx", "sme", "smx", "cf"],
                        help="SVD similarity functions, all from one extraction (the table shows cf, the paper's)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--read_only", action="store_true", help="only tabulate the JSONs already in --results_dir")
    return parser


def main(argv: list[str] | None = None) -> str:
    args = get_args_parser().parse_args(argv)
    # the evaluations run in the repository: the paths given relative to where this tool was started are made
    # absolute, so that they mean the same there (the JSONs are read back from --results_dir here)
    for name in ("data_path", "weights", "checkpoints", "svd_meta", "results_dir", "feature_cache"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).absolute()))
    evals = [e for e in plan(args) if args.only in (None, e.table)]
    results_dir = Path(args.results_dir)
    results, extracted, read = {}, 0, 0
    for e in evals:
        outputs = [results_dir / e.json_name(d) for d in e.datasets]
        cmd = [*e.command, "--output_json", str(results_dir / e.output)]
        if args.dry_run:
            print(" ".join(cmd))
            continue
        done = all(o.is_file() for o in outputs)
        if not done and args.read_only:
            continue
        if not done:
            results_dir.mkdir(parents=True, exist_ok=True)
            print("$ " + " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print(f"failed: {e.model} on {' '.join(e.datasets)} (see the message above); continuing", flush=True)
                continue
            records = json.loads((results_dir / e.output).read_text())
            records = records if isinstance(records, list) else [records]
            store = records[0].get("feature_store") or {}
            extracted, read = extracted + len(store.get("extracted", [])), read + len(store.get("read", []))
            for out, record in zip(outputs, records):
                if out != results_dir / e.output:
                    write_json(out, record)
        for dataset, out in zip(e.datasets, outputs):
            results[e.json_name(dataset)] = json.loads(out.read_text())
    if args.dry_run:
        return ""
    text = render(results, evals)
    print(text)
    if args.feature_cache:
        print(f"\nfeature store {args.feature_cache}: {extracted} part(s) extracted, {read} read from the store")
    return text


if __name__ == "__main__":
    main()
