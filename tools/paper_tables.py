"""Reproduce the evaluations of the paper's tables and print them as markdown.

    python tools/paper_tables.py --data_path DATA --weights W --checkpoints CKPTS --svd_meta config/svd.yaml
    python tools/paper_tables.py ... --dry_run          # only print the commands

Each evaluation writes ``--output_json`` into ``--results_dir`` (named by table, model, dataset and +1M), with the
command that made it and the size and time of every file it read (checkpoint, teacher and PCA files, ground
truth). An existing JSON is read instead of re-run only when both still match, so an interrupted reproduction
continues where it stopped and a changed one is evaluated again. The exit code is 1 when an evaluation failed.
Released students are looked up in ``--checkpoints`` as ``<name>.pth``, ``<name>.pt`` or
``<name>/checkpoint*.pt*``.
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
from utils.launch import run_tool  # noqa: E402

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
    variant: str = ""  # "_plus1m" for the +1M protocol: its results never share a name with the plain ones

    def json_name(self, dataset: str) -> str:
        return f"{self.table}_{self.model}_{dataset}{self.variant}.json"

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
    variant = "_plus1m" if args.plus1m else ""
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
                                                           *image_common], variant))
        for name, arch in IMAGE_STUDENTS.items():
            ckpt = released_checkpoint(args.checkpoints, name)
            evals.append(Evaluation("image", name, datasets, [py, "oxford_paris_eval.py", "-a", arch, "-r", str(ckpt),
                                                              "-d", *datasets, *image_common], variant))
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
            res = results.get(f"image_{model}_{dataset}")
            cells += [f"{res['map']['M']:.2f}", f"{res['map']['H']:.2f}"] if res else ["-", "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| model | SVD top-100 mAP | SVD top-inf mAP |", "|---|---|---|"]
    for model in dict.fromkeys(e.model for e in evals if e.table == "video"):
        res = results.get(f"video_{model}_svd")
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


def provenance(e: Evaluation) -> dict:
    """What determines an evaluation's results: its command (without the interpreter and the output) and the size
    and modification time of every file it reads that the command names or implies."""
    from models.pca_layer import pca_weight_path
    from models.teachers import TEACHER_FILES

    command = e.command[1:]
    files = [Path(a) for a in command if Path(a).is_file()]
    if "-t" in command:
        teacher = command[command.index("-t") + 1]
        weights = Path(command[command.index("--path_to_pretrained_weights") + 1])
        files += [weights / TEACHER_FILES[teacher], pca_weight_path(weights, teacher, 512)]
    if "-dp" in command:
        root = Path(command[command.index("-dp") + 1])
        files += [root / d / f"gnd_{d}.pkl" for d in e.datasets] + [root / "revisitop1m" / "revisitop1m.txt"]
    stats = {}
    for f in files:
        try:
            st = f.stat()
            stats[str(f)] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stats[str(f)] = None
    return {"command": command, "files": stats}


def reusable(path: Path, made_by: dict, trust_unrecorded: bool) -> bool:
    """A results JSON that the same command made from the same files (or, tabulating only, one from before the
    record, when ``trust_unrecorded``)."""
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text()).get("paper_tables")
    except (ValueError, AttributeError):
        return False
    return recorded == made_by or (recorded is None and trust_unrecorded)


def main(argv: list[str] | None = None) -> str:
    args = get_args_parser().parse_args(argv)
    # the evaluations run in the repository: the paths given relative to where this tool was started are made
    # absolute, so that they mean the same there (the JSONs are read back from --results_dir here)
    for name in ("data_path", "weights", "checkpoints", "svd_meta", "results_dir", "feature_cache"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).absolute()))
    evals = [e for e in plan(args) if args.only in (None, e.table)]
    results_dir = Path(args.results_dir)
    results, extracted, read, failed = {}, 0, 0, []
    for e in evals:
        outputs = [results_dir / e.json_name(d) for d in e.datasets]
        cmd = [*e.command, "--output_json", str(results_dir / e.output)]
        if args.dry_run:
            print(" ".join(cmd))
            continue
        made_by = provenance(e)
        done = all(reusable(o, made_by, args.read_only) for o in outputs)
        if not done and args.read_only:
            continue
        if not done:
            stale = [o.name for o in outputs if o.is_file()]
            if stale:
                print(f"{', '.join(stale)}: made by another command or from files that changed since; evaluating "
                      "again", flush=True)
            results_dir.mkdir(parents=True, exist_ok=True)
            print("$ " + " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print(f"failed: {e.model} on {' '.join(e.datasets)} (see the message above); continuing", flush=True)
                failed.append(f"{e.model} on {' '.join(e.datasets)}")
                continue
            records = json.loads((results_dir / e.output).read_text())
            records = records if isinstance(records, list) else [records]
            store = records[0].get("feature_store") or {}
            extracted, read = extracted + len(store.get("extracted", [])), read + len(store.get("read", []))
            for out, record in zip(outputs, records):
                write_json(out, {**record, "paper_tables": made_by})
        for dataset, out in zip(e.datasets, outputs):
            results[f"{e.table}_{e.model}_{dataset}"] = json.loads(out.read_text())
    if args.dry_run:
        return ""
    text = render(results, evals)
    print(text)
    if args.feature_cache:
        print(f"\nfeature store {args.feature_cache}: {extracted} part(s) extracted, {read} read from the store")
    if failed:
        print(f"paper_tables.py: {len(failed)} of {len(evals)} evaluation(s) failed: {'; '.join(failed)}",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    return text


if __name__ == "__main__":
    run_tool(main)
