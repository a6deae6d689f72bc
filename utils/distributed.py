"""This process's place among the ranks (``DistContext``) and the collectives the engine uses.

``DistContext`` is the one source of rank and world size: the launcher (``utils.launch.init_distributed``) makes it
and hands it to the work; code that is not handed one (the loss inside DDP's forward, a barrier deep in a helper)
reads the same object through ``DistContext.current()``. Nothing here asks ``torch.distributed`` who this rank is.
With world size 1 every collective returns at once and no process group is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launch: str = "launch: one process"  # how the ranks were started, for the log

    _current: ClassVar[DistContext | None] = None  # set by make_current (the launcher's init_distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> DistContext:
        """The context the launcher made for this process; one process on the CPU when none was made (a test, a
        notebook)."""
        return cls._current if cls._current is not None else cls()

    def make_current(self) -> DistContext:
        """Make this the context ``current()`` returns (once the process group it describes exists)."""
        DistContext._current = self
        return self

    @classmethod
    def clear_current(cls) -> None:
        """Back to one process (the process group was destroyed)."""
        cls._current = None


def _resolve(ctx: DistContext | None) -> DistContext:
    return DistContext.current() if ctx is None else ctx


def barrier(ctx: DistContext | None = None) -> None:
    """All ranks meet; under NCCL on this process's current GPU (which the process group is never told)."""
    if _resolve(ctx).distributed:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_with_grad(x: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0; the local shard keeps its autograd graph.

    The other shards are constants, so each rank back-propagates only through its own rows; the training loss is
    multiplied by the world size so that DDP's gradient averaging yields the gradient of the global loss.
    """
    ctx = _resolve(ctx)
    if not ctx.distributed:
        return x
    shards = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(shards, x.detach().contiguous())
    shards[ctx.rank] = x
    return torch.cat(shards, dim=0)


def broadcast_object(obj: Any, src: int = 0, ctx: DistContext | None = None) -> Any:
    """Broadcast a picklable object from ``src`` (works for gloo and nccl)."""
    if not _resolve(ctx).distributed:
        return obj
    holder = [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(holder, src=src, device=device)
    return holder[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (picklable objects)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
