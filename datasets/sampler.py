"""The paper's distributed training samplers share one skeleton, kept here once.

Per epoch the training units (landmark groups, videos) are permuted with a generator seeded ``seed + epoch +
epoch_offset``, truncated to a multiple of the world size and dealt out as ``perm[rank::world_size]``; batches hold
``batch_size`` units (the last one may be smaller). What is drawn inside a unit (two images of a landmark, one
frame of a video) comes from a per-rank ``random.Random(seed + rank)`` (seed 0 = the paper's
``random.seed(rank)``) whose state is checkpointed, so a resumed run draws exactly what it would have drawn.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler[list[int]]):
    """Base batch sampler; subclasses turn a list of unit indices into one batch of dataset indices."""

    epoch_offset = 0
    unit_name = "unit"

    def __init__(self, n_units: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 error: type[Exception] = ValueError) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n_units = n_units
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.units_per_rank = n_units // world_size
        if self.units_per_rank == 0:
            raise error(f"{n_units} training {self.unit_name}(s) cannot be shared by {world_size} processes; "
                        "use fewer processes or more data.")
        self.rng = random.Random(seed + rank)

    def make_batch(self, units: list[int]) -> list[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """``epoch`` is 0-based (the training engine's count)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.units_per_rank / self.batch_size)

    def rank_units(self) -> list[int]:
        """Indices of the units this rank visits this epoch, in order."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch + self.epoch_offset)
        perm = torch.randperm(self.n_units, generator=gen).tolist()
        return perm[: self.units_per_rank * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.rank_units()
        for start in range(0, len(mine), self.batch_size):
            yield self.make_batch(mine[start:start + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (loadable with ``weights_only=True``); taken at an epoch boundary."""
        version, internal, gauss = self.rng.getstate()
        return {"epoch": self.epoch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["world_size"]) != (self.seed, self.world_size):
            raise ValueError(f"sampler state was saved with seed {state['seed']} and world size "
                             f"{state['world_size']}, this run has seed {self.seed} and world size {self.world_size}")
        self.epoch = int(state["epoch"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
