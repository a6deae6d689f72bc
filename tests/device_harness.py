"""Device provenance: which tensors would live on the GPU if this CPU run were a CUDA run, and every place where
CUDA or NCCL would refuse what the code does.

A CUDA run fails with "Expected all tensors to be on the same device" when an operation meets a tensor on the GPU
and a tensor of one or more dimensions in host memory, and NCCL refuses a collective handed a host tensor. On CPU
every tensor is in host memory, so nothing fails; this harness tracks where each tensor *would* be:

* on the device: the results of ``.to(<device>)`` and ``.cuda()``, of factories given a ``torch.device``
  (``torch.zeros(..., device=ctx.device)``), of ``*_like``/``new_*`` of a device tensor, and of every operation
  with a device tensor among its inputs; a tensor whose ``.data`` is set to a device tensor (``Module.to``);
* in host memory: everything else (``torch.tensor(...)``, ``torch.from_numpy``, a data loader's output,
  ``.cpu()``, a factory given the string ``"cpu"``, tensors made while a data loader fetches a batch or while a
  file is read, which happen on the host in a GPU run too).

It reports (never raises) every operation that mixes a device tensor with a host tensor of one or more dimensions,
except where CUDA accepts it (host index tensors in indexing, ``copy_``, moves, metadata), and every collective
handed a host tensor. The code's convention that makes this exact: a move to the host is written ``.cpu()``,
never ``.to("cpu")`` with a device object.

Use it on a whole script, in this process and in every Python process it starts (torchrun's ranks, spawned ranks):

    python tests/device_harness.py gld_distill.py -a resnet18 ... --num_workers 0
    python tests/device_harness.py -m torch.distributed.run --standalone --nproc_per_node 2 gld_distill.py ...

Each finding is printed as ``DEVICE-MIX <kind> <operation>: <shapes> at <place in the project>``; the exit code is
``EXIT_FINDINGS`` when any process found one, else the command's own. ``--num_workers 0`` keeps the loading in the
tracked process (a worker process is tracked too, but everything it makes is host memory anyway).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parent.parent
EXIT_FINDINGS = 10
REPORT_DIR_ENV = "DEVICE_HARNESS_REPORTS"  # where every tracked process writes its findings
SITE_DIR = Path(__file__).resolve().parent / "device_harness_site"  # its sitecustomize tracks child processes

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace",
             "eye", "rand", "randn", "randint", "randperm", "normal", "scalar_tensor", "empty_strided", "tril_indices",
             "triu_indices", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
             "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
# operations CUDA runs with a host tensor beside a device tensor: moves and copies between memories, metadata,
# and host index tensors in indexing (checked separately: the indexed tensor and the values must agree)
CROSS_DEVICE = {"to", "cpu", "cuda", "copy_", "__get__", "__set__", "set_", "_has_compatible_shallow_copy_type",
                "is_floating_point", "is_complex", "size", "dim", "numel", "__len__", "__repr__", "__format__",
                "data_ptr", "is_contiguous", "element_size", "stride", "storage_offset", "untyped_storage",
                "_is_view", "requires_grad_", "retain_grad", "register_hook", "detach", "detach_", "_make_subclass"}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}
# where tensors are made in host memory in a CUDA run too, whatever ``device=`` says
HOST_CODE = (f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}", f"{os.sep}torch{os.sep}serialization.py",
             f"{os.sep}torch{os.sep}_utils.py", f"{os.sep}torch{os.sep}storage.py")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


def project_frames() -> str:
    """The innermost places of the project's own code on the stack, innermost first."""
    here = Path(__file__).resolve()
    places = []
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path == here or not path.is_absolute() or ROOT not in path.parents or "site-packages" in path.parts:
            continue
        places.append(f"{path.relative_to(ROOT)}:{frame.lineno}")
        if len(places) == 4:
            break
    return " <- ".join(places) or "(outside the project)"


def in_host_code() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in HOST_CODE):
            return True
        frame = frame.f_back
    return False


class DeviceProvenance(TorchFunctionMode):
    """The tracking mode; ``findings`` holds one line per distinct (kind, operation, place)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_device: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.findings: list[str] = []
        self._seen: set[tuple[str, str, str]] = set()
        self.object_collective_depth = 0

    # --------------------------------------------------------------------------------------------- bookkeeping
    def is_device(self, t: torch.Tensor) -> bool:
        return t in self.on_device

    def mark(self, out: Any) -> None:
        for t in tensors_in(out):
            self.on_device[t] = True

    def report(self, kind: str, name: str, detail: str) -> None:
        place = project_frames()
        if (kind, name, place) not in self._seen:
            self._seen.add((kind, name, place))
            self.findings.append(f"DEVICE-MIX {kind} {name}: {detail} at {place}")

    def describe(self, ts: list[torch.Tensor]) -> str:
        return ", ".join(f"{'device' if self.is_device(t) else 'host'} {tuple(t.shape)}" for t in ts)

    # ------------------------------------------------------------------------------------------- placement
    def target(self, name: str, args: tuple, kwargs: dict) -> bool | None:
        """Where the result of a move or a factory lives: True device, False host, None as its inputs."""
        if name == "cpu":
            return False
        if name == "cuda":
            return not in_host_code()
        device = kwargs.get("device")
        if name == "to" and device is None:
            for arg in args[1:]:
                if isinstance(arg, torch.Tensor):
                    return self.is_device(arg)
                if isinstance(arg, (torch.device, str)):
                    device = arg
        if device is None or (name not in FACTORIES and name != "to"):
            return None
        if isinstance(device, str) and device == "cpu":  # written as a host move
            return False
        return not in_host_code()

    def check_mix(self, name: str, args: tuple, kwargs: dict) -> None:
        if name in INDEXING:  # host indices are fine; the indexed tensor and any values must agree
            ts = [args[0]] + list(tensors_in(args[2:])) + list(tensors_in(kwargs.get("values")))
            ts = [t for t in ts if isinstance(t, torch.Tensor)]
        else:
            ts = list(tensors_in((args, kwargs)))
        if any(self.is_device(t) for t in ts) and any(not self.is_device(t) and t.dim() > 0 for t in ts):
            self.report("mix", name, self.describe(ts))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in CROSS_DEVICE:
            self.check_mix(name, args, kwargs)
        out = func(*args, **kwargs)
        if name == "__set__" and len(args) >= 2 and isinstance(args[1], torch.Tensor):  # param.data = ...
            if self.is_device(args[1]):
                self.on_device[args[0]] = True
            else:
                self.on_device.pop(args[0], None)
            return out
        where = self.target(name, args, kwargs)
        if where is None:
            where = any(self.is_device(t) for t in tensors_in((args, kwargs)))
        if where:
            self.mark(out)
        elif isinstance(out, torch.Tensor) and self.is_device(out):  # a host move returned the same object
            with torch._C.DisableTorchFunction():
                out = out.detach() if not out.requires_grad else out.view_as(out)
        return out

    # ------------------------------------------------------------------------------------------- collectives
    def check_collective(self, name: str, args: tuple, kwargs: dict) -> None:
        if self.object_collective_depth:  # they place their buffers themselves (on the current GPU under nccl)
            return
        host = [t for t in tensors_in((args, kwargs)) if not self.is_device(t)]
        if host:
            self.report("collective", name, f"host tensor(s) {[tuple(t.shape) for t in host]}")

    @contextlib.contextmanager
    def collectives_checked(self) -> Iterator[None]:
        """``torch.distributed``'s collectives checked inside (``track_this_process`` keeps them checked)."""
        saved = {name: getattr(dist.distributed_c10d, name) for name in COLLECTIVES + OBJECT_COLLECTIVES
                 if hasattr(dist.distributed_c10d, name)}
        for name, original in saved.items():
            wrapped = self._wrap(name, original, objects=name in OBJECT_COLLECTIVES)
            setattr(dist.distributed_c10d, name, wrapped)
            setattr(dist, name, wrapped)
        try:
            yield
        finally:
            for name, original in saved.items():
                setattr(dist.distributed_c10d, name, original)
                setattr(dist, name, original)

    def _wrap(self, name: str, original: Any, objects: bool) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            if objects:
                self.object_collective_depth += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self.object_collective_depth -= 1
            self.check_collective(name, args, kwargs)
            return original(*args, **kwargs)

        collective.device_harness_original = original
        return collective


def write_report(mode: DeviceProvenance) -> None:
    """At exit: print the findings and leave them for the parent; a process with findings exits EXIT_FINDINGS."""
    if not mode.findings:
        return
    text = "\n".join(mode.findings)
    print(text, file=sys.stderr, flush=True)
    folder = os.environ.get(REPORT_DIR_ENV)
    if folder:
        (Path(folder) / f"findings-{os.getpid()}.txt").write_text(text + "\n")
    sys.stdout.flush()
    os._exit(EXIT_FINDINGS)


def track_this_process() -> DeviceProvenance:
    """Track every tensor of this process from now on (called by the sitecustomize of tracked children)."""
    mode = DeviceProvenance()
    mode.checked = mode.collectives_checked()  # held for the process's life: dropped, it would undo the checks
    mode.checked.__enter__()
    mode.__enter__()
    atexit.register(write_report, mode)
    return mode


def run(argv: list[str]) -> int:
    """Run ``python argv...`` with every Python process it starts tracked; EXIT_FINDINGS on any finding."""
    with tempfile.TemporaryDirectory(prefix="device_harness_") as reports:
        paths = (str(SITE_DIR), str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH"))
        env = {**os.environ, REPORT_DIR_ENV: reports, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        code = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env).returncode
        found = sorted({line for f in Path(reports).glob("findings-*.txt") for line in f.read_text().splitlines()})
    if found:
        print(f"device harness: {len(found)} finding(s) over all processes:", file=sys.stderr)
        print("\n".join(found), file=sys.stderr)
        return EXIT_FINDINGS
    return code


def run_in_process(script: str, argv: list[str]) -> DeviceProvenance:
    """Run a script in this process under the tracking mode (for in-process tests); returns the mode."""
    mode = DeviceProvenance()
    saved_argv, sys.argv = sys.argv, [script, *argv]
    try:
        with mode.collectives_checked(), mode:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        sys.argv = saved_argv
    return mode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python {sys.argv[0]} SCRIPT.py [ARGS...] | -m MODULE [ARGS...]")
    sys.exit(run(sys.argv[1:]))
