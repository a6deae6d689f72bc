"""Revisited Oxford/Paris (+ R1M distractors): ground truth and images. The metric is in ``datasets.revisitop``.

Layout under ``--data_path`` (revisitop's): ``<name>/gnd_<name>.pkl``, ``<name>/jpg/<image>.jpg``,
``revisitop1m/revisitop1m.txt`` (relative paths that already end in ``.jpg``) and ``revisitop1m/jpg/<path>``.

Protocol note: the paper does not crop queries to their ``bbx``; ``crop_queries=True`` gives the standard revisitop
protocol.
"""
from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datasets.images import open_rgb
from utils.errors import UserError
from utils.files import files_exist, read_text

DATASETS = ("roxford5k", "rparis6k")
DISTRACTORS = "revisitop1m"
MODES = ("E", "M", "H")


class DatasetError(UserError, ValueError):
    """A dataset file is missing or malformed."""


class GroundTruthError(DatasetError):
    """A ``gnd_<name>.pkl`` file is missing, unsafe or malformed."""


# ---------------------------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------------------------
_SAFE_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                              "bytes", "bytearray", "bool")
} | {
    ("__builtin__", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "long", "unicode",
                                 "str", "bool")
} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
} | {
    (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")  # pickle protocol 5 buffers
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Plain containers, numbers, strings and numpy arrays/scalars only: a ground-truth file cannot run code."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):  # numpy >= 1.25 dtype classes
            return super().find_class(module, name)
        raise GroundTruthError(
            f"{self.source}: refusing to unpickle the global '{module}.{name}'; a ground-truth file holds only "
            "lists, dicts, numbers, strings and numpy arrays. Download gnd files from the revisitop site only.")


def load_ground_truth(path: str | os.PathLike) -> dict:
    """Read a revisitop ``gnd_<name>.pkl`` with a restricted unpickler and check its structure."""
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(f"ground-truth file not found: {path}. Download the revisited dataset so that "
                               f"{path.parent}/ holds gnd_{path.parent.name}.pkl and jpg/ (check -dp/--data_path).")
    try:
        with open(path, "rb") as f:
            cfg = _RestrictedUnpickler(f, path).load()
    except GroundTruthError:
        raise
    except Exception as exc:  # any decoding failure of an untrusted file
        raise GroundTruthError(f"cannot read ground-truth file {path}: {exc}. The file is corrupt or not a "
                               "revisitop gnd pickle.") from exc
    _check_ground_truth(cfg, path)
    return cfg


def _check_ground_truth(cfg: Any, path: Path) -> None:
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        keys = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise GroundTruthError(f"{path}: expected a dict with keys imlist, qimlist, gnd; got {keys}")
    n_db, n_q = len(cfg["imlist"]), len(cfg["qimlist"])
    if len(cfg["gnd"]) != n_q:
        raise GroundTruthError(f"{path}: {len(cfg['gnd'])} gnd entries for {n_q} queries")
    for q, entry in enumerate(cfg["gnd"]):
        missing = {"easy", "hard", "junk"} - set(entry)
        if missing:
            raise GroundTruthError(f"{path}: gnd[{q}] lacks {sorted(missing)}")
        for key in ("easy", "hard", "junk"):
            idx = _index_array(entry[key], f"{path}: gnd[{q}]['{key}']")
            if idx.size and (idx.min() < 0 or idx.max() >= n_db):
                raise GroundTruthError(f"{path}: gnd[{q}]['{key}'] has indices outside the {n_db} database images")


def _index_array(values: Any, where: str) -> np.ndarray:
    """Database indices as int64; a value that is not a whole number is an error (a cast would truncate it)."""
    try:
        raw = np.asarray(values).reshape(-1)
    except (ValueError, TypeError):
        raise GroundTruthError(f"{where} is not a list of image indices") from None
    if raw.size == 0 or raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    if raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)):
        return raw.astype(np.int64)
    bad = [v for v in raw.tolist() if not (isinstance(v, (int, float)) and float(v).is_integer())][:3]
    raise GroundTruthError(f"{where} holds values that are not image indices (whole numbers), e.g. {bad}")


def revisited_ground_truth(gnd: Sequence[dict], mode: str) -> list[dict[str, np.ndarray]]:
    """The ``{'ok', 'junk'}`` sets of revisitop's setups: Easy (ok easy; junk junk+hard), Medium (ok easy+hard;
    junk junk), Hard (ok hard; junk junk+easy)."""
    parts = {"E": (("easy",), ("junk", "hard")), "M": (("easy", "hard"), ("junk",)),
             "H": (("hard",), ("junk", "easy"))}
    if mode not in parts:
        raise ValueError(f"unknown revisited mode {mode!r}; choose from {MODES}")
    ok_keys, junk_keys = parts[mode]
    cat = lambda g, keys: np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in keys])
    return [{"ok": cat(g, ok_keys), "junk": cat(g, junk_keys)} for g in gnd]


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
class ImageList(Dataset):
    """Images by path -> ``(tensor, index)``, optionally cropped to a box and shrunk with a LANCZOS thumbnail.

    ``imsize`` bounds the long side (PIL ``thumbnail``: it only ever downsizes, as the paper). A cropped image is
    bounded by ``imsize * max(crop) / max(full)`` instead, as cirtorch does, so a cropped query keeps the scale it
    has inside an ``imsize`` full image.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable | None = None, imsize: int | None = None,
                 boxes: Sequence[Sequence[float]] | None = None, where: str = "",
                 names: Sequence[str] | None = None) -> None:
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"{len(boxes)} boxes for {len(paths)} images")
        self.paths = list(paths)
        self.names = [str(n) for n in names] if names is not None else [p.name for p in self.paths]
        self.transform = transform
        self.imsize = imsize
        self.boxes = boxes
        self.where = where

    def __len__(self) -> int:
        return len(self.paths)

    def missing(self) -> list[Path]:
        """The paths that are not files, in order."""
        return [p for p, ok in zip(self.paths, files_exist(self.paths)) if not ok]

    def load(self, index: int) -> Image.Image:
        img = open_rgb(self.paths[index], DatasetError, missing_hint=self.where, corrupt_hint="Download it again.")
        full = max(img.size)
        if self.boxes is not None:
            img = img.crop(tuple(float(v) for v in self.boxes[index]))
        if self.imsize is not None:
            bound = self.imsize if self.boxes is None else self.imsize * max(img.size) / full
            bound = max(1, math.floor(bound))
            img.thumbnail((bound, bound), Image.Resampling.LANCZOS)
        return img

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load(index)
        return (self.transform(img) if self.transform is not None else img), index


class RevisitedDataset:
    """One revisited dataset (``roxford5k``/``rparis6k``): names, ground truth and image lists."""

    def __init__(self, root: str | os.PathLike, name: str) -> None:
        self.root = Path(root)
        self.name = name
        self.folder = self.root / name
        self.gnd_path = self.folder / f"gnd_{name}.pkl"
        cfg = load_ground_truth(self.gnd_path)
        self.imlist: list[str] = [str(n) for n in cfg["imlist"]]
        self.qimlist: list[str] = [str(n) for n in cfg["qimlist"]]
        self.gnd: list[dict] = list(cfg["gnd"])

    @property
    def n_database(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def _path(self, name: str) -> Path:
        return self.folder / "jpg" / f"{name}.jpg"

    def _where(self) -> str:
        return (f"Expected the {self.name} images in {self.folder / 'jpg'} (download them there or fix "
                "-dp/--data_path).")

    def database(self, transform: Callable | None = None, imsize: int | None = None) -> ImageList:
        return ImageList([self._path(n) for n in self.imlist], transform, imsize, where=self._where())

    def queries(self, transform: Callable | None = None, imsize: int | None = None,
                crop: bool = False) -> ImageList:
        boxes = None
        if crop:
            if any("bbx" not in g for g in self.gnd):
                raise GroundTruthError(f"{self.gnd_path}: query cropping needs a 'bbx' in every gnd entry")
            boxes = [_check_box(g["bbx"], f"{self.gnd_path}: gnd[{q}]['bbx']") for q, g in enumerate(self.gnd)]
        return ImageList([self._path(n) for n in self.qimlist], transform, imsize, boxes, where=self._where())


def _check_box(box: Any, where: str) -> list[float]:
    try:
        values = [float(v) for v in np.asarray(box).reshape(-1)]
    except (ValueError, TypeError):
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or values[0] >= values[2] \
            or values[1] >= values[3]:
        raise GroundTruthError(f"{where} must be 4 numbers x1, y1, x2, y2 with x1 < x2 and y1 < y2, got {box!r}")
    return values


def distractor_images(root: str | os.PathLike, transform: Callable | None = None,
                      imsize: int | None = None) -> ImageList:
    """The R1M distractors listed in ``<root>/revisitop1m/revisitop1m.txt`` (lines already end in ``.jpg``)."""
    folder = Path(root) / DISTRACTORS
    listing = folder / f"{DISTRACTORS}.txt"
    if not listing.is_file():
        raise DatasetError(f"distractor list not found: {listing}. --plus1m needs revisitop1m.txt and the "
                           f"images under {folder / 'jpg'} (check -dp/--data_path).")
    names = [line.strip() for line in read_text(listing, DatasetError, "distractor list").splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"distractor list {listing} is empty; download revisitop1m.txt again")
    return ImageList([folder / "jpg" / n for n in names], transform, imsize,
                     where=f"Expected the R1M distractors in {folder / 'jpg'} (download them there).", names=names)


def medium_label(gnd: dict, index: int) -> str:
    """The Medium protocol's label of database image ``index`` for a query: positive (easy or hard), junk or
    negative (distractors included)."""
    if any(index in np.asarray(gnd[k]).reshape(-1) for k in ("easy", "hard")):
        return "positive"
    return "junk" if index in np.asarray(gnd["junk"]).reshape(-1) else "negative"
