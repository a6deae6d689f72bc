"""The parameters of the four flows (training, PCA learning, image and video evaluation), each flag declared once.

Every field below is a flag of the scripts (``utils.flags.flag``): its names (the paper's, short forms kept), check,
help and default, and the roles it plays. From these declarations alone come the parser (``--help`` shows each
default), the resume rules of training (``engine.resume``), the teacher-cache key (``engine.teacher_cache``), the
feature-store key and the JSON ``protocol`` of the evaluations, and ``config.yaml``. To add a flag, add a field here:
nothing else lists it.

The dataclasses are also the Python API: ``GLDTrainParams(teachers=[...], ckpt_dir=..., ...)`` runs with
``engine.run.run(params)``; values given from Python are checked as the parser checks them (``UsageError``).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from datasets.gld import CSV_NAME, IDS_NAME
from datasets.oxford_paris import DATASETS
from datasets.sampler import MIN_BATCH
from datasets.svd.eval import DEFAULT_MAX_ELEMENTS, SIM_FNS
from models.embedder import EmbedderConfigError, check_model_flags
from models.loss import STRATEGIES
from models.pca_layer import pca_weight_path
from models.students import check_student_arch
from models.teachers import NAMES_HELP, TEACHER_POOLS, check_embed_dim, check_teacher_name, check_teacher_pool
from models.timm_names import is_timm_name
from utils.argtypes import (
    INPUT_TYPES,
    PathCheckingParser,
    checked_by,
    existing_dir,
    existing_file,
    int_at_least,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    rendezvous_url,
    seed_int,
)
from utils.errors import UsageError
from utils.feature_store import DTYPES
from utils.files import sha256_file
from utils.flags import FREE, MAY_CHANGE, MUST_MATCH, add_flags, check_values, flag, from_namespace, redefault
from utils.run_dir import LAST_CHECKPOINT
from utils.runtime import AMP_CHOICES, AMP_HELP
from utils.tensorboard import check_tensorboard

WEIGHTS_DEFAULT = "/path/to/pretrained_weights"
PAPER_SVD_TEMPERATURE = 0.05


def resume_path(value: str) -> str:
    """``-r`` of training: ``auto`` or a checkpoint file that exists."""
    return value if value == "auto" else existing_file(value)


INPUT_TYPES.add(resume_path)


def resolved(value: Any, params: Any = None) -> str:
    """A folder as keys see it: another root holds other images under the same names."""
    return str(Path(value).resolve())


def _student_only(value: Any, params: Any) -> Any:
    """The output dimension changes a student's or a whitened teacher's descriptors, never a bare teacher's."""
    return value if (params.arch is not None or params.pca) else None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help already names it); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------------------ shared by every flow
@dataclasses.dataclass
class LaunchParams:
    """How the ranks are started and what every run shares (the paper's --world_size/--rank/--dist_url, and ours)."""

    world_size: int | None = flag(
        "--world_size", type=positive_int, group="launch", resume=FREE,
        help="total number of processes (default: taken from torchrun, else one per visible GPU)")
    nproc_per_node: int | None = flag(
        "--nproc_per_node", type=positive_int, group="launch", resume=FREE,
        help="processes this node starts (default: one per visible GPU, or 1 on the CPU; on the CPU more runs several "
             "gloo processes, e.g. under srun with one task per node)")
    rank: int = flag("--rank", type=nonnegative_int, default=0, group="launch", resume=FREE,
                     help="node rank, for a manual multi-node launch")
    dist_url: str = flag(
        "--dist_url", type=rendezvous_url, default="env://", group="launch", resume=FREE,
        help="rendezvous URL of a manual multi-node launch, e.g. tcp://HOST:PORT of node 0 (env://: torchrun's "
             "variables, or a free local port on one node)")
    device: str = flag("--device", default="auto", choices=("auto", "cuda", "cpu"), group="launch", resume=FREE,
                       help="auto: every visible GPU if there is one, else the CPU")
    seed: int = flag("--seed", type=seed_int, default=0, group="launch", resume=MUST_MATCH, teacher_cache=True,
                     help="seed of every random generator")
    amp: str = flag("--amp", default="none", choices=AMP_CHOICES, group="launch", resume=MAY_CHANGE,
                    teacher_cache=True, store=True, protocol=True, help=AMP_HELP)
    no_progress: bool = flag("--no_progress", switch=True, default=False, group="launch", resume=FREE,
                             help="no progress bars (logs only)")
    trust_checkpoint: bool = flag(
        "--trust_checkpoint", switch=True, default=False, group="launch", resume=FREE,
        help="load weight files with full unpickling, for files you trust that a safe load refuses")

    description: ClassVar[str] = ""
    epilog: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        check_values(self)
        self.check()

    def check(self) -> None:
        """Checks that involve several flags (``UsageError``); the flows' own."""


def deterministic_flag() -> Any:
    return flag("--deterministic", switch=True, default=False, group="launch", resume=FREE,
                help="reproducible GPU results: deterministic algorithms and cuDNN kernels, no cuDNN autotuning, TF32 "
                     "off (slower). Use it to compare runs bit for bit on one GPU model; a CPU run is reproducible "
                     "without it. Default: cuDNN autotunes the fixed-size crops")


def weights_flag() -> Any:
    return flag("--path_to_pretrained_weights", default=WEIGHTS_DEFAULT, metavar="DIR", group="model", resume=FREE,
                help="folder of the published teacher files, timm/<model>.safetensors and pca_weights/")


def _gem_p_used(value: float, params: Any) -> float | None:
    """-p changes the descriptors of a student and of any GeM teacher, not a timm teacher's pre-logits embedding."""
    teachers = getattr(params, "teachers", None) or ([params.teacher] if getattr(params, "teacher", None) else [])
    uses_gem = getattr(params, "arch", None) is not None and not hasattr(params, "teachers")  # an evaluated student
    uses_gem |= any(not is_timm_name(name) or params.teacher_pool == "gem" for name in teachers)
    return value if uses_gem else None


def gem_p_flag(default: float) -> Any:
    return flag("-p", type=positive_float, default=default, group="model", resume=MUST_MATCH, teacher_cache=True,
                store=True, protocol="gem_p", key=_gem_p_used,
                help="GeM power of the student and the teachers (the paper: 3 for GLDv2 and ROxf/RPar, 1 for SVD; it "
                     "replaces the teachers' learned exponents)")


def teacher_pool_flag(**roles: Any) -> Any:
    return flag("--teacher_pool", default="pre_logits", choices=TEACHER_POOLS, group="model",
                help="descriptor of the timm: teachers: pre_logits, the model's own pooled embedding (a ViT's CLS "
                     "token, a CNN's pool and norm: what it was trained to output), or gem, GeM(-p) over the patch "
                     "tokens or the last feature map (try it when the pre-logits embedding retrieves poorly, e.g. on "
                     "small landmarks). Each pooling has its own PCA file. The paper's teachers always use GeM",
                **roles)


def num_workers_flag() -> Any:
    return flag("--num_workers", type=nonnegative_int, default=8, group="data", resume=FREE,
                help="data loader workers per process")


def gld_root_flag() -> Any:
    return flag("--gld_root_path", default="/path/to/gldv2", metavar="PATH", type=existing_dir, group="data",
                resume=MAY_CHANGE, teacher_cache=True, key=resolved,
                help="GLDv2 root: meta/train_clean.csv, meta/train_clean_ids.txt, train/a/b/c/<id>.jpg")


def svd_meta_flag(**roles: Any) -> Any:
    return flag("-dm", "--dataset_meta", default="config/svd.yaml", metavar="FILE", type=existing_file, group="data",
                help="SVD metadata yaml (the keys of config/svd.yaml)", **roles)


def crop_size_flag(what: str, **roles: Any) -> Any:
    return flag("--crop_size", type=positive_int, default=224, group="data",
                help=f"{what} (the paper: 224; smaller only for quick tests)", **roles)


def _frame_root(value: str, params: Any = None) -> str:
    """The SVD metadata as the teacher cache sees it: where the frames are read (the training list itself enters
    the key as the items' fingerprint)."""
    from datasets.svd.meta import SVDMeta

    return resolved(SVDMeta.from_yaml(value).frame_root)


# ------------------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class TrainParams(LaunchParams):
    """Multi-teacher distillation (gld_distill.py, svd_distill.py)."""

    arch: str = flag("-a", "--arch", default="resnet18", metavar="ARCH", type=checked_by(check_student_arch),
                     group="model", resume=MUST_MATCH,
                     help="student: resnet18, resnet34 or timm:<model name> (any timm CNN, e.g. "
                          "timm:mobilenetv3_large_100, with the same GeM head)")
    teachers: list[str] = flag("-ts", "--teachers", required=True, nargs="+", type=checked_by(check_teacher_name),
                               metavar="NAME", group="model", resume=MUST_MATCH, teacher_cache=True,
                               help=f"teachers to distill, in order: {NAMES_HELP}; mixed freely")
    teacher_pool: str = teacher_pool_flag(resume=MUST_MATCH, teacher_cache=True)
    path_to_pretrained_weights: str = weights_flag()
    embed_dim: int = flag("--embed_dim", type=positive_int, default=512, group="model", resume=MUST_MATCH,
                          teacher_cache=True, help="student and PCA-whitening output dimension")
    p: float = gem_p_flag(3.0)
    student_init: str = flag(
        "--student_init", default="imagenet", choices=("imagenet", "random"), group="model", resume=FREE,
        help="imagenet: torchvision's ImageNet weights (the paper; downloaded or in the torch hub cache); random: "
             "from scratch, e.g. offline")
    batch_size: int = flag(
        "-b", "--batch_size", type=int_at_least(MIN_BATCH), default=64, group="data", resume=MAY_CHANGE,
        help=f"pairs per process and iteration (>= {MIN_BATCH}: BatchNorm and the negatives need two; the paper: 64 "
             "on each of 8 GPUs)")
    num_workers: int = num_workers_flag()
    ckpt_dir: str = flag(
        "-c", "--ckpt_dir", required=True, metavar="DIR", type=output_dir, group="training", resume=FREE,
        help="output folder: config, log, metrics, checkpoints. A folder that holds a run is resumed with -r auto, "
             "never overwritten unless --overwrite")
    resume: str | None = flag(
        "-r", "--resume", metavar="PATH", type=resume_path, group="training", resume=FREE,
        help=f"checkpoint to resume, or auto: the newest checkpoint of -c ({LAST_CHECKPOINT} or a newer snapshot), "
             "if any")
    overwrite: bool = flag(
        "--overwrite", switch=True, default=False, group="training", resume=FREE, config=False,
        help="start afresh in a -c folder that holds a run: its checkpoints, metrics, log and config are deleted "
             "first")
    epochs: int = flag("--epochs", type=positive_int, default=200, group="training", resume=MAY_CHANGE,
                       help="training epochs")
    start_epoch: int = flag("--start_epoch", type=nonnegative_int, default=0, group="training", resume=FREE,
                            help="first epoch (0-based) of a run that does not resume")
    lr: float = flag("--lr", type=positive_float, default=1e-3, group="training", resume=MAY_CHANGE,
                     help="Adam learning rate, cosine-annealed to 1e-6 over all iterations")
    weight_decay: float = flag("--wd", "--weight-decay", type=nonnegative_float, default=1e-6, group="training",
                               resume=MAY_CHANGE, help="Adam weight decay")
    strategy: str = flag(
        "-s", "--strategy", default="maxmin", choices=STRATEGIES, group="training", resume=MUST_MATCH,
        help="fusion of the teachers' similarities: maxmin (the paper) takes the largest on the diagonal "
             "(positives) and the smallest off it")
    snapshot_step: int = flag("--snapshot_step", type=positive_int, default=10, group="training", resume=FREE,
                              help="also write checkpoint_{epoch}.pt every N epochs")
    save_every: int = flag("--save_every", type=positive_int, default=1, group="training", resume=FREE,
                           help="write checkpoint_last.pt every N epochs (always at a snapshot, the last epoch and a "
                                "stop signal). Raise it when epochs take seconds (SVD's thousands of short epochs, "
                                "the demo): each write holds the student and Adam's state (135 MB for ResNet18), "
                                "and a crash loses up to N-1 epochs")
    tensorboard: bool = flag("--tensorboard", switch=True, default=False, group="training", resume=FREE,
                             help="also write metrics.jsonl's figures (loss, lr, images/s, each teacher's win share) "
                                  "as TensorBoard event files in <ckpt_dir>/tensorboard, to watch a long run with "
                                  "`tensorboard --logdir <ckpt_dir>` (needs `pip install tensorboard`)")
    log_every: int | None = flag("--log_every", type=nonnegative_int, group="training", resume=FREE,
                                 help="iterations between metrics records, also shown on the console (0: 16 per "
                                      "epoch, as the paper). Default: 16 per epoch in metrics.jsonl and log.log, "
                                      "none on the console (its progress bar shows the live loss, lr and images/s)")
    teacher_cache: str | None = flag(
        "--teacher_cache", metavar="DIR", type=output_dir, group="training", resume=MAY_CHANGE,
        help="store the teachers' embeddings of --teacher_views views per image once, then train from them without "
             "running a teacher (built by the first run that names it; reused when the teachers' files, PCA files, "
             "-p, --embed_dim, the crop size, --amp, the data, K and the seed match). Default: the teachers run on "
             "every crop, as the paper")
    teacher_views: int = flag("--teacher_views", type=int_at_least(1), default=8, metavar="K", group="training",
                              resume=MUST_MATCH, teacher_cache=True,
                              help="views stored per image (or frame, per view distribution): each epoch uses one")
    teacher_cache_dtype: str = flag("--teacher_cache_dtype", default="float16", choices=("float16", "float32"),
                                    group="training", resume=MUST_MATCH, teacher_cache=True,
                                    help="storage of the cached embeddings (float16 halves the disk)")
    deterministic: bool = deterministic_flag()
    # not a flag: the SHA-256 of the teacher and PCA files, recorded by the preflight (a resume and a teacher cache
    # must use the same bytes)
    weight_sha256: dict[str, str] = dataclasses.field(default_factory=dict)

    dataset_name: ClassVar[str] = ""  # which training data (engine.training_data's registry)
    pca_script: ClassVar[str] = ""  # the script that learns a teacher's PCA file on this data

    def check(self) -> None:
        if self.start_epoch >= self.epochs:
            raise UsageError(f"--start_epoch {self.start_epoch} must be below --epochs {self.epochs}")
        if len(set(self.teachers)) != len(self.teachers):
            raise UsageError(f"-ts/--teachers lists a teacher twice: {' '.join(self.teachers)}")
        check_teacher_pool(self.teachers, self.teacher_pool)
        for name in self.teachers:
            check_embed_dim(name, self.embed_dim, self.teacher_pool)
        if self.tensorboard:
            check_tensorboard()
        if self.overwrite and self.resume is not None and (
                self.resume == "auto" or Path(self.resume).resolve().parent == Path(self.ckpt_dir).resolve()):
            raise UsageError("--overwrite with -r would delete the run it resumes; drop one of them")


@dataclasses.dataclass
class GLDTrainParams(TrainParams):
    """Multi-teacher distillation on Google Landmarks v2 (clean)."""

    gld_root_path: str = gld_root_flag()
    gld_csv: str = flag("--gld_csv", default=CSV_NAME, metavar="CSV", group="data", resume=MAY_CHANGE,
                        help="landmark list under --gld_root_path (or an absolute path), e.g. the filtered "
                             "meta/train_clean_available.csv of tools/prepare_gld.py")
    imsize: int = flag("--imsize", type=positive_int, default=512, group="data", resume=MUST_MATCH, teacher_cache=True,
                       help="RandomResizedCrop size of the training views")
    tt: float = flag("-tt", type=positive_float, default=0.05, group="training", resume=MUST_MATCH,
                     help="teacher similarity temperature (lower: sharper targets)")
    st: float = flag("-st", type=positive_float, default=0.05, group="training", resume=MUST_MATCH,
                     help="student similarity temperature")

    description: ClassVar[str] = "Multi-teacher distillation on Google Landmarks v2 (clean)."
    dataset_name: ClassVar[str] = "gldv2"
    pca_script: ClassVar[str] = "gld_pca_learn.py"


@dataclasses.dataclass
class SVDTrainParams(TrainParams):
    """Multi-teacher distillation on SVD (Short Video Dataset) frames."""

    p: float = redefault(TrainParams, "p", 1.0)
    lr: float = redefault(TrainParams, "lr", 0.3)
    dataset_meta: str = svd_meta_flag(resume=MAY_CHANGE, teacher_cache=True, key=_frame_root)
    crop_size: int = crop_size_flag("RandomResizedCrop size of the training views", resume=MUST_MATCH,
                                    teacher_cache=True)
    t: float | None = flag("-t", type=positive_float, metavar="T", group="training", resume=FREE,
                           help=f"temperature of the paper's svd_distill: sets both -st and -tt (default "
                                f"{PAPER_SVD_TEMPERATURE})")
    st: float | None = flag("-st", type=positive_float, group="training", resume=MUST_MATCH,
                            help="student similarity temperature (overrides -t)")
    tt: float | None = flag("-tt", type=positive_float, group="training", resume=MUST_MATCH,
                            help="teacher similarity temperature (overrides -t)")
    warmup_epochs: int = flag("--warmup_epochs", type=nonnegative_int, default=5, group="training", resume=FREE,
                              help="accepted for compatibility; unused, as in the paper's code")

    description: ClassVar[str] = "Multi-teacher distillation on SVD (Short Video Dataset) frames."
    epilog: ClassVar[str | None] = (
        "--lr defaults to 0.3, the paper's value, although it is used with Adam (a leftover of LARS in the paper's "
        "code); values around 1e-3 (gld_distill's default) are the usual choice for Adam. -a defaults to resnet18 "
        "(the paper's mobilenet_v2 default is not a valid student).")
    dataset_name: ClassVar[str] = "svd"
    pca_script: ClassVar[str] = "svd_pca_learn.py"

    def check(self) -> None:
        temperature = PAPER_SVD_TEMPERATURE if self.t is None else self.t
        self.st = temperature if self.st is None else self.st
        self.tt = temperature if self.tt is None else self.tt
        super().check()


# -------------------------------------------------------------------------------------------------- PCA learning
@dataclasses.dataclass
class PCAParams(LaunchParams):
    """Learning a teacher's PCA-whitening (gld_pca_learn.py, svd_pca_learn.py)."""

    teacher: str = flag("-t", "--teacher", required=True, type=checked_by(check_teacher_name), metavar="NAME",
                        group="model", help=f"teacher whose descriptors are whitened: {NAMES_HELP}")
    teacher_pool: str = teacher_pool_flag()
    path_to_pretrained_weights: str = weights_flag()
    p: float = gem_p_flag(3.0)
    batch_size: int = flag("-b", "--batch_size", type=positive_int, default=256, group="data",
                           help="images per batch and process")
    num_workers: int = num_workers_flag()
    embed_dim: int = flag("--embed_dim", type=positive_int, default=512, group="PCA",
                          help="output dimension of the PCA-whitening (at most the teacher's descriptor size)")
    dump_to: str | None = flag(
        "--dump_to", type=output_file, metavar="FILE", group="PCA",
        help="output file (default: the published name under --path_to_pretrained_weights/pca_weights/); an "
             "existing file is kept unless --overwrite")
    overwrite: bool = flag("--overwrite", switch=True, default=False, group="PCA",
                           help="replace the output file when it exists (e.g. a downloaded published PCA file)")
    deterministic: bool = deterministic_flag()

    dataset_name: ClassVar[str] = ""  # which images (engine.pca's registry)

    @property
    def output(self) -> Path:
        """``--dump_to``, or the published file name under ``--path_to_pretrained_weights``."""
        if self.dump_to:
            return Path(self.dump_to)
        return pca_weight_path(self.path_to_pretrained_weights, self.teacher, self.embed_dim, self.dataset_name,
                               self.teacher_pool, self.p)

    def check(self) -> None:
        """The whitening can only reduce the descriptor, and an existing output (perhaps the published file) is
        never replaced without --overwrite."""
        check_teacher_pool([self.teacher], self.teacher_pool)
        check_embed_dim(self.teacher, self.embed_dim, self.teacher_pool)
        out = self.output
        if out.is_dir():
            raise UsageError(f"the output {out} is a folder; pass --dump_to FILE")
        if out.exists() and not self.overwrite:
            raise UsageError(f"the output {out} exists{' (a published file?)' if self.dump_to is None else ''}; "
                             "pass --overwrite to replace it, or --dump_to another file")
        if self.dump_to is None:
            try:
                output_file(str(out))
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"--path_to_pretrained_weights: {exc}") from None


@dataclasses.dataclass
class GLDPCAParams(PCAParams):
    """Learn the PCA-whitening of a teacher on GLDv2 images."""

    gld_root_path: str = flag("--gld_root_path", default="/path/to/gldv2", metavar="PATH", type=existing_dir,
                              group="data",
                              help="GLDv2 root: meta/train_clean.csv, meta/train_clean_ids.txt, train/a/b/c/<id>.jpg")
    gld_ids: str = flag("--gld_ids", default=IDS_NAME, metavar="TXT", group="data",
                        help="image id list under --gld_root_path (or an absolute path), e.g. the filtered "
                             "meta/train_clean_available_ids.txt of tools/prepare_gld.py")
    imsize: int = flag("--imsize", type=positive_int, default=512, group="data",
                       help="RandomResizedCrop size (the published files: 512)")
    num_samples: int = flag("--num_samples", type=int, default=10000, group="data",
                            help="images to sample (<= 0: all, as the published files)")

    description: ClassVar[str] = "Learn the PCA-whitening of a teacher on GLDv2 images."
    dataset_name: ClassVar[str] = "gldv2"

    def check(self) -> None:
        if self.num_samples == 1:
            raise UsageError("--num_samples 1: a PCA needs at least 2 images (<= 0 takes all)")
        super().check()


@dataclasses.dataclass
class SVDPCAParams(PCAParams):
    """Learn the PCA-whitening of a teacher on SVD training frames."""

    p: float = redefault(PCAParams, "p", 1.0)
    dataset_meta: str = svd_meta_flag()
    frames_per_video: int = flag("--frames_per_video", type=positive_int, default=60, group="data",
                                 help="random frames per training video (the paper's 60)")
    crop_size: int = crop_size_flag("RandomResizedCrop size")

    description: ClassVar[str] = "Learn the PCA-whitening of a teacher on SVD training frames."
    dataset_name: ClassVar[str] = "svd"


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class EvalParams(LaunchParams):
    """What both evaluations share: the model (a student or a teacher) and the feature store."""

    arch: str | None = flag("-a", "--arch", metavar="ARCH", type=checked_by(check_student_arch), group="model",
                            store=True,
                            help="student: resnet18, resnet34 or timm:<model name> (any timm CNN, e.g. "
                                 "timm:mobilenetv3_large_100, with the same GeM head)")
    resume: str | None = flag(
        "-r", "--resume", metavar="CKPT", type=existing_file, group="model", store=True,
        key=lambda value, params: sha256_file(value),
        help="student checkpoint to evaluate (with -a): a released one or a training checkpoint")
    teacher: str | None = flag("-t", "--teacher", type=checked_by(check_teacher_name), metavar="NAME", group="model",
                               store=True, help=f"a teacher to evaluate instead of a student: {NAMES_HELP}")
    teacher_pool: str = teacher_pool_flag(store=True, protocol=True)
    pca: bool = flag("--pca", switch=True, default=False, group="model", store=True,
                     help="whiten the teacher's descriptors with its PCA file")
    path_to_pretrained_weights: str = weights_flag()
    embed_dim: int = flag("--embed_dim", type=positive_int, default=512, group="model", store=True,
                          key=_student_only, help="student output / PCA-whitening dimension")
    p: float = gem_p_flag(3.0)
    num_workers: int = num_workers_flag()
    output_json: str | None = flag("--output_json", metavar="FILE", type=output_file, group="evaluation",
                                   help="write the results to this JSON file (replaced if it exists)")
    tensorboard: str | None = flag("--tensorboard", metavar="DIR", type=output_dir, group="evaluation",
                                   help="also write the mAPs as TensorBoard scalars into DIR (e.g. the training run's "
                                        "<ckpt_dir>/tensorboard) at the checkpoint's epoch: evaluating each snapshot "
                                        "draws the accuracy over training (needs `pip install tensorboard`)")

    pca_data: ClassVar[str] = ""  # what a timm teacher's PCA file was learned on (models.pca_layer.pca_weight_path)

    def check(self) -> None:
        try:
            check_model_flags(self.arch, self.resume, self.teacher, self.pca, self.embed_dim, self.teacher_pool)
        except EmbedderConfigError as exc:
            raise UsageError(str(exc)) from None
        if self.tensorboard:
            check_tensorboard()


def store_flags(group: str = "evaluation") -> tuple[Any, Any, Any]:
    return (
        flag("--feature_cache", metavar="DIR", type=output_dir, group=group,
             help="store of extracted descriptors: each part (queries, database, distractors, videos) is embedded "
                  "once per model file, flags, item list and protocol, then read back (a killed extraction resumes). "
                  "Image contents are not hashed: after changing images in place pass --refresh_cache"),
        flag("--cache_dtype", default="float32", choices=tuple(DTYPES), group=group,
             help="storage precision: float32 gives results bit-identical to a run without the store; float16 halves "
                  "the disk (its effect on mAP: benchmarks/README.md)"),
        flag("--refresh_cache", switch=True, default=False, group=group,
             help="extract the parts of this run again, replacing their store entries"),
    )


_FEATURE_CACHE, _CACHE_DTYPE, _REFRESH_CACHE = store_flags()


@dataclasses.dataclass
class ImageEvalParams(EvalParams):
    """Evaluation on roxford5k and/or rparis6k (+1M distractors)."""

    data_path: str = flag("-dp", "--data_path", default="/path/to/datasets", type=existing_dir, group="data",
                          store=True, key=resolved,
                          help="root holding <dataset>/gnd_<dataset>.pkl, <dataset>/jpg/ and revisitop1m/")
    dataset: list[str] = flag("-d", "--dataset", default=["roxford5k"], nargs="+", choices=tuple(DATASETS),
                              metavar="NAME", group="data",
                              help="roxford5k and/or rparis6k: with --plus1m the distractors are embedded once for "
                                   "all")
    imsize: int | None = flag("--imsize", type=positive_int, group="data", store=True, protocol=True,
                              help="shrink images so the long side is at most this (LANCZOS); default: full "
                                   "resolution")
    plus1m: bool = flag("--plus1m", switch=True, default=False, group="data", protocol=True,
                        help="add the revisitop1m distractors to the database")
    multiscale: bool = flag("-ms", "--multiscale", switch=True, default=False, group="evaluation", store=True,
                            protocol=True, help="multi-scale descriptors (scales 1, 1/sqrt2, 1/2)")
    crop_queries: bool = flag("--crop_queries", switch=True, default=False, group="evaluation", store="queries",
                              protocol=True,
                              help="crop queries to their bbx (the standard revisitop protocol; the paper does not)")
    visualize: str | None = flag("--visualize", type=output_dir, metavar="DIR", group="evaluation",
                                 help="write one PNG per query: the query and its top results framed by label")
    visualize_top: int = flag("--visualize_top", default=10, type=positive_int, metavar="K", group="evaluation",
                              help="results per picture")
    feature_cache: str | None = _FEATURE_CACHE
    cache_dtype: str = _CACHE_DTYPE
    refresh_cache: bool = _REFRESH_CACHE

    description: ClassVar[str] = "Evaluation on roxford5k and/or rparis6k (+1M distractors)."
    pca_data: ClassVar[str] = "gldv2"

    def check(self) -> None:
        super().check()
        self.dataset = list(dict.fromkeys(self.dataset))  # a name given twice is evaluated once


@dataclasses.dataclass
class VideoEvalParams(EvalParams):
    """Near-duplicate video retrieval evaluation on SVD."""

    p: float = redefault(EvalParams, "p", 1.0)
    dataset_meta: str = svd_meta_flag()
    batch_size: int = flag("-b", "--batch_size", type=positive_int, default=16, group="data",
                           help="videos per batch and process")
    max_frames: int = flag("--max_frames", type=positive_int, default=60, group="data", store=True, protocol=True,
                           help="use the first N frames of each video")
    stride: int = flag("--stride", type=positive_int, default=1, group="data", store=True, protocol=True,
                       help="take every N-th of those frames")
    input_norm: str = flag("--input_norm", default="none", choices=("none", "imagenet"), group="data", store=True,
                           protocol=True,
                           help="none: ToTensor only, as the paper's evaluation; imagenet: add the ImageNet "
                                "normalisation the models were trained with")
    crop_size: int = crop_size_flag("CenterCrop size after Resize(crop * 256/224)", store=True, protocol=True)
    sim_fn: list[str] = flag("--sim_fn", default=["fmx"], nargs="+", choices=SIM_FNS, metavar="FN", group="evaluation",
                             help="fme/fmx: mean/max-pooled video descriptors; sme/smx/cf: mean/max/chamfer over frame "
                                  "pairs (fmx: the paper's code; its README uses cf). Several are evaluated from one "
                                  "extraction")
    topk: list[int] = flag("--topk", type=positive_int, nargs="+", default=[100], metavar="K", group="evaluation",
                           help="report mAP@K for each K, besides top-inf (the full ranking)")
    subset_eval: bool = flag("--subset_eval", switch=True, default=False, group="evaluation", protocol=True,
                             help="rank the labeled candidates only (no unlabeled distractors)")
    max_elements: int = flag("--max_elements", type=positive_int, default=DEFAULT_MAX_ELEMENTS, group="evaluation",
                             help="frame-level similarities: most frame pairs held in memory at once")
    feature_cache: str | None = _FEATURE_CACHE
    cache_dtype: str = _CACHE_DTYPE
    refresh_cache: bool = _REFRESH_CACHE

    description: ClassVar[str] = "Near-duplicate video retrieval evaluation on SVD."
    pca_data: ClassVar[str] = "svd"

    def check(self) -> None:
        super().check()
        self.sim_fn = list(dict.fromkeys(self.sim_fn))


# --------------------------------------------------------------------------------------------------- the parser
def get_parser(cls: type) -> argparse.ArgumentParser:
    """The command line of a flow's parameters: one argument per field, in its group, with its default shown."""
    parser = PathCheckingParser(description=cls.description, epilog=cls.epilog, formatter_class=HelpFormatter)
    return add_flags(parser, cls)


def parse(cls: type, argv: list[str] | None = None) -> Any:
    """Parse a script's command line into its parameters; a check of several flags is argparse's usage error."""
    parser = get_parser(cls)
    namespace = parser.parse_args(argv)
    try:
        return from_namespace(cls, namespace)
    except UsageError as exc:
        parser.error(str(exc))
