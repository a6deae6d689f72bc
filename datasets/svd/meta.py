"""SVD metadata: the id, ground-truth and frame-count files named by ``config/svd.yaml``.

File formats (as the paper's code reads them):

* id files: one video id per line; ``.mp4`` is stripped.
* ground-truth files: ``qid cid label`` per line (``label > 0`` = relevant); ``.mp4`` stripped from both ids;
  stored as ``gt[qid][cid] = label`` with queries and candidates in order of first appearance.
* frame-count file: ``video_id count`` per line (ids as they appear after stripping ``.mp4`` elsewhere).
* frames: ``{frame_root_path}/{video_id}/{i:04d}.jpg`` with ``i`` 0-based.

Every file is read lazily, once, and a missing file is an error naming the yaml key that points at it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from utils.config import ConfigError, load_yaml
from utils.errors import UserError
from utils.files import files_exist, read_text

# Keys of the paper's svd.yaml that this code reads; the others (all_video_id, groundtruth, video_root_paths,
# feature_root_path) are accepted and ignored, as in the paper's code.
USED_KEYS = ("query_id", "labeled_id", "unlabeled_id", "train_groundtruth", "test_groundtruth",
             "frame_root_path", "frame_count_file")

GroundTruth = dict[str, dict[str, int]]


class SVDMetaError(UserError, ValueError):
    """The SVD metadata (yaml or one of the files it names) is missing or malformed."""


def strip_video_id(token: str) -> str:
    """The paper's id normalisation: surrounding whitespace and every ``.mp4`` removed."""
    return token.strip().replace(".mp4", "")


def frame_path(frame_root: str | os.PathLike, video_id: str, index: int) -> str:
    return os.path.join(frame_root, video_id, f"{index:04d}.jpg")


def _lines(path: str | os.PathLike) -> list[str]:
    return read_text(path, SVDMetaError, "SVD metadata file").splitlines()


def read_id_file(path: str | os.PathLike) -> list[str]:
    """One id per line, ``.mp4`` stripped; blank lines are not ids."""
    return [vid for vid in (strip_video_id(line) for line in _lines(path)) if vid]


def read_groundtruth(path: str | os.PathLike) -> tuple[list[str], list[str], GroundTruth]:
    """-> (queries, candidates, gt) with ``gt[qid][cid] = label``; orders are those of first appearance."""
    gt: GroundTruth = {}
    candidates: dict[str, None] = {}  # an ordered set
    for lineno, line in enumerate(_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise SVDMetaError(f"{path}:{lineno}: expected 'query_id candidate_id label', got {line.strip()!r}")
        qid, cid = strip_video_id(fields[0]), strip_video_id(fields[1])
        try:
            label = int(fields[2])
        except ValueError:
            raise SVDMetaError(f"{path}:{lineno}: label {fields[2]!r} is not an integer") from None
        gt.setdefault(qid, {})[cid] = label
        candidates.setdefault(cid, None)
    return list(gt), list(candidates), gt


def read_frame_counts(path: str | os.PathLike) -> dict[str, int]:
    """``video_id count`` per line -> {video_id: count}; a video listed twice is an error (which count is right?)."""
    counts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if fields[0] in first_line:
            raise SVDMetaError(f"{path}:{lineno}: video {fields[0]!r} is listed again (first on line "
                               f"{first_line[fields[0]]}); keep one line per video, e.g. extract its frames again "
                               "with tools/extract_svd_frames.py")
        first_line[fields[0]] = lineno
        try:
            if len(fields) != 2:
                raise ValueError
            counts[fields[0]] = int(fields[1])
        except ValueError:
            raise SVDMetaError(f"{path}:{lineno}: expected 'video_id frame_count', got {line.strip()!r}") from None
        if counts[fields[0]] < 0:
            raise SVDMetaError(f"{path}:{lineno}: negative frame count for video {fields[0]!r}")
    return counts


def ordered_union(*id_lists: Iterable[str]) -> list[str]:
    """Ids of all lists in order of first appearance, without repeats."""
    return list(dict.fromkeys(vid for ids in id_lists for vid in ids))


class SVDMeta:
    """Lazy view of the SVD metadata described by a yaml config (dict) such as ``config/svd.yaml``."""

    def __init__(self, config: dict[str, Any], source: str = "the SVD config") -> None:
        if not isinstance(config, dict):
            raise SVDMetaError(f"{source} must be a yaml mapping of the keys {list(USED_KEYS)}")
        self.config = config
        self.source = source

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SVDMeta:
        if not Path(path).is_file():
            raise SVDMetaError(f"SVD metadata config {path} not found; pass -dm/--dataset_meta with a yaml like "
                               "config/svd.yaml (tools/make_toy_data.py writes a toy one).")
        try:
            config = load_yaml(path, what="SVD metadata config (-dm/--dataset_meta)")
        except ConfigError as exc:
            raise SVDMetaError(str(exc).split("\n")[0]) from None
        return cls(config, source=str(path))

    def path_of(self, key: str, must_exist: bool = True) -> str:
        """The file or folder the yaml names under ``key``, with a clear error when it is absent."""
        if key not in self.config or self.config[key] in (None, ""):
            raise SVDMetaError(f"{self.source} has no '{key}' entry; add '{key}: /path/to/...' to it.")
        value = str(self.config[key])
        if must_exist and not os.path.exists(value):
            raise SVDMetaError(f"SVD metadata file for '{key}' not found: {value} (set by {self.source}); "
                               "fix the path in the yaml or provide the file.")
        return value

    # id files
    @cached_property
    def query_ids(self) -> list[str]:
        return read_id_file(self.path_of("query_id"))

    @cached_property
    def labeled_ids(self) -> list[str]:
        return read_id_file(self.path_of("labeled_id"))

    @cached_property
    def unlabeled_ids(self) -> list[str]:
        """The distractors of the full evaluation."""
        return read_id_file(self.path_of("unlabeled_id"))

    # ground truth
    @cached_property
    def _train(self) -> tuple[list[str], list[str], GroundTruth]:
        return read_groundtruth(self.path_of("train_groundtruth"))

    @cached_property
    def _test(self) -> tuple[list[str], list[str], GroundTruth]:
        return read_groundtruth(self.path_of("test_groundtruth"))

    @property
    def train_groundtruth(self) -> GroundTruth:
        return self._train[2]

    @property
    def test_groundtruth(self) -> GroundTruth:
        return self._test[2]

    @property
    def test_query_ids(self) -> list[str]:
        return self._test[0]

    @property
    def test_labeled_ids(self) -> list[str]:
        """Every candidate named in the test ground truth (first appearance order)."""
        return self._test[1]

    @cached_property
    def train_ids(self) -> list[str]:
        """Every query and candidate of the training ground truth, in order of first appearance."""
        return ordered_union(*([qid, *cands] for qid, cands in self.train_groundtruth.items()))

    # frames
    @cached_property
    def frame_counts(self) -> dict[str, int]:
        return read_frame_counts(self.path_of("frame_count_file"))

    @property
    def frame_root(self) -> str:
        return self.path_of("frame_root_path")

    def check_videos(self, video_ids: Iterable[str], role: str) -> list[int]:
        """Frame counts of ``video_ids``; a video without a count or with 0 frames is an error naming it."""
        counts = self.frame_counts
        out, unknown, empty = [], [], []
        for vid in video_ids:
            n = counts.get(vid)
            if n is None:
                unknown.append(vid)
            elif n == 0:
                empty.append(vid)
            out.append(n)
        count_file = self.path_of("frame_count_file")
        if unknown:
            raise SVDMetaError(f"{len(unknown)} {role} video(s) have no entry in the frame-count file {count_file} "
                               f"(yaml key 'frame_count_file'), e.g. {unknown[:5]}; extract their frames and add "
                               "'video_id count' lines, or fix the ids in the metadata files.")
        if empty:
            raise SVDMetaError(f"{len(empty)} {role} video(s) have 0 frames in {count_file}, e.g. {empty[:5]}; "
                               "re-extract their frames or remove them from the metadata files.")
        return out

    def training_videos(self) -> tuple[list[str], list[int]]:
        """The training videos (every id of the training ground truth) and their frame counts."""
        videos = self.train_ids
        if not videos:
            raise SVDMetaError(f"the training ground truth of {self.source} ('train_groundtruth') lists no video")
        return videos, self.check_videos(videos, "training")

    def check_frames_on_disk(self, video_ids: Sequence[str], counts: Sequence[int], role: str,
                             max_frames: int | None = None) -> None:
        """One stat per video, before any work: the last frame a run can read (``count - 1``, or below
        ``max_frames`` for evaluation) exists. A frame-count file that promises more frames than were extracted
        is otherwise found only when that frame is sampled, hours into a run."""
        root = self.frame_root
        last = [min(n, max_frames) - 1 if max_frames else n - 1 for n in counts]
        paths = [frame_path(root, vid, i) for vid, i in zip(video_ids, last)]
        missing = [(vid, n, path) for vid, n, path, ok in zip(video_ids, counts, paths, files_exist(paths)) if not ok]
        if missing:
            vid, n, path = missing[0]
            raise SVDMetaError(f"{len(missing)} of {len(paths)} {role} video(s) have fewer frames on disk than the "
                               f"frame-count file {self.path_of('frame_count_file')} says, e.g. {vid!r}: {n} frames "
                               f"listed but {path} is missing. Re-extract their frames, or fix their counts.")
