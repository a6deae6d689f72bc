"""The paper's distributed training samplers share one skeleton, kept here once.

Per epoch the training units (landmark groups, videos) are permuted with a generator seeded ``seed + epoch +
epoch_offset``, truncated to a multiple of the world size and dealt out as ``perm[rank::world_size]``; batches hold
``batch_size`` units (the last one may be smaller, as the paper's; a last batch of a single unit joins the one
before, which then holds ``batch_size + 1``: BatchNorm cannot normalise one image per process and one pair has no
negatives, so the paper's code crashed there). What is drawn inside a unit (two images of a landmark, one
frame of a video) comes from a per-rank ``random.Random(seed + rank)`` (seed 0 = the paper's
``random.seed(rank)``) whose state is checkpointed, so a resumed run draws exactly what it would have drawn.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from utils.runtime import mixed_seed, python_rng_state, seeded_host_rngs, set_python_rng_state

MIN_BATCH = 2  # pairs (or frames) per process and batch


class ShardedEpochSampler(Sampler[list[int]]):
    """Base batch sampler; subclasses turn a list of unit indices into one batch of dataset indices."""

    epoch_offset = 0
    unit_name = "unit"

    def __init__(self, n_units: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 error: type[Exception] = ValueError) -> None:
        if batch_size < MIN_BATCH:
            raise ValueError(f"-b/--batch_size must be >= {MIN_BATCH} pairs per process, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n_units = n_units
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.units_per_rank = n_units // world_size
        if self.units_per_rank < MIN_BATCH:
            raise error(f"{n_units} training {self.unit_name}(s) over {world_size} process(es) leave "
                        f"{self.units_per_rank} per process and epoch; a batch needs at least {MIN_BATCH}: use fewer "
                        "processes or more data.")
        self.rng = random.Random(seed + rank)

    def make_batch(self, units: list[int]) -> list[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """``epoch`` is 0-based (the training engine's count)."""
        self.epoch = epoch

    def batch_bounds(self) -> list[tuple[int, int]]:
        """(start, end) of each batch in this rank's units; identical on every rank, so DDP stays in step."""
        n, b = self.units_per_rank, self.batch_size
        bounds = [(start, min(start + b, n)) for start in range(0, n, b)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:  # a single-unit tail joins the batch before
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    def __len__(self) -> int:
        return len(self.batch_bounds())

    def rank_units(self) -> list[int]:
        """Indices of the units this rank visits this epoch, in order."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch + self.epoch_offset)
        perm = torch.randperm(self.n_units, generator=gen).tolist()
        return perm[: self.units_per_rank * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.rank_units()
        for start, end in self.batch_bounds():
            yield self.make_batch(mine[start:end])

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (loadable with ``weights_only=True``); taken at an epoch boundary."""
        return {"epoch": self.epoch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "rng": python_rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["world_size"]) != (self.seed, self.world_size):
            raise ValueError(f"sampler state was saved with seed {state['seed']} and world size "
                             f"{state['world_size']}, this run has seed {self.seed} and world size {self.world_size}")
        self.epoch = int(state["epoch"])
        set_python_rng_state(self.rng, state["rng"])


def item_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The augmentation seed of the ``position``-th item a rank loads in an epoch."""
    return mixed_seed(seed, epoch, rank, position, factors=(1_000_003, 10_007, 4_000_037))


class SeededBatches:
    """An epoch sampler's batches with a seed per item, ``(index, seed)``; the seed depends only on (seed, epoch,
    rank, position in the epoch), so an item's augmentation is the same whichever loader worker draws it, and a run
    resumed in the middle of an epoch (``skip`` its first batches) sees exactly the batches and augmentations it
    would have seen. The skipped batches are drawn again, which advances the sampler's RNG as the first run did."""

    def __init__(self, sampler: ShardedEpochSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed
        self.skip = 0
        self.epoch_start_state = sampler.state_dict()

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def batch_bounds(self) -> list[tuple[int, int]]:
        return self.sampler.batch_bounds()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self.epoch_start_state = self.sampler.state_dict()  # what a checkpoint in the middle of this epoch keeps
        position = 0
        for b, batch in enumerate(self.sampler):
            if b >= self.skip:
                yield [(i, item_seed(self.seed, self.sampler.epoch, self.sampler.rank, position + j))
                       for j, i in enumerate(batch)]
            position += len(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class SeededItems(torch.utils.data.Dataset):
    """``dataset[index]`` drawn with the Python and torch CPU RNGs seeded by the item's own seed, restored afterwards
    (in a loader worker or in the training process alike; the GPUs' generators are left alone)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with seeded_host_rngs(seed):
            return self.dataset[index]
