"""SVD frame datasets: distillation frames (+ the paper's one-random-frame-per-video sampler), the PCA frame set,
and whole test videos.

Unlike the paper's ``Frame``/``Video`` (B22), every dataset here has a real ``__len__`` and integer indices:
training frames are flat-indexed (``offset[video] + frame``), so a standard ``DataLoader`` with a batch sampler
works and the loader's length is known.
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datasets.images import open_rgb
from datasets.sampler import ShardedEpochSampler
from datasets.svd.meta import SVDMetaError, frame_path


def read_frame(frame_root: str, video_id: str, index: int) -> Image.Image:
    """One frame as RGB; a missing or unreadable file is an error naming it (never skipped)."""
    return open_rgb(frame_path(frame_root, video_id, index), SVDMetaError, what="frame",
                    missing_hint="The frame-count file promises it; check 'frame_root_path' in the SVD yaml and "
                                 "the extracted frames.",
                    corrupt_hint=f"Re-extract the frames of video {video_id!r}.")


class TrainFrames(Dataset):
    """Every frame of the training videos, flat-indexed: index ``offsets[v] + f`` is frame ``f`` of video ``v``.

    With :class:`DistributedFrameSampler` each item is ``transform(frame)`` (the two distillation views).
    """

    def __init__(self, frame_root: str, video_ids: Sequence[str], frame_counts: Sequence[int],
                 transform: Callable | None = None) -> None:
        if len(video_ids) != len(frame_counts) or not video_ids:
            raise ValueError("TrainFrames needs one frame count per video and at least one video")
        self.frame_root = frame_root
        self.video_ids = list(video_ids)
        self.frame_counts = [int(n) for n in frame_counts]
        self.offsets = [0, *accumulate(self.frame_counts)]
        self.transform = transform

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[str, int]:
        """Flat index -> (video id, frame number)."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame index {index} out of range [0, {len(self)})")
        v = bisect.bisect_right(self.offsets, index) - 1
        return self.video_ids[v], index - self.offsets[v]

    def load(self, index: int) -> Any:
        """The frame itself, untransformed."""
        return read_frame(self.frame_root, *self.locate(index))

    def __getitem__(self, index: int) -> Any:
        img = self.load(index)
        return self.transform(img) if self.transform is not None else img


def two_view_collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``(view1, view2)`` -> ``(x1, x2)``, the batch layout the training engine takes (as for GLDv2)."""
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


class DistributedFrameSampler(ShardedEpochSampler):
    """The paper's ``DistributedFrameSampler``: one uniformly random frame per training video.

    Videos are permuted with a generator seeded ``seed + epoch + 1`` (the paper's SVD loop hands its sampler the
    1-based epoch); each video's frame is drawn with the per-rank RNG (skeleton in ``datasets.sampler``).
    """

    epoch_offset = 1
    unit_name = "video"

    def __init__(self, frame_counts: Sequence[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        self.frame_counts = [int(n) for n in frame_counts]
        if any(n < 1 for n in self.frame_counts):
            raise ValueError("every training video needs at least one frame")
        self.offsets = [0, *accumulate(self.frame_counts)]
        super().__init__(len(self.frame_counts), batch_size, world_size, rank, seed, error=SVDMetaError)

    def make_batch(self, units: list[int]) -> list[int]:
        return [self.offsets[v] + self.rng.randint(0, self.frame_counts[v] - 1) for v in units]


def sample_pca_frames(video_ids: Sequence[str], frame_counts: Sequence[int], per_video: int = 60,
                      seed: int = 0) -> list[tuple[str, int]]:
    """The SVD PCA frame set: ``min(per_video, n)`` distinct random frames of every video.

    One ``random.Random(seed)`` in video order (seed 0 = the paper's ``random.seed(0)`` on rank 0), so every rank
    computes the same list without a broadcast.
    """
    rng = random.Random(seed)
    frames = []
    for vid, n in zip(video_ids, frame_counts):
        frames.extend((vid, f) for f in rng.sample(range(n), min(per_video, n)))
    return frames


class FrameList(Dataset):
    """Explicit (video id, frame) pairs -> ``(transform(frame), index)`` (PCA learning)."""

    def __init__(self, frame_root: str, frames: Sequence[tuple[str, int]], transform: Callable | None = None) -> None:
        self.frame_root = frame_root
        self.frames = list(frames)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = read_frame(self.frame_root, *self.frames[index])
        return (self.transform(img) if self.transform is not None else img), index


def eval_frame_indices(num_frames: int, max_frames: int = 60, stride: int = 1) -> range:
    """Frames ``0, stride, ...`` below ``min(num_frames, max_frames)``: the *first* frames, as the paper."""
    return range(0, min(num_frames, max_frames), stride)


def frames_per_video(max_frames: int, stride: int) -> int:
    """The most frames a test video can contribute (the padded length of frame-level descriptors)."""
    return len(range(0, max_frames, stride))


class VideoFrames(Dataset):
    """Test videos: item ``i`` is ``(frames (n, 3, H, W), n, i)`` with the frames of :func:`eval_frame_indices`."""

    def __init__(self, frame_root: str, video_ids: Sequence[str], frame_counts: Sequence[int],
                 transform: Callable, max_frames: int = 60, stride: int = 1) -> None:
        if max_frames < 1 or stride < 1:
            raise ValueError(f"--max_frames and --stride must be >= 1, got {max_frames} and {stride}")
        self.frame_root = frame_root
        self.video_ids = list(video_ids)
        self.frame_counts = [int(n) for n in frame_counts]
        self.transform = transform
        self.max_frames = max_frames
        self.stride = stride

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        vid = self.video_ids[index]
        frames = [self.transform(read_frame(self.frame_root, vid, f))
                  for f in eval_frame_indices(self.frame_counts[index], self.max_frames, self.stride)]
        return torch.stack(frames), len(frames), index


def video_collate(samples: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Videos -> (all their frames concatenated, per-video frame counts, dataset indices)."""
    frames, lens, idx = zip(*samples)
    return torch.cat(frames), torch.tensor(lens, dtype=torch.long), torch.tensor(idx, dtype=torch.long)
