"""Revisited Oxford/Paris (+ R1M distractors): ground truth, images and the revisitop evaluation.

Layout under ``--data_path`` (revisitop's): ``<name>/gnd_<name>.pkl``, ``<name>/jpg/<image>.jpg``,
``revisitop1m/revisitop1m.txt`` (relative paths that already end in ``.jpg``) and ``revisitop1m/jpg/<path>``.

Protocol notes:
* The paper does not crop queries to their ``bbx``; ``crop_queries=True`` gives the standard revisitop protocol.
* ``compute_map`` is revisitop's metric (trapezoid AP, junk removed from the ranking, queries without positives
  excluded). The evaluation itself never sorts the (database x query) score matrix: the rank of each labelled
  item is the number of items that score strictly higher plus the number of equal-scoring items with a lower
  database index, which is exactly its position in ``torch.argsort(-scores, dim=0, stable=True)``.
"""
from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from datasets.images import open_rgb
from datasets.ranking import HigherCounter, TopK
from utils.files import files_exist, read_text

DATASETS = ("roxford5k", "rparis6k")
DISTRACTORS = "revisitop1m"
KAPPAS = (1, 5, 10)
MODES = ("E", "M", "H")


class DatasetError(ValueError):
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


# ---------------------------------------------------------------------------------------------------------------
# metric (revisitop contract)
# ---------------------------------------------------------------------------------------------------------------
def trapezoid_average_precision(ok_pos: np.ndarray, junk_pos: np.ndarray, n_ok: int,
                      kappas: Sequence[int] = ()) -> tuple[float, np.ndarray]:
    """AP and precision@k of one query from the sorted 0-based ranking positions of its ok and junk items.

    Positives are first moved up by the number of junk items ranked before them; AP accumulates trapezoids of the
    precision-recall curve with recall step ``1 / n_ok``; ``kq = min(max position (1-based), k)``.
    """
    ok_pos = np.sort(np.asarray(ok_pos, dtype=np.int64))
    junk_pos = np.sort(np.asarray(junk_pos, dtype=np.int64))
    pos = ok_pos - np.searchsorted(junk_pos, ok_pos, side="left")
    j = np.arange(len(pos), dtype=np.float64)
    r = pos.astype(np.float64)
    prec0 = np.where(pos == 0, 1.0, j / np.maximum(r, 1.0))
    prec1 = (j + 1) / (r + 1)
    ap = float(np.sum((prec0 + prec1) * (1.0 / n_ok) / 2.0))
    prs = np.zeros(len(kappas))
    if len(pos):
        one_based = pos + 1
        for i, k in enumerate(kappas):
            kq = min(int(one_based.max()), int(k))
            prs[i] = np.count_nonzero(one_based <= kq) / kq
    return ap, prs


def map_from_positions(positions: Sequence[tuple[np.ndarray, np.ndarray]], gnd: Sequence[dict],
                       kappas: Sequence[int] = ()) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """``(map, aps, pr, prs)`` as revisitop's ``compute_map`` from per-query ``(ok positions, junk positions)``."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for q in range(nq):
        n_ok = np.asarray(gnd[q]["ok"]).reshape(-1).shape[0]
        if n_ok == 0:  # no positives: excluded from the means
            aps[q] = np.nan
            prs[q] = np.nan
            continue
        aps[q], prs[q] = trapezoid_average_precision(*positions[q], n_ok, kappas)
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def compute_map(ranks: np.ndarray, gnd: Sequence[dict],
                kappas: Sequence[int] = ()) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map``: ``ranks`` (db x queries, 0-based database indices, best first), ``gnd`` a list
    of ``{'ok', 'junk'}``. Returns ``(map, aps, pr, prs)``; queries without positives get NaN and are excluded."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (db, {len(gnd)} queries), got shape {ranks.shape}")
    positions = []
    for q, g in enumerate(gnd):
        column = ranks[:, q]
        ok = np.flatnonzero(np.isin(column, np.asarray(g["ok"]).reshape(-1)))
        junk = np.flatnonzero(np.isin(column, np.asarray(g.get("junk", [])).reshape(-1)))
        positions.append((ok, junk))
    return map_from_positions(positions, gnd, kappas)


def padded_items(items: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """(queries x width) indices, zero-padded, and each query's count."""
    sizes = [len(np.asarray(it).reshape(-1)) for it in items]
    idx = torch.zeros((len(items), max(sizes + [1])), dtype=torch.long, device=device)
    for q, it in enumerate(items):
        idx[q, : sizes[q]] = torch.as_tensor(np.asarray(it, dtype=np.int64).reshape(-1), device=device)
    return idx, sizes


def item_positions(scores: torch.Tensor, items: Sequence[np.ndarray], chunk_size: int = 65536) -> list[np.ndarray]:
    """Positions (0-based) of ``items[q]`` (database indices) in the ranking of query ``q``, without sorting.

    Equal to the full sort ``torch.argsort(-scores, dim=0, stable=True)`` inverted at those items, ties included:
    the scores strictly above (``HigherCounter``) plus the equal scores of lower database index.
    """
    if scores.ndim != 2 or scores.shape[1] != len(items):
        raise ValueError(f"scores must be (db, {len(items)} queries), got {tuple(scores.shape)}")
    n_db, nq = scores.shape
    idx, sizes = padded_items(items, scores.device)
    counter = HigherCounter(scores.gather(0, idx.T).T, sizes)  # item scores: padding columns are ignored
    width = counter.thresholds.shape[1]
    ties: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, n_db, chunk_size):
        block = scores[start:start + chunk_size].T.contiguous()  # (nq, c)
        left = counter.add(block)
        tied = counter.thresholds.gather(1, left.clamp_(max=width - 1)) == block  # never in the padding bucket
        q_t, j_t = torch.nonzero(tied, as_tuple=True)
        ties.append((q_t, j_t + start, left[q_t, j_t]))
    item_left = torch.searchsorted(counter.thresholds, counter.item_scores, right=False)
    tie_q, tie_j, tie_g = (torch.cat(t).cpu().numpy() for t in zip(*ties))
    higher, item_left = counter.higher().cpu().numpy(), item_left.cpu().numpy()
    out = []
    for q in range(nq):
        it = np.asarray(items[q], dtype=np.int64).reshape(-1)
        sel = tie_q == q
        # (group, db index) pairs of this query's ties, sorted so a searchsorted counts lower indices per group
        keys = tie_g[sel] * (n_db + 1) + tie_j[sel]
        keys.sort()
        own = item_left[q, : sizes[q]] * (n_db + 1)
        before = np.searchsorted(keys, own + it, side="left") - np.searchsorted(keys, own, side="left")
        out.append(higher[q, : sizes[q]] + before)
    return out


@dataclass
class RevisitedResult:
    """E/M/H results of one evaluation; ``map``/``mpr`` are fractions (print them x100)."""

    dataset: str
    kappas: tuple[int, ...]
    map: dict[str, float] = field(default_factory=dict)
    mpr: dict[str, np.ndarray] = field(default_factory=dict)
    aps: dict[str, np.ndarray] = field(default_factory=dict)
    n_evaluated: dict[str, int] = field(default_factory=dict)

    def to_json(self, n_queries: int, n_database: int, n_distractors: int, protocol: dict) -> dict:
        """The ``--output_json`` record (README): unrounded percentages (NaN -> null), the counts, the protocol."""
        pct = lambda v: None if not math.isfinite(float(v)) else float(v) * 100
        return {"dataset": self.dataset,
                "map": {m: pct(self.map[m]) for m in MODES},
                "mpr": {m: [pct(v) for v in self.mpr[m]] for m in MODES},
                "kappas": list(self.kappas),
                "n_queries": int(n_queries),
                "n_evaluated": dict(self.n_evaluated),
                "n_database": int(n_database),
                "n_distractors": int(n_distractors),
                "protocol": protocol}

    def lines(self) -> list[str]:
        """The two lines cirtorch/revisitop print (percent, 2 decimals)."""
        pct = {m: np.around(self.map[m] * 100, decimals=2) for m in MODES}
        mpr = {m: np.around(self.mpr[m] * 100, decimals=2) for m in MODES}
        ks = "[" + " ".join(str(k) for k in self.kappas) + "]"
        return [f">> {self.dataset}: mAP E: {pct['E']}, M: {pct['M']}, H: {pct['H']}",
                f">> {self.dataset}: mP@k{ks} E: {mpr['E']}, M: {mpr['M']}, H: {mpr['H']}"]


def labelled_items(gnd: Sequence[dict]) -> list[np.ndarray]:
    """Each query's easy, hard and junk database indices (the only positions the metrics need), sorted, unique."""
    return [np.unique(np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1)
                                      for k in ("easy", "hard", "junk")])) for g in gnd]


def result_from_positions(items: Sequence[np.ndarray], positions: Sequence[np.ndarray], gnd: Sequence[dict],
                          dataset: str = "", kappas: Sequence[int] = KAPPAS) -> RevisitedResult:
    """E/M/H mAP and mP@k from the ranking positions of each query's ``labelled_items``."""
    lookup = [dict(zip(it.tolist(), p.tolist())) for it, p in zip(items, positions)]
    result = RevisitedResult(dataset=dataset, kappas=tuple(int(k) for k in kappas))
    for mode in MODES:
        sets = revisited_ground_truth(gnd, mode)
        pos = [(np.sort([lk[i] for i in np.unique(s["ok"])]).astype(np.int64),
                np.sort([lk[i] for i in np.unique(s["junk"])]).astype(np.int64)) for lk, s in zip(lookup, sets)]
        result.map[mode], result.aps[mode], result.mpr[mode], _ = map_from_positions(pos, sets, kappas)
        result.n_evaluated[mode] = int(np.count_nonzero(~np.isnan(result.aps[mode])))
    return result


def evaluate_scores(scores: torch.Tensor, gnd: Sequence[dict], dataset: str = "",
                    kappas: Sequence[int] = KAPPAS, chunk_size: int = 65536) -> RevisitedResult:
    """E/M/H mAP and mP@k from a (database [+ distractors]) x queries score matrix, without a full sort."""
    items = labelled_items(gnd)
    return result_from_positions(items, item_positions(scores, items, chunk_size), gnd, dataset, kappas)


def similarity(database: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(db x queries) cosine similarity of L2-normalised features, as the paper scores."""
    return F.normalize(database, dim=1) @ F.normalize(queries, dim=1).T


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(queries x k) best database indices per query, in the order of the stable full sort (ties included)."""
    best = TopK(scores.shape[1], min(k, scores.shape[0]), scores.device)
    best.add(scores.T, 0)
    return best.rows


def medium_label(gnd: dict, index: int) -> str:
    """The Medium protocol's label of database image ``index`` for a query: positive (easy or hard), junk or
    negative (distractors included)."""
    if any(index in np.asarray(gnd[k]).reshape(-1) for k in ("easy", "hard")):
        return "positive"
    return "junk" if index in np.asarray(gnd["junk"]).reshape(-1) else "negative"


def save_query_strips(out_dir: str | os.PathLike, dataset: RevisitedDataset, best: TopK,
                      crop_queries: bool = False, distractors: ImageList | None = None) -> list[Path]:
    """One PNG per query: the query (cropped as evaluated) and its best results (rows of the database, then of the
    distractors), framed by their Medium label (positive = easy or hard, junk, negative; distractors are
    negatives)."""
    from utils.visualize import save_retrieval_strip

    out_dir = Path(out_dir)
    queries, database = dataset.queries(crop=crop_queries), dataset.database()
    written = []
    for q, (row, scores) in enumerate(zip(best.rows.cpu().tolist(), best.scores.cpu().tolist())):
        results, captions = [], []
        for r, (i, score) in enumerate(zip(row, scores)):
            img = database.load(i) if i < dataset.n_database else distractors.load(i - dataset.n_database)
            results.append((img, medium_label(dataset.gnd[q], i)))
            captions.append(f"#{r + 1} {score:.3f}")
        name = f"{dataset.name}_q{q:03d}_{Path(dataset.qimlist[q]).name}.png"
        written.append(save_retrieval_strip(out_dir / name, queries.load(q), results, captions=captions))
    return written
