"""Running a flow from its parameters: the scripts' ``main`` and the Python API.

    from engine.params import GLDTrainParams
    from engine.run import run
    run(GLDTrainParams(teachers=["mocov3", "barlowtwins"], ckpt_dir="runs/a", gld_root_path="GLD",
                       path_to_pretrained_weights="W", epochs=2))

``run`` checks what must fail before any work (the flow's preflight), starts the ranks (``utils.launch``: one per
visible GPU, torchrun's, SLURM's or one process on the CPU) and runs the flow on each; in a single process it returns
the flow's result (the trainer, the PCA file, the evaluation records).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from engine.distill import preflight as training_preflight
from engine.distill import train
from engine.image_retrieval import evaluate_images
from engine.params import ImageEvalParams, LaunchParams, PCAParams, TrainParams, VideoEvalParams
from engine.pca import pca_preflight, pca_worker
from engine.video_retrieval import check_frames, evaluate_videos
from utils.distributed import DistContext
from utils.launch import launch
from utils.log import log_run_header, setup_logging
from utils.runtime import seed_everything


def evaluation_worker(evaluate: Callable[[Any, DistContext], list[dict]], params: ImageEvalParams | VideoEvalParams,
                      ctx: DistContext) -> list[dict]:
    """The work of every rank of an evaluation: its log header, the seed, then ``evaluate``."""
    log_run_header(setup_logging(ctx.is_main), params, ctx.launch)
    seed_everything(params.seed)
    return evaluate(params, ctx)


# the flows: parameters class -> (the work of every rank, the checks before any work)
FLOWS: dict[type, tuple[Callable[[Any, DistContext], Any], Callable[[Any], None] | None]] = {
    TrainParams: (train, training_preflight),
    PCAParams: (pca_worker, pca_preflight),
    ImageEvalParams: (partial(evaluation_worker, evaluate_images), None),  # a partial: spawned ranks pickle it
    VideoEvalParams: (partial(evaluation_worker, evaluate_videos), check_frames),
}


def run(params: LaunchParams) -> Any:
    """Run the flow of ``params`` (see the module's docstring); a ``UserError`` ends it in one line."""
    for kind, (worker, preflight) in FLOWS.items():
        if isinstance(params, kind):
            return launch(worker, params, preflight=preflight)
    raise TypeError(f"no flow runs {type(params).__name__}")
