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

import argparse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.transforms import ReplayableView
from engine.features import Part, PartExtractor
from models.distill_model import WhitenedTeachers
from utils.argtypes import int_at_least, output_dir
from utils.distributed import DistContext
from utils.feature_store import StoreEntry
from utils.log import get_logger
from utils.preemption import StopRequest
from utils.runtime import seeded_host_rngs

CACHE_SHARD = 1024  # items per shard
VIEWS_PER_BATCH = 64  # views embedded per teacher batch
OPEN_SHARDS = 64  # memory-mapped shards kept open per process and chain


def add_cache_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--teacher_cache", default=None, metavar="DIR", type=output_dir,
                       help="store the teachers' embeddings of --teacher_views views per image once, then train "
                            "from them without running a teacher (built by the first run that names it; reused when "
                            "the teachers' files, PCA files, -p, --embed_dim, the crop size, --amp, the image list, K "
                            "and the seed match). Default: the teachers run on every crop, as the paper")
    group.add_argument("--teacher_views", type=int_at_least(1), default=8, metavar="K",
                       help="views stored per image (or frame, per view distribution): each epoch uses one")
    group.add_argument("--teacher_cache_dtype", default="float16", choices=["float16", "float32"],
                       help="storage of the cached embeddings (float16 halves the disk)")


def view_seed(seed: int, chain: int, item: int, view: int) -> int:
    return (((seed * 1_000_003 + chain) * 10_000_019 + item) * 1_009 + view) % (2**63)


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

    def __init__(self, args: argparse.Namespace, n_items: int, items_key: str, load: Callable[[int], Any],
                 chains: Sequence[ReplayableView]) -> None:
        self.args, self.n_items, self.items_key, self.load, self.chains = args, n_items, items_key, load, list(chains)
        self.views = args.teacher_views
        self.store_args = argparse.Namespace(feature_cache=args.teacher_cache, cache_dtype=args.teacher_cache_dtype,
                                             refresh_cache=False, num_workers=args.num_workers, amp=args.amp,
                                             no_progress=args.no_progress)
        # the teachers' and PCA files' bytes (hashed by the preflight), the flags that change an embedding
        self.model = {"teachers": list(args.teachers), "weight_sha256": args.weight_sha256,
                      "embed_dim": args.embed_dim, "p": args.p, "seed": args.seed, "amp": args.amp}

    def part(self, chain: int) -> Part:
        view = self.chains[chain]
        protocol = {"teacher views": self.views, "view": type(view).__name__, "size": view.size, "chain": chain,
                    **{k: getattr(view, k) for k in ("blur_p", "solarize_p") if hasattr(view, k)}}
        dataset = ViewsToEmbed(self.load, self.n_items, view, chain, self.views, self.args.seed)
        return Part(f"teacher views {chain + 1}/{len(self.chains)}", dataset, range(self.n_items), protocol,
                    videos=True, batch_size=max(1, VIEWS_PER_BATCH // self.views), collate_fn=views_collate,
                    extras=("params",), shard_size=CACHE_SHARD, items_key=self.items_key, unit="views",
                    fix="delete {folder} (a part of the teacher cache); the next run builds it again")

    def entries(self) -> list[StoreEntry]:
        extractor = PartExtractor(lambda x: x, DistContext(), self.store_args, self.model)
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
        extractor = PartExtractor(embed, ctx, self.store_args, self.model, should_stop)
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
        self.cached = [CachedViews(entry, cache.views, len(cache.args.teachers)) for entry in cache.entries()]

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
