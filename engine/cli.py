"""Every flag the six scripts share, defined once, in argument groups ("model", "data", "training"/"PCA"/
"evaluation", "launch"), with the checks of the files those flags name.

Names, short forms and defaults are the paper's; ``--help`` shows each default. Values are checked when parsed
(``utils.argtypes``); checks that involve several flags are ``check_*_args`` (argparse errors); checks that read
files (weights, PCA files, frames) are the ``check_*`` preflights, run by ``launch`` before any work.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets.sampler import MIN_BATCH
from datasets.svd.meta import SVDMeta
from engine.pca import output_path
from engine.teacher_cache import add_cache_args
from models.embedder import EmbedderConfigError, check_model_flags
from models.loss import STRATEGIES
from models.pca_layer import load_pca_layer, pca_weight_path
from models.students import check_student_arch
from models.teachers import TEACHER_FILES, TEACHERS
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
from utils.checkpoint import CheckpointError, describe_non_checkpoint
from utils.files import sha256_file
from utils.run_dir import LAST_CHECKPOINT
from utils.runtime import AMP_CHOICES, AMP_HELP

WEIGHTS_DEFAULT = "/path/to/pretrained_weights"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help already names it); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def make_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return PathCheckingParser(description=description, epilog=epilog, formatter_class=HelpFormatter)


def groups(parser: argparse.ArgumentParser, *names: str) -> list[argparse._ArgumentGroup]:
    return [parser.add_argument_group(name) for name in names]


# ------------------------------------------------------------------------------------------------- model flags
def add_student_arch(group: argparse._ArgumentGroup, default: str | None) -> None:
    group.add_argument("-a", "--arch", default=default, metavar="ARCH", type=checked_by(check_student_arch),
                       help="student: resnet18, resnet34 or timm:<model name> (any timm CNN, e.g. "
                            "timm:mobilenetv3_large_100, with the same GeM head)")


def add_weights_dir(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--path_to_pretrained_weights", default=WEIGHTS_DEFAULT, metavar="DIR",
                       help="folder of the published teacher files and of pca_weights/")


def add_embed_dim(group: argparse._ArgumentGroup, what: str) -> None:
    group.add_argument("--embed_dim", type=positive_int, default=512, help=what)


def add_gem_p(group: argparse._ArgumentGroup, default: float) -> None:
    group.add_argument("-p", type=positive_float, default=default,
                       help="GeM power of the student and the teachers (the paper: 3 for GLDv2 and ROxf/RPar, 1 "
                            "for SVD; it replaces the teachers' learned exponents)")


# -------------------------------------------------------------------------------------------------- data flags
def add_num_workers(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--num_workers", type=nonnegative_int, default=8, help="data loader workers per process")


def add_gld_root(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--gld_root_path", default="/path/to/gldv2", metavar="PATH", type=existing_dir,
                       help="GLDv2 root: meta/train_clean.csv, meta/train_clean_ids.txt, train/a/b/c/<id>.jpg")


def add_svd_meta(group: argparse._ArgumentGroup) -> None:
    group.add_argument("-dm", "--dataset_meta", default="config/svd.yaml", metavar="FILE", type=existing_file,
                       help="SVD metadata yaml (the keys of config/svd.yaml)")


def add_crop_size(group: argparse._ArgumentGroup, what: str) -> None:
    group.add_argument("--crop_size", type=positive_int, default=224,
                       help=f"{what} (the paper: 224; smaller only for quick tests)")


# ------------------------------------------------------------------------------------------------ launch flags
def add_launch_args(parser: argparse.ArgumentParser, dist_url: str = "env://") -> None:
    """Launch and runtime flags of all six scripts (the paper's --world_size/--rank/--dist_url, and ours)."""
    group = parser.add_argument_group("launch")
    group.add_argument("--world_size", type=positive_int, default=None,
                       help="total number of processes (default: taken from torchrun, else one per visible GPU)")
    group.add_argument("--nproc_per_node", type=positive_int, default=None,
                       help="processes this node starts (default: one per visible GPU, or 1 on the CPU; on the CPU "
                            "more runs several gloo processes, e.g. under srun with one task per node)")
    group.add_argument("--rank", type=nonnegative_int, default=0, help="node rank, for a manual multi-node launch")
    group.add_argument("--dist_url", type=rendezvous_url, default=dist_url,
                       help="rendezvous URL of a manual multi-node launch, e.g. tcp://HOST:PORT of node 0 (env://: "
                            "torchrun's variables, or a free local port on one node)")
    group.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                       help="auto: every visible GPU if there is one, else the CPU")
    group.add_argument("--seed", type=seed_int, default=0, help="seed of every random generator")
    group.add_argument("--amp", default="none", choices=list(AMP_CHOICES), help=AMP_HELP)
    group.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    group.add_argument("--trust_checkpoint", action="store_true",
                       help="load weight files with full unpickling, for files you trust that a safe load refuses")


# -------------------------------------------------------------------------------------------------- training
def add_distill_args(parser: argparse.ArgumentParser, *, arch_default: str, lr_default: float,
                     p_default: float) -> tuple[argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """The flags both training scripts share; returns their (data, training) groups for the script's own."""
    model, data, training = groups(parser, "model", "data", "training")
    add_student_arch(model, arch_default)
    model.add_argument("-ts", "--teachers", required=True, nargs="+", choices=list(TEACHERS), metavar="NAME",
                       help=f"teachers to distill, in order: {', '.join(TEACHERS)}")
    add_weights_dir(model)
    add_embed_dim(model, "student and PCA-whitening output dimension")
    add_gem_p(model, p_default)
    model.add_argument("--student_init", default="imagenet", choices=["imagenet", "random"],
                       help="imagenet: torchvision's ImageNet weights (the paper; downloaded or in the torch hub "
                            "cache); random: from scratch, e.g. offline")
    data.add_argument("-b", "--batch_size", type=int_at_least(MIN_BATCH), default=64,
                      help=f"pairs per process and iteration (>= {MIN_BATCH}: BatchNorm and the negatives need two; "
                           "the paper: 64 on each of 8 GPUs)")
    add_num_workers(data)
    training.add_argument("-c", "--ckpt_dir", required=True, metavar="DIR", type=output_dir,
                          help="output folder: config, log, metrics, checkpoints. A folder that holds a run is "
                               "resumed with -r auto, never overwritten unless --overwrite")
    training.add_argument("-r", "--resume", default=None, metavar="PATH", type=resume_path,
                          help=f"checkpoint to resume, or auto: the newest checkpoint of -c ({LAST_CHECKPOINT} or "
                               "a newer snapshot), if any")
    training.add_argument("--overwrite", action="store_true",
                          help="start afresh in a -c folder that holds a run: its checkpoints, metrics, log and "
                               "config are deleted first")
    training.add_argument("--epochs", type=positive_int, default=200, help="training epochs")
    training.add_argument("--start_epoch", type=nonnegative_int, default=0,
                          help="first epoch (0-based) of a run that does not resume")
    training.add_argument("--lr", type=positive_float, default=lr_default,
                          help="Adam learning rate, cosine-annealed to 1e-6 over all iterations")
    training.add_argument("--wd", "--weight-decay", type=nonnegative_float, default=1e-6, dest="weight_decay",
                          help="Adam weight decay")
    training.add_argument("-s", "--strategy", default="maxmin", choices=list(STRATEGIES),
                          help="fusion of the teachers' similarities: maxmin (the paper) takes the largest on the "
                               "diagonal (positives) and the smallest off it")
    training.add_argument("--snapshot_step", type=positive_int, default=10,
                          help="also write checkpoint_{epoch}.pt every N epochs")
    training.add_argument("--log_every", type=nonnegative_int, default=0,
                          help="iterations between log and metrics lines (0: 16 per epoch, as the paper)")
    add_cache_args(training)
    add_deterministic(training)
    add_launch_args(parser)
    return data, training


def add_deterministic(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--deterministic", action="store_true",
                       help="reproducible GPU results: deterministic algorithms and cuDNN kernels, no cuDNN "
                            "autotuning, TF32 off (slower). Use it to compare runs bit for bit on one GPU model; a CPU "
                            "run is reproducible without it. Default: cuDNN autotunes the fixed-size crops")


def resume_path(value: str) -> str:
    """``-r``: ``auto`` or a checkpoint file that exists."""
    return value if value == "auto" else existing_file(value)


INPUT_TYPES.add(resume_path)


def check_embed_dim(parser: argparse.ArgumentParser, embed_dim: int, teachers: list[str]) -> None:
    for name in teachers:
        dim = TEACHERS[name].descriptor_dim
        if embed_dim > dim:
            parser.error(f"--embed_dim {embed_dim} is larger than the {dim}-d descriptor of teacher {name}; a "
                         "PCA-whitening can only reduce it")


def check_distill_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.start_epoch >= args.epochs:
        parser.error(f"--start_epoch {args.start_epoch} must be below --epochs {args.epochs}")
    if len(set(args.teachers)) != len(args.teachers):
        parser.error(f"-ts/--teachers lists a teacher twice: {' '.join(args.teachers)}")
    check_embed_dim(parser, args.embed_dim, args.teachers)
    if args.overwrite and args.resume is not None:
        if args.resume == "auto" or Path(args.resume).resolve().parent == Path(args.ckpt_dir).resolve():
            parser.error("--overwrite with -r would delete the run it resumes; drop one of them")
    return args


def check_weight_files(args: argparse.Namespace, pca_script: str) -> None:
    """Preflight of -ts/--path_to_pretrained_weights/--embed_dim: every teacher file exists and looks like a
    checkpoint; every PCA file exists and whitens its teacher's descriptor to --embed_dim. Records the files'
    SHA-256 in ``args.weight_sha256``: a resumed run must use the same bytes."""
    root = Path(args.path_to_pretrained_weights)
    digests = {}
    for name in args.teachers:
        teacher_file = root / TEACHER_FILES[name]
        if not teacher_file.is_file():
            raise SystemExit(f"teacher {name}: weight file not found: {teacher_file}. Download the published "
                             "teacher weights into --path_to_pretrained_weights.")
        not_torch = describe_non_checkpoint(teacher_file)
        if not_torch is not None:
            raise SystemExit(f"teacher {name}: weight file {teacher_file} is not a PyTorch checkpoint: it is "
                             f"{not_torch}. Download it again.")
        pca_file = pca_weight_path(root, name, args.embed_dim)
        if not pca_file.is_file():
            raise SystemExit(f"teacher {name}: PCA-whitening file not found: {pca_file}. Learn it with: python "
                             f"{pca_script} -t {name} --embed_dim {args.embed_dim} --path_to_pretrained_weights "
                             f"{root} (or download the published pca_weights/).")
        try:
            load_pca_layer(pca_file, trust=args.trust_checkpoint, in_dim=TEACHERS[name].descriptor_dim,
                           out_dim=args.embed_dim)
        except CheckpointError as exc:
            raise SystemExit(f"teacher {name}: {exc}") from None
        for path in (teacher_file, pca_file):
            digests[str(path.relative_to(root))] = sha256_file(path)
    args.weight_sha256 = digests


def check_svd_training_frames(args: argparse.Namespace) -> None:
    """Preflight of -dm for training and PCA learning: the training videos' frames are on disk."""
    meta = SVDMeta.from_yaml(args.dataset_meta)
    meta.check_frames_on_disk(*meta.training_videos(), "training")


# ------------------------------------------------------------------------------------------------ PCA learning
def add_pca_args(parser: argparse.ArgumentParser, *, p_default: float, batch_default: int = 256
                 ) -> argparse._ArgumentGroup:
    """The flags both PCA scripts share; returns their data group for the script's own."""
    model, data, pca = groups(parser, "model", "data", "PCA")
    model.add_argument("-t", "--teacher", required=True, choices=list(TEACHERS), metavar="NAME",
                       help=f"teacher whose descriptors are whitened: {', '.join(TEACHERS)}")
    add_weights_dir(model)
    add_gem_p(model, p_default)
    add_embed_dim(pca, "output dimension of the PCA-whitening (at most the teacher's descriptor size)")
    pca.add_argument("--dump_to", type=output_file, default=None, metavar="FILE",
                     help="output file (default: the published name under --path_to_pretrained_weights/"
                          "pca_weights/); an existing file is kept unless --overwrite")
    pca.add_argument("--overwrite", action="store_true",
                     help="replace the output file when it exists (e.g. a downloaded published PCA file)")
    data.add_argument("-b", "--batch_size", type=positive_int, default=batch_default,
                      help="images per batch and process")
    add_num_workers(data)
    add_deterministic(pca)
    add_launch_args(parser)
    return data


def check_pca_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The whitening can only reduce the descriptor, and an existing output (perhaps the published file) is never
    replaced without --overwrite."""
    check_embed_dim(parser, args.embed_dim, [args.teacher])
    out = output_path(args, args.teacher)
    if out.is_dir():
        parser.error(f"the output {out} is a folder; pass --dump_to FILE")
    if out.exists() and not args.overwrite:
        parser.error(f"the output {out} exists{' (a published file?)' if args.dump_to is None else ''}; pass "
                     "--overwrite to replace it, or --dump_to another file")
    if args.dump_to is None:
        try:
            output_file(str(out))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--path_to_pretrained_weights: {exc}")
    return args


# -------------------------------------------------------------------------------------------------- evaluation
def add_eval_args(parser: argparse.ArgumentParser, *, p_default: float
                  ) -> tuple[argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """The flags both evaluation scripts share; returns their (data, evaluation) groups for the script's own."""
    model, data, evaluation = groups(parser, "model", "data", "evaluation")
    add_student_arch(model, None)
    model.add_argument("-r", "--resume", default=None, metavar="CKPT", type=existing_file,
                       help="student checkpoint to evaluate (with -a): a released one or a training checkpoint")
    model.add_argument("-t", "--teacher", default=None, choices=list(TEACHERS), metavar="NAME",
                       help=f"a teacher to evaluate instead of a student: {', '.join(TEACHERS)}")
    model.add_argument("--pca", action="store_true", help="whiten the teacher's descriptors with its PCA file")
    add_weights_dir(model)
    add_embed_dim(model, "student output / PCA-whitening dimension")
    add_gem_p(model, p_default)
    add_num_workers(data)
    evaluation.add_argument("--output_json", default=None, metavar="FILE", type=output_file,
                            help="write the results to this JSON file (replaced if it exists)")
    add_launch_args(parser)
    return data, evaluation


def check_eval_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    try:
        check_model_flags(args.arch, args.resume, args.teacher, args.pca, args.embed_dim)
    except EmbedderConfigError as exc:
        parser.error(str(exc))
    return args
