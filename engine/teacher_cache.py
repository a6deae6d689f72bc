"""The teachers' whitened embeddings computed once (``--teacher_cache DIR --teacher_views K``), not every epoch.

For every training image (GLDv2) or frame (SVD), K views are drawn from exactly the training distribution
(``datasets.transforms.ReplayableView``: the paper's transforms, their random choices stored) and every teacher's
whitened, L2-normalised embedding of each view is stored beside the view's parameters, in the feature store
(``utils.feature_store``: keyed, sharded, resumable, built by all ranks). Training then loads, for each sampled
image, one of its K views (chosen by the item's seed: reproducible per epoch and rank, and across a resume), makes
that view's pixels again from its parameters for the student, and reads the teachers' embeddings: no teacher is
built or run. SVD frames have two view distributions (the paper's two distillation views): K of each.

What it trades: a fresh crop every epoch for K crops per image. Disk: items x K x teachers x embed_dim x 2 bytes
(float16), e.g. GLDv2-clean (1.58M images), K = 8, 2 teachers at 512-d: 26 GB.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.transforms import ReplayableView
from engine.features import Extraction, Part, PartExtractor
from models.distill_model import WhitenedTeachers
from utils.distributed import DistContext
from utils.feature_store import StoreEntry
from utils.flags import role_values
from utils.log import get_logger
from utils.preemption import StopRequest
from utils.runtime import mixed_seed, seeded_host_rngs

CACHE_SHARD = 1024  # items per shard
VIEWS_PER_BATCH = 64  # views embedded per teacher batch
OPEN_SHARDS = 64  # memory-mapped shards kept open per process and chain


def view_seed(seed: int, chain: int, item: int, view: int) -> int:
    """The seed of an item's ``view``-th stored view of a view distribution (``chain``), by the rule the sampler's
    item seeds use (``mixed_seed``) with factors of its own."""
    return mixed_seed(seed, chain, item, view, factors=(1_000_003, 10_000_019, 1_009))


def drawn_view(view: ReplayableView, img: Any, seed: int) -> tuple[list[float], torch.Tensor]:
    """(parameters, pixels) of a view drawn with RNGs seeded by ``seed`` (restored afterwards)."""
    with seeded_host_rngs(seed):
        params = view.sample(img)
    return params, view.apply(img, params)


class ViewsToEmbed(Dataset):
    """Item ``i``: its K views ``(K, 3, H, W)``, K, i, and the views' parameters ``(K, P)``."""

    def __init__(self, load: Callable[[int], Any], n_items: int, view: ReplayableView, chain: int, views: int,
                 seed: int) -> None:
        self.load, self.n, self.view, self.chain, self.views, self.seed = load, n_items, view, chain, views, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        img = self.load(i)
        drawn = [drawn_view(self.view, img, view_seed(self.seed, self.chain, i, v)) for v in range(self.views)]
        return (torch.stack([x for _, x in drawn]), self.views, i,
                torch.tensor([p for p, _ in drawn], dtype=torch.float64))


def views_collate(samples: list[tuple]) -> tuple[torch.Tensor, ...]:
    views, counts, indices, params = zip(*samples)
    return (torch.cat(views), torch.tensor(counts, dtype=torch.long), torch.tensor(indices, dtype=torch.long),
            torch.cat(params))


class TeacherCache:
    """The stored views of a training list, one store entry per view distribution (``chains``)."""

    def __init__(self, params: Any, n_items: int, items_key: str, load: Callable[[int], Any],
                 chains: Sequence[ReplayableView]) -> None:
        """``params``: the run's ``engine.params.TrainParams``; ``items_key``: the training list's fingerprint."""
        self.n_items, self.items_key, self.load, self.chains = n_items, items_key, load, list(chains)
        self.views, self.seed, self.n_teachers = params.teacher_views, params.seed, len(params.teachers)
        self.how = Extraction(params.teacher_cache, params.teacher_cache_dtype, False, params.num_workers, params.amp,
                              not params.no_progress)
        # the flags declared to change a stored embedding, and the teachers' and PCA files' bytes (hashed by the
        # preflight)
        self.model = {**role_values(params, "teacher_cache"), "weight_sha256": params.weight_sha256}

    def part(self, chain: int) -> Part:
        view = self.chains[chain]
        protocol = {"teacher views": self.views, "view": type(view).__name__, "size": view.size, "chain": chain,
                    **{k: getattr(view, k) for k in ("blur_p", "solarize_p") if hasattr(view, k)}}
        dataset = ViewsToEmbed(self.load, self.n_items, view, chain, self.views, self.seed)
        return Part(f"teacher views {chain + 1}/{len(self.chains)}", dataset, range(self.n_items), protocol,
                    several_rows=True, batch_size=max(1, VIEWS_PER_BATCH // self.views), collate_fn=views_collate,
                    extras=("params",), shard_size=CACHE_SHARD, items_key=self.items_key, unit="views",
                    fix="delete {folder} (a part of the teacher cache); the next run builds it again")

    def entries(self) -> list[StoreEntry]:
        extractor = PartExtractor(lambda x: x, DistContext(), self.how, self.model)
        return [extractor.entry(self.part(chain)) for chain in range(len(self.chains))]

    @property
    def complete(self) -> bool:
        return all(entry.complete for entry in self.entries())

    def build(self, teachers: WhitenedTeachers, ctx: DistContext, stop: StopRequest | None = None) -> bool:
        """Embed the missing shards of every chain (all ranks). Returns True when the entries are complete; False
        after a stop signal (each rank ends after its current shard, all ranks agree before the next chain; the
        finished shards are kept and a later build continues)."""
        def embed(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([F.normalize(t, dim=-1) for t in teachers(x)], dim=1)

        should_stop = (lambda: stop.received is not None) if stop is not None else None
        extractor = PartExtractor(embed, ctx, self.how, self.model, should_stop)
        with torch.inference_mode():
            for chain in range(len(self.chains)):
                if stop is not None and stop.agreed(ctx):  # a collective: every rank asks once per chain
                    break
                for _ in extractor.shards(self.part(chain)):
                    pass
        entries = self.entries()
        complete = all(entry.complete for entry in entries)
        if complete:
            get_logger().info("teacher cache complete: %s", ", ".join(str(e.folder) for e in entries))
        return complete


class CachedViews:
    """Random access to the stored views of one chain: a view's parameters and the teachers' embeddings."""

    def __init__(self, entry: StoreEntry, views: int, n_teachers: int) -> None:
        self.entry, self.views, self.n_teachers = entry, views, n_teachers
        # per process, memory-mapped; the least recently used are closed (a shard holds two open files, and GLDv2's
        # 1.58M images make 1,544 shards per chain, more than a usual open-file limit per loader worker)
        self._open: OrderedDict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = OrderedDict()

    def row(self, item: int, view: int) -> tuple[list[float], torch.Tensor]:
        shard = item // self.entry.shard_items
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            if len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)
            self._open[shard] = self.entry.open_shard(shard)
        feats, extras = self._open[shard]
        r = (item - shard * self.entry.shard_items) * self.views + view
        embeddings = torch.from_numpy(np.array(feats[r], dtype=np.float32)).view(self.n_teachers, -1)
        return [float(v) for v in extras["params"][r]], embeddings


class CachedItems(Dataset):
    """A training item from the cache: for each chain, the item's chosen view (the student's input, made again from
    its parameters) and the teachers' embeddings of that view. The view is drawn with the item's seed (loaded
    through ``SeededItems``), so it is reproducible per epoch and rank and across a resume."""

    def __init__(self, cache: TeacherCache) -> None:
        self.load, self.chains, self.views, self.n = cache.load, cache.chains, cache.views, cache.n_items
        self.cached = [CachedViews(entry, cache.views, cache.n_teachers) for entry in cache.entries()]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: int) -> tuple:
        img = self.load(item)
        out = []
        for view, cached in zip(self.chains, self.cached):
            params, embeddings = cached.row(item, int(torch.randint(self.views, (1,))))
            out += [view.apply(img, params), embeddings]
        return tuple(out)


def cached_halves_collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """GLDv2's batch layout (the first images of the pairs, then the second ones), from cached items ``(view,
    teachers' embeddings)``: ``(x1, x2, t1, t2)`` with ``t1``/``t2`` one (B, D) tensor per teacher."""
    views = torch.stack([s[0] for s in samples])
    embeddings = torch.stack([s[1] for s in samples])  # (2B, teachers, D)
    half = views.shape[0] // 2
    return (views[:half], views[half:], list(embeddings[:half].unbind(1)), list(embeddings[half:].unbind(1)))


def cached_pairs_collate(samples: list[tuple[torch.Tensor, ...]]) -> tuple:
    """SVD's batch layout (two views of each frame), from cached items ``(view 1, its embeddings, view 2, ...)``."""
    x1, t1, x2, t2 = (torch.stack([s[k] for s in samples]) for k in range(4))
    return x1, x2, list(t1.unbind(1)), list(t2.unbind(1))
