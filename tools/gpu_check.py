"""Check an install on a GPU node: the whole pipeline on toy data, through the real scripts, in a few minutes.

    python tools/gpu_check.py                 # on the first visible GPU
    python tools/gpu_check.py --device cpu    # the same steps on the CPU (the test suite runs this)

Steps (each prints PASS, FAIL or SKIP with its time): toy data and random teachers in the published layouts ->
gld_pca_learn.py and svd_pca_learn.py -> gld_distill.py online and from the teacher cache in fp32, fp16 and bf16
-> a training stopped by SIGTERM and resumed, against the same training uninterrupted (bitwise, with
--deterministic) -> oxford_paris_eval.py with -ms --plus1m --crop_queries --feature_cache --visualize on the
device (fp16 on a GPU) against the CPU in fp32, mAP side by side -> a teacher with --pca -> svd_distill.py and
svd_eval.py with every --sim_fn -> two ranks on the one device (gloo with device tensors; every collective handed a
host tensor is refused, as NCCL refuses it): training and evaluation. Ends with a summary; exit code 1 when any
step failed. No weights are read or downloaded: the teachers are random, so only the plumbing is checked, not the
quality.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TEACHERS = ("mocov3", "barlowtwins")  # the cheapest pair (ResNet50s)
TIMM_TEACHER = "timm:vit_tiny_patch16_224"  # a ViT with its own input normalisation, at the toy crop size
EMBED_DIM, IMSIZE, CROP = 32, 48, 32
SIM_FNS = ("fme", "fmx", "sme", "smx", "cf")
MAP_TOLERANCE = 3.0  # mAP points between the GPU in fp16 and the CPU in fp32 on 6 toy queries
RANK_FLAG = "--as_rank"  # internal: run one script as one rank with strict collectives (see ``as_rank``)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where the scripts run (the CPU reference of the evaluation runs on the CPU anyway)")
    parser.add_argument("--work_dir", default=None, metavar="DIR",
                        help="keep the data, checkpoints and logs here (default: a temporary folder, deleted)")
    parser.add_argument("--timeout", type=float, default=600, metavar="S", help="time limit of each step")
    return parser


@dataclass
class Step:
    name: str
    status: str  # PASS, FAIL, SKIP
    seconds: float
    detail: str = ""


@dataclass
class Check:
    """The steps run so far and where they work."""

    device: str
    work: Path
    timeout: float
    steps: list[Step] = field(default_factory=list)

    def start(self, *argv: object, env: dict[str, str] | None = None, launcher: list[str] | None = None
              ) -> subprocess.Popen:
        """``python argv...`` (or ``launcher argv...``) from the repository, its output appended to the step's log."""
        cmd = (launcher or [sys.executable]) + [str(a) for a in argv]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            full_env.pop(key, None)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def log(self) -> Path:
        return self.work / "logs" / f"{len(self.steps):02d}.log"

    def script(self, *argv: object, env: dict[str, str] | None = None, launcher: list[str] | None = None) -> None:
        """Run to the end; an exit code other than 0 fails the step with the end of the log."""
        proc = self.start(*argv, env=env, launcher=launcher)
        try:
            code = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        if code != 0:
            raise StepFailed(f"exit {code}: {' '.join(map(str, argv[:2]))} ...\n{tail(self.log)}")

    def step(self, name: str, run: Callable[[], str | None], skip: str | None = None) -> None:
        start = time.perf_counter()
        if skip:
            result = Step(name, "SKIP", 0.0, skip)
        else:
            try:
                result = Step(name, "PASS", 0.0, run() or "")
            except StepFailed as exc:
                result = Step(name, "FAIL", 0.0, str(exc))
            except subprocess.TimeoutExpired:
                result = Step(name, "FAIL", 0.0, f"did not end within {self.timeout:.0f} s")
            except Exception as exc:  # noqa: BLE001 - a check reports every failure and goes on
                result = Step(name, "FAIL", 0.0, f"{type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - start
        self.steps.append(result)
        detail = f"  {result.detail}" if result.detail else ""
        print(f"{result.status:4}  {name:<44} {result.seconds:6.1f} s{detail}", flush=True)


class StepFailed(Exception):
    pass


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join("      " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------- toy inputs
def make_inputs(work: Path) -> str:
    from datasets.toy import make_toy_gld, make_toy_revisitop, make_toy_svd
    from models.students import build_student, student_checkpoint_state
    from models.teachers import build_teacher, teacher_file, write_published_layout
    from utils.checkpoint import save_atomic

    make_toy_gld(work / "gld", n_landmarks=8, imgs_per_landmark=3, size=IMSIZE, seed=0)
    make_toy_revisitop(work / "data", "roxford5k", n_queries=6, n_db=18, size=IMSIZE, seed=0, n_distractors=6)
    make_toy_svd(work / "svd", n_queries=3, n_train_queries=3, positives=2, negatives=1, n_unlabeled=4,
                 frames=(2, 4), size=40, seed=0)
    for i, name in enumerate((*TEACHERS, TIMM_TEACHER)):
        torch.manual_seed(i)
        write_published_layout(name, build_teacher(name), teacher_file(name, work / "weights"))
    torch.manual_seed(0)
    save_atomic({"state_dict": student_checkpoint_state(build_student("resnet18", embed_dim=EMBED_DIM))},
                work / "student_random.pt")
    return f"in {work}"


# ------------------------------------------------------------------------------------------------------- steps
def run_check(args: argparse.Namespace, work: Path) -> list[Step]:
    dev = args.device
    check = Check(dev, work, args.timeout)
    common = ["--device", dev, "--num_workers", "0", "--no_progress"]
    weights = ["--path_to_pretrained_weights", work / "weights", "--embed_dim", EMBED_DIM]
    on_gpu = dev == "cuda"
    bf16 = (torch.cuda.is_bf16_supported() if on_gpu else True)

    check.step("toy data, random teachers", lambda: make_inputs(work))
    for teacher in TEACHERS:
        check.step(f"gld_pca_learn.py -t {teacher}", lambda t=teacher: check.script(
            "gld_pca_learn.py", "-t", t, "--gld_root_path", work / "gld", "--imsize", CROP, "--num_samples", -1,
            "-b", 8, "--overwrite", *weights, *common))
    check.step("svd_pca_learn.py (to a side file)", lambda: check.script(
        "svd_pca_learn.py", "-t", TEACHERS[0], "-dm", work / "svd" / "svd.yaml", "--frames_per_video", 2,
        "--dump_to", work / "svd_pca.pt", *weights, *common))

    def distill_argv(ckpt: str, *extra: object, teachers: tuple[str, ...] = TEACHERS) -> list:
        return ["gld_distill.py", "-a", "resnet18", "-ts", *teachers, "-c", work / "runs" / ckpt, "--gld_root_path",
                work / "gld", "--student_init", "random", "--imsize", CROP, "-b", 4, "--epochs", 1, "--log_every", 1,
                *weights, *common, *extra]

    def distill(ckpt: str, *extra: object, launcher: list[str] | None = None,
                teachers: tuple[str, ...] = TEACHERS) -> Path:
        check.script(*distill_argv(ckpt, *extra, teachers=teachers), launcher=launcher)
        return work / "runs" / ckpt

    distill.argv = distill_argv

    for amp, label in (("none", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")):
        skip = ("fp16 needs a GPU (the scripts refuse it on CPU)" if amp == "fp16" and not on_gpu else
                "this GPU has no bf16" if amp == "bf16" and not bf16 else None)
        check.step(f"gld_distill.py online, {label}", lambda a=amp: finished(distill(f"online_{a}", "--amp", a)),
                   skip)
        check.step(f"gld_distill.py from the teacher cache, {label}", lambda a=amp: finished(distill(
            f"cached_{a}", "--amp", a, "--teacher_cache", work / f"cache_{a}", "--teacher_views", 2)), skip)

    check.step(f"gld_pca_learn.py -t {TIMM_TEACHER}", lambda: check.script(
        "gld_pca_learn.py", "-t", TIMM_TEACHER, "--gld_root_path", work / "gld", "--imsize", CROP, "--num_samples",
        -1, "-b", 8, "--overwrite", *weights, *common))
    mixed_amp = "bf16" if bf16 else "none"
    check.step(f"gld_distill.py -ts {TEACHERS[0]} {TIMM_TEACHER}, {mixed_amp}", lambda: finished(distill(
        "timm", "--amp", mixed_amp, teachers=(TEACHERS[0], TIMM_TEACHER))))
    check.step("stop (SIGTERM) + resume == uninterrupted", lambda: stop_and_resume(check, distill))
    check.step("oxford_paris_eval.py, device vs CPU fp32", lambda: evaluate_student(check, work, common, on_gpu))
    check.step("oxford_paris_eval.py -t ... --pca", lambda: check.script(
        "oxford_paris_eval.py", "-t", TEACHERS[0], "--pca", "-dp", work / "data", "-ms", "--imsize", IMSIZE,
        *weights, *common, "--amp", "fp16" if on_gpu else "none"))
    check.step("svd_distill.py", lambda: check.script(
        "svd_distill.py", "-a", "resnet18", "-ts", *TEACHERS, "-c", work / "runs" / "svd", "-dm",
        work / "svd" / "svd.yaml", "--student_init", "random", "-b", 4, "--crop_size", CROP, "--epochs", 1,
        *weights, *common))
    check.step("svd_eval.py, every --sim_fn", lambda: evaluate_videos(check, "svd", weights, common))

    # Two ranks on the one device: every script again, its collectives checked (``as_rank``).
    ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(Path(__file__).resolve()), RANK_FLAG]
    check.step("2 ranks: gld_pca_learn.py", lambda: check.script(
        "gld_pca_learn.py", "-t", TEACHERS[0], "--gld_root_path", work / "gld", "--imsize", CROP, "--num_samples", 7,
        "-b", 2, "--dump_to", work / "pca_two_ranks.pt", *weights, *common, launcher=ranks))
    check.step("2 ranks: svd_pca_learn.py", lambda: check.script(
        "svd_pca_learn.py", "-t", TEACHERS[0], "-dm", work / "svd" / "svd.yaml", "--frames_per_video", 2,
        "--dump_to", work / "svd_pca_two_ranks.pt", *weights, *common, launcher=ranks))
    check.step("2 ranks: gld_distill.py online, -s maxrand", lambda: finished(distill(
        "two_ranks", "-b", 2, "-s", "maxrand", launcher=ranks)))
    cached = ["-b", 2, "--teacher_cache", work / "cache_two", "--teacher_views", 2]
    check.step("2 ranks: teacher cache, then resumed", lambda: distill("two_ranks_cached", *cached, launcher=ranks)
               and finished(distill("two_ranks_cached", *cached, "--epochs", 2, "-r", "auto", launcher=ranks)))
    check.step("2 ranks: oxford_paris_eval.py, every feature", lambda: check.script(
        "oxford_paris_eval.py", "-a", "resnet18", "-r", work / "runs" / "two_ranks" / "checkpoint_last.pt", "-dp",
        work / "data", "--imsize", IMSIZE, "-ms", "--plus1m", "--crop_queries", "--feature_cache", work / "fc_two",
        "--visualize", work / "pictures_two", *weights, *common, launcher=ranks))
    check.step("2 ranks: oxford_paris_eval.py -t ... --pca", lambda: check.script(
        "oxford_paris_eval.py", "-t", TEACHERS[0], "--pca", "-dp", work / "data", "--imsize", IMSIZE, *weights,
        *common, launcher=ranks))
    def svd_two_ranks() -> str:
        check.script("svd_distill.py", "-a", "resnet18", "-ts", *TEACHERS, "-c", work / "runs" / "svd_two", "-dm",
                     work / "svd" / "svd.yaml", "--student_init", "random", "-b", 2, "--crop_size", CROP, "--epochs",
                     1, *weights, *common, launcher=ranks)
        return evaluate_videos(check, "svd_two", weights, common, ranks)

    check.step("2 ranks: svd_distill.py + svd_eval.py", svd_two_ranks)
    return check.steps


def finished(folder: Path) -> str:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("type") == "epoch"]
    if not epochs or not (folder / "checkpoint_last.pt").is_file():
        raise StepFailed(f"{folder}: no epoch record or no checkpoint_last.pt")
    return f"loss {epochs[-1]['loss']:.4f}, {epochs[-1]['images_per_s']:.0f} img/s"


def stop_and_resume(check: Check, distill: Callable[..., Path]) -> str:
    """The same 3-epoch run, uninterrupted and stopped by SIGTERM after its first logged iteration then resumed
    with -r auto: the final weights must be equal bit for bit (--deterministic)."""
    from utils.checkpoint import load_file

    flags = ("--epochs", 3, "-s", "maxrand", "--deterministic")
    reference = distill("resume_reference", *flags)
    folder = check.work / "runs" / "resume_stopped"
    proc = check.start(*distill.argv("resume_stopped", *flags))
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + check.timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"type": "iter"' in metrics.read_text():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    code = proc.wait(timeout=check.timeout)
    if code not in (0, 75):
        raise StepFailed(f"the stopped run ended with exit code {code} (expected 75)")
    distill("resume_stopped", *flags, "-r", "auto")
    a = load_file(reference / "checkpoint_last.pt")["state_dict"]
    b = load_file(folder / "checkpoint_last.pt")["state_dict"]
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    if differing:
        raise StepFailed(f"{len(differing)} of {len(a)} tensors differ after the resume, e.g. {differing[0]}")
    return "stopped with exit 75, resumed, equal" if code == 75 else "ended before the signal; equal"


def evaluate_student(check: Check, work: Path, common: list, on_gpu: bool) -> str:
    """The distilled student with every evaluation feature, on the device (fp16 on a GPU, with a feature store
    read back by a second run) and on the CPU in fp32: mAP side by side."""
    ckpt = work / "runs" / "online_none" / "checkpoint_last.pt"
    flags = ["-a", "resnet18", "-r", ckpt, "-dp", work / "data", "--imsize", IMSIZE, "--embed_dim", EMBED_DIM,
             "-ms", "--plus1m", "--crop_queries", "--num_workers", "0", "--no_progress"]
    out = {}
    for run, extra in (("device", ["--device", check.device, "--amp", "fp16" if on_gpu else "none",
                                   "--feature_cache", work / "fc", "--visualize", work / "pictures"]),
                       ("store", ["--device", check.device, "--amp", "fp16" if on_gpu else "none",
                                  "--feature_cache", work / "fc"]),
                       ("cpu", ["--device", "cpu"])):
        check.script("oxford_paris_eval.py", *flags, *extra, "--output_json", work / f"eval_{run}.json")
        out[run] = json.loads((work / f"eval_{run}.json").read_text())["map"]
    if not any((work / "pictures").rglob("*.png")):
        raise StepFailed("--visualize wrote no picture")
    if out["store"] != out["device"]:
        raise StepFailed(f"the feature store's second run differs: {out['store']} vs {out['device']}")
    side = ", ".join(f"{m} {out['device'][m]:.2f}/{out['cpu'][m]:.2f}" for m in ("E", "M", "H"))
    worst = max(abs(out["device"][m] - out["cpu"][m]) for m in ("E", "M", "H"))
    tolerance = MAP_TOLERANCE if on_gpu else 1e-3
    if worst > tolerance:
        raise StepFailed(f"mAP {check.device} vs cpu fp32 differ by {worst:.2f} points: {side}")
    return f"mAP {check.device}/cpu {side}"


def evaluate_videos(check: Check, run: str, weights: list, common: list, launcher: list[str] | None = None) -> str:
    out = check.work / f"{run}_eval.json"
    check.script("svd_eval.py", "-a", "resnet18", "-r", check.work / "runs" / run / "checkpoint_last.pt", "-dm",
                 check.work / "svd" / "svd.yaml", "--sim_fn", *SIM_FNS, "--max_frames", 4, *weights, *common,
                 "--output_json", out, launcher=launcher)
    return "top-inf mAP " + ", ".join(f"{r['sim_fn']} {r['map']['top-inf']:.3f}" for r in json.loads(out.read_text()))


# ----------------------------------------------------------------------------------------- one rank, strictly
def as_rank(argv: list[str]) -> None:
    """One rank of a two-rank run on one device: the process group is gloo (NCCL refuses two ranks on one GPU), and
    every collective is refused when handed a tensor in host memory, as NCCL refuses it."""
    import torch.distributed as dist

    init = dist.init_process_group

    def gloo_group(*args: object, **kwargs: object) -> None:
        kwargs["backend"] = "gloo"
        kwargs.pop("device_id", None)
        init(*args, **kwargs)

    dist.init_process_group = gloo_group
    inside_object_collective = [0]  # those place their own buffers (in host memory under gloo, by design)

    def strict(name: str, original: Callable) -> Callable:
        def collective(*args: object, **kwargs: object) -> object:
            tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, list) else [a])
                       if isinstance(t, torch.Tensor)]
            if not inside_object_collective[0] and any(not t.is_cuda for t in tensors):
                raise RuntimeError(f"{name} was handed a tensor in host memory (NCCL refuses it)")
            return original(*args, **kwargs)
        return collective

    def objects(original: Callable) -> Callable:
        def collective(*args: object, **kwargs: object) -> object:
            inside_object_collective[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                inside_object_collective[0] -= 1
        return collective

    if os.environ.get("GPU_CHECK_DEVICE") == "cuda":  # on the CPU the device harness does this job
        c10d = dist.distributed_c10d
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter"):
            wrapped = strict(name, getattr(c10d, name))
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
        for name in ("all_gather_object", "broadcast_object_list", "gather_object"):
            wrapped = objects(getattr(c10d, name))
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
    sys.argv = argv
    runpy.run_path(str(ROOT / argv[0]), run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == RANK_FLAG:
        as_rank(argv[1:])
        return 0
    args = get_args_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        get_args_parser().error("no GPU is visible (torch.cuda.is_available() is False); check the driver and "
                                "CUDA_VISIBLE_DEVICES, or run --device cpu")
    os.environ["GPU_CHECK_DEVICE"] = args.device
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"gpu_check: torch {torch.__version__}, {where}"
          + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if args.device == "cuda" else ""),
          flush=True)
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        steps = run_check(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [s for s in steps if s.status == "FAIL"]
    counts = {status: sum(s.status == status for s in steps) for status in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - start:.0f} s on {where}", flush=True)
    for s in failed:
        print(f"FAILED {s.name}:\n{s.detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
