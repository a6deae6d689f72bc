"""The descriptors of an evaluation part, shard by shard: embedded once per model and protocol, then read from the
feature store (``--feature_cache``), with the same shards whether a store is used or not.

A part (queries, database, distractors, SVD videos) is cut into shards of consecutive items. Each process takes its
share of the shards; shards missing from the store are embedded (and written as soon as they are complete), the
others are read. No process ever holds a whole part: consumers score a shard and drop it. Scoring by the same
shards with or without the store makes the results bit-identical (float32 store).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from models.embedder import Embedder, build_embedder
from models.pca_layer import pca_weight_path
from models.teachers import teacher_file
from utils.distributed import DistContext, barrier, broadcast_object, gather_objects
from utils.errors import UserError
from utils.feature_store import REFRESH_FIX, StoreEntry, items_fingerprint
from utils.features import EmbedFn, embedded_batches
from utils.files import sha256_file
from utils.flags import role_values
from utils.locks import lock_for_job
from utils.log import get_logger
from utils.preemption import ignore_stop_signals

# Images per shard. Small enough that every rank of an 8-GPU node has shards of ROxford's 4,993 database images
# (20 shards; with 4,096 only 2 ranks of 8 worked) and a kill redoes seconds of extraction; R1M: 3,911 shards.
IMAGE_SHARD = 256
VIDEO_SHARD = 256  # videos per shard (up to 60 frames each)


@dataclass
class Extraction:
    """How a run makes and keeps descriptors: the store (``--feature_cache``; None: no store), its precision,
    whether to extract again, the loader workers, the forwards' precision and the progress bars."""

    store: str | None = None
    dtype: str = "float32"
    refresh: bool = False
    num_workers: int = 0
    amp: str = "none"
    progress: bool = True

    @classmethod
    def of(cls, params: Any) -> Extraction:
        """An evaluation's, from its parameters."""
        return cls(params.feature_cache, params.cache_dtype, params.refresh_cache, params.num_workers, params.amp,
                   not params.no_progress)


def evaluated_model(params: Any) -> Embedder:
    """The model an evaluation embeds with (a student, or a teacher with or without its PCA), on the CPU."""
    return build_embedder(arch=params.arch, resume=params.resume, teacher=params.teacher, pca=params.pca,
                          weights_dir=params.path_to_pretrained_weights if params.teacher is not None else None,
                          embed_dim=params.embed_dim, gem_p=params.p, trust=params.trust_checkpoint,
                          pool=params.teacher_pool, pca_data=params.pca_data)


def model_key(params: Any) -> dict[str, Any]:
    """What of an evaluation's model and flags changes the descriptors of every part: the flags declared with
    ``store=True`` and the bytes of the teacher's files (a student's checkpoint is hashed by its flag's key)."""
    key = role_values(params, "store")
    if params.teacher is not None:
        weights = Path(params.path_to_pretrained_weights)
        key["file_sha256"] = sha256_file(teacher_file(params.teacher, weights))
        if params.pca:
            key["pca_sha256"] = sha256_file(pca_weight_path(weights, params.teacher, params.embed_dim,
                                                            params.pca_data, params.teacher_pool, params.p))
    return key


@dataclass
class Part:
    """One part of an evaluation: its items, their names (the store key uses names and order), what else changes
    its descriptors, and how to batch it."""

    name: str
    dataset: Dataset
    names: Sequence[str]
    protocol: dict[str, Any]
    several_rows: bool = False  # rows per item vary (a video's frames, an image's K views): batches are
    # (images, rows per item, indices, *extras)
    batch_size: int = 1
    collate_fn: Callable | None = None
    extras: tuple[str, ...] = ()  # arrays with a row per descriptor row, stored beside it
    shard_size: int | None = None  # items per shard (default: by kind)
    items_key: str | None = None  # the item list's identity, when the caller has it (default: from ``names``)
    unit: str | None = None  # of the progress bar's rate (default: img, or frames for videos)
    fix: str = REFRESH_FIX  # what the error of a damaged store entry tells the user to do ({folder}: its folder)

    @property
    def shard_items(self) -> int:
        return self.shard_size or (VIDEO_SHARD if self.several_rows else IMAGE_SHARD)


@dataclass
class Shard:
    """Consecutive items ``[start, end)`` of a part: their descriptors (rows x D, float32, on the device) and, for
    videos, the frames of each (rows = their sum)."""

    index: int
    start: int
    end: int
    feats: torch.Tensor
    lengths: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StoreReport:
    """Which parts this run extracted and which it read from the store (``tools/paper_tables.py`` sums them)."""

    extracted: list[str] = field(default_factory=list)
    read: list[str] = field(default_factory=list)

    def record(self, folder: str | None, dtype: str) -> dict[str, Any]:
        """The JSON results' ``feature_store`` entry."""
        return {"dir": folder, "dtype": dtype, "extracted": self.extracted, "read": self.read}


class PartExtractor:
    """Embeds or reads the shards of parts for one model, on every rank. ``model``: the store key's model
    components (``model_key``; hashing the files is needed only with a store)."""

    def __init__(self, embed: EmbedFn, ctx: DistContext, how: Extraction, model: dict[str, Any],
                 should_stop: Callable[[], bool] | None = None, label: str = "the model") -> None:
        self.embed, self.ctx, self.how, self.model, self.label = embed, ctx, how, model, label
        self.report = StoreReport()
        # asked after each embedded shard (this rank's own answer: no collective); True ends the embedding, the
        # finished shards stay in the store and the entry stays incomplete, to be continued by a later run
        self.should_stop = should_stop

    def entry(self, part: Part) -> StoreEntry | None:
        if self.how.store is None:
            return None
        components = {"part": part.name, "model": self.model, "protocol": part.protocol,
                      "items": part.items_key or items_fingerprint(part.names)}
        return StoreEntry(self.how.store, components, len(part.names), part.shard_items,
                          self.how.dtype, videos=part.several_rows, extras=part.extras, fix=part.fix)

    def shards(self, part: Part) -> Iterator[Shard]:
        """This rank's shards of ``part``, in no particular order; the store entry is complete once all ranks have
        exhausted the iterator (call it on every rank)."""
        ctx = self.ctx
        entry = self.entry(part)
        writes = entry is not None and broadcast_object((self.how.refresh or not entry.complete)
                                                        if ctx.is_main else None)
        lock = lock_for_job(entry.folder, "the feature-store entry", ctx.is_main) if writes else None
        try:
            yield from self._shards(part, entry)
        finally:
            if lock is not None:
                lock.release()

    def _shards(self, part: Part, entry: StoreEntry | None) -> Iterator[Shard]:
        ctx, logger = self.ctx, get_logger()
        if entry is not None and self.how.refresh and ctx.is_main:
            entry.clear()
        barrier()
        done = broadcast_object(sorted(entry.done_shards()) if entry is not None and ctx.is_main else None)
        done = set(done or [])
        n_shards = -(-len(part.names) // part.shard_items)
        todo = [s for s in range(n_shards) if s not in done]
        complete = entry is not None and entry.complete and not todo  # a shard deleted by hand is embedded again
        if ctx.is_main:
            where = f" (store {entry.folder})" if entry is not None else ""
            if complete:
                logger.info("%s: %d items read from the feature store%s", part.name, len(part.names), where)
            else:
                logger.info("%s: %d items, %d of %d shards to embed%s", part.name, len(part.names), len(todo),
                            n_shards, where)
        (self.report.read if complete else self.report.extracted).append(part.name)
        dim, stopped = None, False
        for shard in self._embedded(part, entry, todo[ctx.rank::ctx.world_size]):
            dim = shard.feats.shape[1]
            yield shard
            if self.should_stop is not None and self.should_stop():
                stopped = True
                break
        for s in [] if stopped else sorted(done)[ctx.rank::ctx.world_size]:
            feats, lengths = entry.read_shard(s)
            start, end = entry.bounds(s)
            dim = feats.shape[1]
            yield Shard(s, start, end, torch.from_numpy(feats).to(ctx.device),
                        None if lengths is None else torch.from_numpy(lengths).to(ctx.device))
        barrier()
        if entry is not None and not complete:
            answers = gather_objects((dim, stopped), ctx)
            dims = [d for d, _ in answers if d is not None]
            if ctx.is_main and (len(entry.done_shards()) == entry.n_shards or not any(s for _, s in answers)):
                entry.finish(dims[0])

    def _embedded(self, part: Part, entry: StoreEntry | None, shards: list[int]) -> Iterator[Shard]:
        """Embed ``shards`` in one loader pass (one set of workers), cutting the stream at shard boundaries."""
        size = part.shard_items
        bounds = [(s, s * size, min((s + 1) * size, len(part.names))) for s in shards]
        indices = [i for _, start, end in bounds for i in range(start, end)]
        if not indices:
            return
        loader = DataLoader(Subset(part.dataset, indices), batch_size=part.batch_size, shuffle=False,
                            num_workers=self.how.num_workers, collate_fn=part.collate_fn,
                            pin_memory=self.ctx.device.type == "cuda", worker_init_fn=ignore_stop_signals)
        pieces: list[list[torch.Tensor]] = []  # per item: its rows, then its extras' rows
        queue = iter(bounds)
        current = next(queue)
        unit = part.unit or ("frames" if part.several_rows else "img")
        for out, rest in embedded_batches(self.embed, loader, self.ctx, self.how.amp, self.how.progress,
                                          part.name, unit=unit):
            per_item = rest[0].tolist() if part.several_rows else [1] * out.shape[0]
            extras = rest[2:] if part.several_rows else []
            for item in zip(torch.split(out, per_item), *(torch.split(e, per_item) for e in extras)):
                pieces.append(list(item))
                s, start, end = current
                if len(pieces) == end - start:
                    yield self._finish_shard(entry, part, s, start, end, pieces)
                    pieces = []
                    current = next(queue, None)

    def _finish_shard(self, entry: StoreEntry | None, part: Part, s: int, start: int, end: int,
                      pieces: list[list[torch.Tensor]]) -> Shard:
        feats = torch.cat([p[0] for p in pieces])
        rows = [p[0].shape[0] for p in pieces]  # per item
        finite = torch.isfinite(feats).all(dim=1).cpu()
        if not bool(finite.all()):  # before it is stored or scored: a NaN ranks arbitrarily and fails later
            row_items = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor(rows))
            item = start + int(row_items[int((~finite).nonzero()[0])])
            raise UserError(f"{self.label} gave non-finite descriptors (NaN or inf) for {part.name}, e.g. item "
                            f"{part.names[item]}: its weights hold NaN/inf (check the -r/-t file)"
                            + (" or --amp overflowed (run with --amp none)" if self.how.amp == "fp16" else ""))
        lens = torch.tensor(rows, dtype=torch.long, device=feats.device) if part.several_rows else None
        extras = {name: torch.cat([p[1 + k] for p in pieces]) for k, name in enumerate(part.extras)}
        if entry is not None:
            entry.write_shard(s, feats.cpu().numpy(), None if lens is None else lens.cpu().numpy(),
                              {name: e.cpu().numpy() for name, e in extras.items()})
            if entry.dtype != "float32":  # score what the store holds, so a later read gives the same results
                feats = feats.to(getattr(torch, entry.dtype)).float()
        return Shard(s, start, end, feats, lens, extras)

    def gather(self, part: Part) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole part on every rank (for the queries, small): (rows x D), frames per video or None."""
        mine = [(sh.index, sh.feats.cpu(), None if sh.lengths is None else sh.lengths.cpu())
                for sh in self.shards(part)]
        shards = sorted((s for rank in gather_objects(mine, self.ctx) for s in rank), key=lambda s: s[0])
        feats = torch.cat([s[1] for s in shards]).to(self.ctx.device)
        lengths = torch.cat([s[2] for s in shards]).to(self.ctx.device) if part.several_rows else None
        return feats, lengths
