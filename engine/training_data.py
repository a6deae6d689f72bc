"""The training data of each dataset, for ``engine.distill``: a registry from a parameters class's ``dataset_name``
to how its items are checked before any work and how they are built on every rank.

A new training dataset is one function pair here (or in a new file) and one line in ``TRAINING_DATA``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets.gld import DistributedGroupSampler, GLDPairDataset, check_images_exist, pair_collate, read_groups
from datasets.svd.data import DistributedFrameSampler, TrainFrames, two_view_collate
from datasets.svd.meta import SVDMeta
from datasets.transforms import GLDView, gld_train_transform, svd_distill_transform, svd_distill_views
from engine.params import GLDTrainParams, SVDPCAParams, SVDTrainParams
from engine.teacher_cache import cached_halves_collate, cached_pairs_collate
from utils.distributed import DistContext
from utils.files import fingerprint


@dataclass
class TrainData:
    """What a dataset supplies: the dataset, a batch sampler with ``set_epoch``/``state_dict``/``load_state_dict``,
    a collate function producing ``(x1, x2)``, and a fingerprint of the training list (names and order), by which a
    resumed run notices that its data changed."""

    dataset: Any
    batch_sampler: Any
    collate_fn: Callable | None = None
    fingerprint: str = ""
    # for --teacher_cache: the loader of an untransformed item (indexed as ``dataset``), the items' view
    # distributions, and the collate function of cached items
    load_item: Callable[[int], Any] | None = None
    views: list | None = None
    cached_collate: Callable | None = None


def check_gld_data(params: GLDTrainParams) -> None:
    """Before any work: the CSV and every training image (a missing one would be found hours into the run)."""
    groups = read_groups(params.gld_root_path, csv_name=params.gld_csv)
    check_images_exist(params.gld_root_path, [i for g in groups for i in g], "training")


def build_gld_data(params: GLDTrainParams, ctx: DistContext) -> TrainData:
    """GLDv2 pairs: two images of one landmark, the positives of the loss."""
    dataset = GLDPairDataset(params.gld_root_path, gld_train_transform(params.imsize), csv_name=params.gld_csv)
    sampler = DistributedGroupSampler(dataset.groups, params.batch_size, ctx.world_size, ctx.rank, seed=params.seed)
    return TrainData(dataset, sampler, pair_collate, fingerprint([dataset.image_ids, [len(g) for g in dataset.groups]]),
                     load_item=dataset.load, views=[GLDView(params.imsize)], cached_collate=cached_halves_collate)


def check_svd_data(params: SVDTrainParams | SVDPCAParams) -> None:
    """Before any work: the metadata and the training videos' frames are on disk."""
    meta = SVDMeta.from_yaml(params.dataset_meta)
    meta.check_frames_on_disk(*meta.training_videos(), "training")


def build_svd_data(params: SVDTrainParams, ctx: DistContext) -> TrainData:
    """SVD: each epoch visits every training video once with one uniformly random frame; the two views are two
    augmentations of that frame."""
    meta = SVDMeta.from_yaml(params.dataset_meta)
    videos, counts = meta.training_videos()
    dataset = TrainFrames(meta.frame_root, videos, counts, svd_distill_transform(params.crop_size))
    sampler = DistributedFrameSampler(counts, params.batch_size, ctx.world_size, ctx.rank, seed=params.seed)
    return TrainData(dataset, sampler, two_view_collate, fingerprint([videos, counts]), load_item=dataset.load,
                     views=list(svd_distill_views(params.crop_size)), cached_collate=cached_pairs_collate)


# dataset_name -> (check before any work, build on every rank)
TRAINING_DATA: dict[str, tuple[Callable[[Any], None], Callable[[Any, DistContext], TrainData]]] = {
    "gldv2": (check_gld_data, build_gld_data),
    "svd": (check_svd_data, build_svd_data),
}
