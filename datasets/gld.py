"""Google Landmarks v2 (clean): landmark groups, image files and the paper's distributed pair sampler.

On disk, rooted at ``--gld_root_path``:
``meta/train_clean.csv`` (columns ``landmark_id,images``; ``images`` = space-separated ids),
``meta/train_clean_ids.txt`` (one id per line; used for PCA learning) and ``train/{i[0]}/{i[1]}/{i[2]}/{i}.jpg``.

Unlike the paper's code, the pair dataset is indexed by integers and has a real ``__len__`` (B21, B23), and
the sampler keeps its own pair-choosing RNG so that a resumed run draws the same pairs as an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datasets.images import open_rgb
from datasets.sampler import ShardedEpochSampler
from utils.errors import UserError
from utils.files import files_exist, read_text
from utils.log import get_logger

CSV_NAME = "meta/train_clean.csv"
IDS_NAME = "meta/train_clean_ids.txt"


class GLDDataError(UserError, ValueError):
    """The GLDv2 folder is incomplete or malformed (the message names the file)."""


def image_path(root: str | Path, image_id: str) -> Path:
    """The official GLDv2 layout: ``train/a/b/c/abc....jpg``."""
    if len(image_id) < 3:
        raise GLDDataError(f"GLDv2 image id {image_id!r} is shorter than 3 characters; the layout "
                           "train/{id[0]}/{id[1]}/{id[2]}/{id}.jpg needs at least 3")
    return Path(root) / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def read_image(path: str | Path) -> Image.Image:
    return open_rgb(path, GLDDataError, missing_hint="Check --gld_root_path and the dataset download.",
                    corrupt_hint="Re-download it or remove its id from the metadata.")


def read_landmarks(root: str | Path, csv_name: str = CSV_NAME) -> list[tuple[str, list[str], int]]:
    """The rows of a GLDv2 CSV (``csv_name`` under ``root``, or an absolute path): (landmark id, image ids, line)."""
    path = Path(root) / csv_name
    if not path.is_file():
        raise GLDDataError(f"GLDv2 metadata file not found: {path}. --gld_root_path must contain {csv_name}.")
    with io.StringIO(read_text(path, GLDDataError, "GLDv2 metadata file"), newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "images" not in [c.strip() for c in reader.fieldnames]:
            raise GLDDataError(f"{path} has no 'images' column (header: {reader.fieldnames}); expected the GLDv2 "
                               "train_clean.csv header 'landmark_id,images'.")
        reader.fieldnames = [c.strip() for c in reader.fieldnames]
        return [(str(row.get("landmark_id")), (row["images"] or "").split(), reader.line_num) for row in reader]


def read_groups(root: str | Path, min_images: int = 2, csv_name: str = CSV_NAME) -> list[list[str]]:
    """Landmark groups of the CSV; groups with fewer than ``min_images`` images are dropped."""
    path = Path(root) / csv_name
    groups = []
    for landmark, group, line in read_landmarks(root, csv_name):
        if len(set(group)) != len(group):  # two copies of one image would be a pair of an image with itself
            twice = next(i for i in group if group.count(i) > 1)
            raise GLDDataError(f"{path}:{line}: landmark {landmark!r} lists image {twice} more than once; a pair "
                               "must be two different images. Remove the repeat (tools/prepare_gld.py writes a "
                               "filtered CSV).")
        groups.append(group)
    kept = [g for g in groups if len(g) >= min_images]
    if not kept:
        raise GLDDataError(f"{path} has no landmark with at least {min_images} images ({len(groups)} rows read); "
                           "distillation needs two images of the same landmark per pair.")
    get_logger().info("GLDv2: %d landmark groups with >= %d images (%d of %d rows dropped as too small), %d images",
                      len(kept), min_images, len(groups) - len(kept), len(groups), sum(len(g) for g in kept))
    return kept


def read_image_ids(root: str | Path, ids_name: str = IDS_NAME) -> list[str]:
    """All ids of an id list (``ids_name`` under ``root``, or an absolute path; one per line, blank lines are not
    ids)."""
    path = Path(root) / ids_name
    if not path.is_file():
        raise GLDDataError(f"GLDv2 id list not found: {path}. --gld_root_path must contain {ids_name} "
                           "(one image id per line, e.g. all ids of meta/train_clean.csv; tools/prepare_gld.py "
                           "writes it).")
    ids = [line.strip() for line in read_text(path, GLDDataError, "GLDv2 id list").splitlines() if line.strip()]
    if not ids:
        raise GLDDataError(f"{path} lists no image ids")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise GLDDataError(f"{path} lists image id {twice} more than once ({len(ids) - len(set(ids))} repeated "
                           "line(s)); an image would count twice: keep one line per id")
    return ids


def check_images_exist(root: str | Path, image_ids: Sequence[str], what: str) -> None:
    """Before any work: every image file is there (parallel stats; 1.58M take seconds on a local disk), so a missing
    one is not found hours into a run."""
    paths = [image_path(root, i) for i in image_ids]
    missing = [p for p, ok in zip(paths, files_exist(paths)) if not ok]
    if missing:
        raise GLDDataError(f"{len(missing)} of {len(paths)} {what} image(s) not found under {Path(root) / 'train'}, "
                           f"e.g. {missing[0]}. Complete the download, or train on the images present with a "
                           "filtered CSV.")


class GLDPairDataset(Dataset):
    """The images of the landmark groups, flattened and indexed by integer; ``groups`` holds those indices."""

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 groups: Sequence[Sequence[str]] | None = None, csv_name: str = CSV_NAME) -> None:
        self.root = Path(root)
        self.transform = transform
        id_groups = read_groups(root, csv_name=csv_name) if groups is None else groups
        self.image_ids: list[str] = []
        self.groups: list[list[int]] = []
        for group in id_groups:
            start = len(self.image_ids)
            self.image_ids.extend(group)
            self.groups.append(list(range(start, len(self.image_ids))))

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, index: int) -> Image.Image:
        """The image itself, untransformed."""
        return read_image(image_path(self.root, self.image_ids[index]))

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self.load(index)
        return self.transform(img) if self.transform is not None else img


class GLDImageDataset(Dataset):
    """A list of GLDv2 image ids (PCA learning): yields ``(image, index)``."""

    def __init__(self, root: str | Path, ids: Sequence[str], transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.ids = list(ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = read_image(image_path(self.root, self.ids[index]))
        return (self.transform(img) if self.transform is not None else img), index


def pair_collate(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the sampler (b first images, then b second images) -> ``(x1, x2)``."""
    batch = torch.stack(samples)
    half = batch.shape[0] // 2
    return batch[:half], batch[half:]


class DistributedGroupSampler(ShardedEpochSampler):
    """Batches of landmark pairs (the paper's sampler; its skeleton is ``datasets.sampler``).

    Groups are permuted with a generator seeded ``seed + epoch``; two distinct images of each group are drawn with
    the per-rank RNG. A batch lists the first images, then the second images.
    """

    unit_name = "landmark group"

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        small = [i for i, g in enumerate(groups) if len(g) < 2]
        if small:
            raise ValueError(f"{len(small)} group(s) have fewer than 2 images (e.g. group {small[0]}); "
                             "pairs need two images of the same landmark")
        self.groups = [list(g) for g in groups]
        super().__init__(len(self.groups), batch_size, world_size, rank, seed, error=GLDDataError)

    def make_batch(self, units: list[int]) -> list[int]:
        pairs = [self.rng.sample(self.groups[g], 2) for g in units]
        return [p[0] for p in pairs] + [p[1] for p in pairs]
