"""Machinery every benchmark shares: flags, interleaved timing, peak memory, hardware limits, tables, JSON.

Machines are noisy (the CI box is shared), so a comparison is timed *interleaved*: every repeat runs each
contender once, in a rotating order, and the reported figure is the median over repeats. Ratios are always
taken from one such run, never across runs.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from utils import files, runtime
from utils.config import to_plain

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


# ------------------------------------------------------------------------------------------------------ setup
def add_common_args(parser: argparse.ArgumentParser, repeats: int = 3, warmup: int = 1) -> None:
    group = parser.add_argument_group("measurement")
    group.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats; medians are quoted "
                       f"(default {repeats})")
    group.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls first (default {warmup})")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: the GPU when one is visible, else the CPU")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    group.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads/--seed`` and resolve ``--device``."""
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    map_large_allocations()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but no GPU is visible; use --device cpu.")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------- timing
def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed rounds, then ``repeats`` rounds in which every
    function runs once (the starting function rotates, so none always follows the same neighbour)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------------------------------- memory
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def map_large_allocations(threshold: int = 256 * 1024) -> bool:
    """Serve every allocation >= ``threshold`` bytes by its own ``mmap`` (glibc), unmapped again on free.

    Without this, glibc recycles freed blocks inside its heap: the resident set then tracks the heap's history
    (holes faulted back in one by one) rather than the bytes live now, and a peak read from it can grow with the
    size of earlier, already freed data. Called once by ``setup``; False where the C library is not glibc."""
    libc = runtime.glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next peak counts only what is allocated anew."""
    gc.collect()
    runtime.release_freed_memory()


def _reset_rss_peak() -> bool:
    """Set the high-water mark to the current resident set; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


class PeakMemory:
    """Peak memory a block adds on top of what was live when it started, in bytes (``None``: unmeasurable).

    CUDA: the caching allocator's peak (``max_memory_allocated``). CPU: the process's resident-set high-water mark
    (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set at entry, after freed heap
    pages were returned to the OS; it therefore covers torch, numpy and Python allocations alike.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water mark (VmHWM)"

    def __enter__(self) -> PeakMemory:
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif _reset_rss_peak():
            self._base = _status_kib("VmRSS") * 1024
        else:
            self._base = None
            self.method = "unavailable (needs Linux /proc)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak_bytes = max(0, _status_kib("VmHWM") * 1024 - self._base)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes ``fn()`` needs at its peak beyond the live data (one call)."""
    with PeakMemory(device) as mem:
        fn()
    return mem.peak_bytes


def mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / MIB


# ------------------------------------------------------------------------------------------ hardware limits
def matmul_probe(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None
                 ) -> tuple[Callable[[], Any], float]:
    """One large square matrix multiply and its FLOPs: the machine's practical compute peak for ``dtype``.

    Time it interleaved with the contenders (``time_interleaved``) so that the peak is measured under the same
    load as the figures it is compared with; on a shared machine a peak taken once, apart, drifts by 20-30 %."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * size**3


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                repeats: int = 5) -> float:
    """GFLOP/s of ``matmul_probe`` on its own (median of ``repeats``)."""
    probe, flop = matmul_probe(device, dtype, size)
    seconds = time_interleaved({"mm": probe}, repeats=repeats, warmup=2, device=device)
    return flop / median(seconds["mm"]) / 1e9


def memory_bandwidth(device: torch.device, n_bytes: int = 256 * MIB, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written): the limit of memory-bound kernels."""
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = time_interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats, warmup=2, device=device)
    return 2 * n_bytes / median(seconds["copy"]) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (goes into every JSON file and table header)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        from utils.log import git_revision

        info["git"] = git_revision()
    except Exception:  # benchmarks must run from a tarball too
        info["git"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads"
    load = info.get("load_average")
    load_text = f", load average {load[0]:.2f}" if load else ""
    return f"{where}; torch {info['torch']}{load_text}"


# ------------------------------------------------------------------------------------------------ reporting
Column = tuple[str, str, str]  # (row key, header, format spec)


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "nan"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table (pastes into the README unchanged, reads fine in a terminal)."""
    header = [h for _, h, _ in columns]
    body = [[_cell(row.get(k), spec) for k, _, spec in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    print(f"\n### {title}\n", flush=True)
    print(format_table(rows, columns), flush=True)


def write_json(path: str | os.PathLike | None, benchmark: str, args: argparse.Namespace, machine: dict[str, Any],
               results: dict[str, Any]) -> None:
    """``{"benchmark", "command", "args", "machine", "results"}`` (NaN -> null), written atomically."""
    if not path:
        return
    record = {"benchmark": benchmark, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "args": vars(args), "machine": machine, "results": results}
    files.write_json(path, to_plain(record))
    print(f"\nresults written to {path}", flush=True)


@contextmanager
def stage(name: str, enabled: bool = True):
    """Print how long a preparation step took (model building, data generation)."""
    start = time.perf_counter()
    yield
    if enabled:
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)


def gather_all_features(embed: Callable[[torch.Tensor], torch.Tensor], loader: Any, total: int, ctx: Any
                        ) -> torch.Tensor:
    """The baseline of the memory benchmarks: how PCA learning extracted features before it used sufficient
    statistics. Every rank embeds its share ``(images, indices)``, then every rank all-gathers every rank's rows and
    indices (padded to the longest share) and assembles the whole (total, D) matrix, on the device and on the host."""
    import torch.distributed as dist

    feats, idxs = [], []
    with torch.inference_mode():
        for images, indices in loader:
            feats.append(embed(images.to(ctx.device)).float())
            idxs.append(torch.as_tensor(indices, dtype=torch.long, device=ctx.device))
        mine, index = torch.cat(feats), torch.cat(idxs)
        if ctx.world_size > 1:
            n_max = -(-total // ctx.world_size)
            padded = torch.zeros((n_max, mine.shape[1]), dtype=mine.dtype, device=ctx.device)
            padded[: mine.shape[0]] = mine
            padded_index = torch.full((n_max,), -1, dtype=torch.long, device=ctx.device)
            padded_index[: index.shape[0]] = index
            shards = [torch.empty_like(padded) for _ in range(ctx.world_size)]
            shard_indices = [torch.empty_like(padded_index) for _ in range(ctx.world_size)]
            dist.all_gather(shards, padded)
            dist.all_gather(shard_indices, padded_index)
            mine, index = torch.cat(shards), torch.cat(shard_indices)
            keep = index >= 0
            mine, index = mine[keep], index[keep]
        out = torch.zeros((total, mine.shape[1]), dtype=mine.dtype, device=ctx.device)
        out[index] = mine
        return out.cpu()


# ------------------------------------------------------------------------------------- synthetic descriptors
class Synthetic(torch.utils.data.Dataset):
    """N items; an item is its index (the 'image'), so the embedding costs nothing but memory."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i)]), i


def synthetic_embed(x: torch.Tensor, dim: int = 2048) -> torch.Tensor:
    """Deterministic (B, dim) descriptors of the indices ``x`` (B, 1)."""
    return torch.sin(x * 0.001 + torch.arange(dim, dtype=torch.float32) * 0.37)
