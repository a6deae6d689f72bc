"""One launch path for CPU, one GPU, many GPUs and many nodes.

* ``torchrun ...``: one rank per process, read from the environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``).
* ``python script.py`` with N visible GPUs: N processes are spawned (world size N, never a hard-coded 8);
  with one GPU or none the script runs in this process.
* The paper's manual ``--world_size/--rank/--dist_url`` still work: ``--rank`` is the node's rank, each node
  spawns one process per GPU and ``--world_size`` is the total number of processes.

Backend: nccl on GPU, gloo on CPU. With world size 1 no process group is created at all.

A user's mistake (``utils.errors.UserError``) is caught here once, in the launching process and in every rank, and
ends the process with ``<script>: error: <message>`` and the error's exit code; ``run_tool`` does the same for the
tools.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from utils.distributed import DistContext
from utils.errors import UsageError, UserError
from utils.log import close_logging
from utils.preemption import EXIT_INTERRUPTED, script_name, signal_exits
from utils.runtime import check_amp, share_cpu_threads


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_cuda(args: argparse.Namespace) -> bool:
    device = getattr(args, "device", "auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no GPU is visible; use --device cpu.")
    return device != "cpu" and torch.cuda.is_available()


def launch(main_worker: Callable[[Any, DistContext], Any], args: Any,
           preflight: Callable[[Any], Any] | None = None) -> Any:
    """Run ``main_worker(args, ctx)`` on every rank, starting processes where the launcher did not; in a single
    process, returns what it returned (None when processes were spawned). ``args``: a flow's parameters.

    ``--amp`` is checked against the device first (bf16 on a GPU without it, fp16 on CPU), then ``preflight(args)``
    runs in the launching process (each process under torchrun): the checks of files and flags that must fail
    before any work. A ``UserError`` raised there or in any rank ends the process with its one-line message and its
    exit code instead of a traceback; Ctrl-C ends every process with one line and exit code 130.
    """
    try:
        with one_line_errors():
            check_amp(getattr(args, "amp", "none"), torch.device("cuda" if _use_cuda(args) else "cpu"))
            if preflight is not None:
                preflight(args)
            return _launch(main_worker, args)
    except KeyboardInterrupt:
        print(f"{script_name()}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


def run_tool(main: Callable[[], Any]) -> None:
    """A tool's entry point: it ends on signals as the six scripts do (``signal_exits``) and on a ``UserError`` with
    ``<tool>: error: <message>`` and the error's exit code."""
    with signal_exits(), one_line_errors():
        main()


def error_exit(exc: UserError) -> SystemExit:
    """The exit of a process that stops on a user error: ``<script>: error: <message>`` on stderr, the error's exit
    code. For exit code 1 the line travels in the SystemExit, which Python prints on its way out (and a caller in
    this process, a test, reads as ``code``); any other code (2: flags) is printed here, as argparse prints its own
    usage errors, because a SystemExit carries either a message or a code."""
    line = f"{script_name()}: error: {user_message(exc)}"
    if exc.exit_code == 1:
        return SystemExit(line)
    print(line, file=sys.stderr, flush=True)
    return SystemExit(exc.exit_code)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns a ``UserError`` into ``error_exit``; nested (the launch around a rank) it acts once."""
    try:
        yield
    except UserError as exc:
        raise error_exit(exc) from None


def user_message(exc: BaseException) -> str:
    """The message of a user error, also when a DataLoader worker raised it: the loader re-raises it in the main
    process with the worker's traceback pasted in; only the original message is for the user."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return text


@dataclass
class LaunchPlan:
    """Who starts which ranks: ``n_local`` processes here (1: this process itself), with global ranks
    ``rank_offset + i`` of ``world_size``, meeting at ``dist_url``."""

    mode: str
    n_local: int
    rank_offset: int
    world_size: int
    dist_url: str
    local_rank: int = 0  # the device index of this process, when it is one rank started by a launcher

    @property
    def processes_here(self) -> int:
        """How many processes of this launch share this node's cores: the ones spawned here, or torchrun's."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.mode == "torchrun" else self.n_local

    @property
    def first_rank(self) -> int:
        """The global rank of this launch's first process."""
        return int(os.environ.get("RANK", 0)) if self.mode == "torchrun" else self.rank_offset + self.local_rank

    def describe(self) -> str:
        if self.world_size == 1:
            return "launch: one process"
        where = self.dist_url if self.dist_url != "env://" else (
            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}")
        ranks = (f"ranks {self.first_rank}-{self.first_rank + self.n_local - 1}" if self.n_local > 1
                 else f"rank {self.first_rank}")
        return f"launch: {self.mode}, {ranks} of {self.world_size}, master {where}"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list in its compressed form (``gpu[03-05,9],cpu1`` -> ``gpu03``;
    ``rack[1-2]-n[3-4]`` -> ``rack1-n3``): the first name, each bracket group replaced by its first value."""
    host, depth, group = "", 0, ""
    for char in nodelist:
        if char == "," and depth == 0:
            break
        if char == "[":
            depth, group = 1, ""
        elif char == "]":
            host, depth = host + group.split(",")[0].split("-")[0], 0
        elif depth:
            group += char
        else:
            host += char
    return host.strip()


def _slurm_rendezvous(env: dict[str, str]) -> str:
    """tcp://MASTER_ADDR:MASTER_PORT, from the environment or else the first node and a port from the job id."""
    host = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    if not host:
        raise UserError("SLURM launch: cannot tell the master node (no SLURM_JOB_NODELIST); set MASTER_ADDR.")
    return f"tcp://{host}:{port}"


def plan_launch(args: argparse.Namespace, use_cuda: bool, env: dict[str, str] | None = None) -> LaunchPlan:
    """torchrun's variables first; then an ``srun`` step (one task per GPU: each task one rank; one task per node:
    each spawns one process per GPU); then the paper's manual --world_size/--rank/--dist_url; else this node.
    Never a spawn inside a launcher's rank."""
    env = dict(os.environ) if env is None else env
    visible = torch.cuda.device_count() if use_cuda else 0
    per_node = getattr(args, "nproc_per_node", None)
    if per_node is not None and use_cuda and per_node > visible:
        raise UsageError(f"--nproc_per_node {per_node} needs {per_node} GPUs; {visible} visible")
    n_local = per_node or (visible if use_cuda else 1)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or any launcher that sets the env:// variables)
        world = int(env["WORLD_SIZE"])
        if args.world_size is not None and args.world_size != world:
            raise UsageError(f"--world_size {args.world_size} does not match the {world} processes started by the "
                             "launcher (WORLD_SIZE); drop --world_size or make them agree.")
        return LaunchPlan("torchrun", 1, 0, world, "env://", int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # inside an srun step (not the batch script)
        tasks, nodes = int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_STEP_NUM_NODES", "1"))
        if tasks > nodes:  # one task per GPU (or per CPU process): each task is one rank
            if args.world_size is not None and args.world_size != tasks:
                raise UsageError(f"--world_size {args.world_size} does not match the {tasks} srun tasks")
            local = int(env.get("SLURM_LOCALID", "0")) if use_cuda and visible > 1 else 0  # the GPU to use
            return LaunchPlan("slurm, one task per rank", 1, int(env["SLURM_PROCID"]) - local, tasks,
                              _slurm_rendezvous(env) if tasks > 1 else "env://", local)
        world = nodes * n_local
        if args.world_size is not None and args.world_size != world:
            raise UsageError(f"--world_size {args.world_size} does not match {nodes} srun task(s) x {n_local} "
                             "process(es) per node")
        offset = int(env.get("SLURM_NODEID", env["SLURM_PROCID"])) * n_local
        return LaunchPlan("slurm, one task per node", n_local, offset, world,
                          _slurm_rendezvous(env) if world > 1 else "env://")
    world_size = args.world_size if args.world_size is not None else n_local
    if args.world_size is not None and args.rank == 0 and args.world_size < n_local:
        raise UsageError(f"--world_size {args.world_size} is smaller than the {n_local} processes this node "
                         f"starts (one per visible GPU); set --world_size {n_local} or limit CUDA_VISIBLE_DEVICES.")
    if world_size % n_local != 0 or (args.rank + 1) * n_local > world_size:
        raise UsageError(f"--world_size {world_size} with node --rank {args.rank} does not fit {n_local} "
                         "process(es) per node; --world_size is the total number of processes over all nodes.")
    if world_size > 1 and args.dist_url == "env://":
        if world_size != n_local:
            raise UsageError(f"--world_size {world_size} but this node starts {n_local} process(es): "
                             "a manual multi-node launch needs --dist_url tcp://HOST:PORT of node 0 "
                             "(or use torchrun --nnodes ... instead).")
        return LaunchPlan("one node", n_local, 0, world_size, f"tcp://127.0.0.1:{free_port()}")
    mode = "manual multi-node" if world_size > n_local else "one node" if n_local > 1 else "one process"
    return LaunchPlan(mode, n_local, args.rank * n_local, world_size, args.dist_url)


def _launch(main_worker: Callable, args: argparse.Namespace) -> Any:
    use_cuda = _use_cuda(args)
    plan = plan_launch(args, use_cuda)
    worker_args = (main_worker, args, use_cuda, plan.dist_url, plan.rank_offset, plan.world_size, plan.describe(),
                   plan.processes_here)
    if plan.n_local == 1:
        return _worker(plan.local_rank, *worker_args)
    _spawn(plan.n_local, worker_args, plan.rank_offset)
    return None


def _spawn(nprocs: int, worker_args: tuple, rank_offset: int = 0) -> None:
    """One process per local GPU; a worker's exit code (a user error, Ctrl-C) becomes this process's, without the
    traceback ``torch.multiprocessing`` adds; a worker's crash (a bug) keeps its traceback."""
    context = torch.multiprocessing.spawn(_worker, nprocs=nprocs, args=worker_args, join=False)

    def forward(signum: int, frame: Any) -> None:  # a cluster's stop request reaches every rank, which saves
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while not context.join():
            pass
    except torch.multiprocessing.ProcessExitedException as exc:
        if exc.exit_code is not None and exc.exit_code < 0:  # a signal ended the rank: say which and where
            signum = -exc.exit_code
            print(f"{script_name()}: error: rank {rank_offset + exc.error_index} (pid {exc.error_pid}) "
                  f"was killed by {signal.Signals(signum).name}; the other ranks were stopped. Resume with -r auto "
                  "(training).", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum) from None
        raise SystemExit(exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1) from None
    except KeyboardInterrupt:  # the workers got it too (one terminal, one process group): rank 0 says so
        for process in context.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker(local_rank: int, main_worker: Callable, args: argparse.Namespace, use_cuda: bool, dist_url: str,
            rank_offset: int, world_size: int, launch: str = "", processes_here: int = 1) -> Any:
    with signal_exits(speak=local_rank == 0), one_line_errors():
        ctx = init_distributed(local_rank, use_cuda, dist_url, rank_offset, world_size)
        ctx.launch = f"{launch or ctx.launch}, device {ctx.device}"
        if not use_cuda and processes_here > 1:
            ctx.launch += f", {share_cpu_threads(processes_here)} CPU thread(s) in each of {processes_here} processes"
        try:
            return main_worker(args, ctx)
        finally:
            close_logging()
            if dist.is_initialized():
                dist.destroy_process_group()
            DistContext.clear_current()


def init_distributed(local_rank: int, use_cuda: bool, dist_url: str = "env://", rank_offset: int = 0,
                     world_size: int = 1) -> DistContext:
    """Create the process group (only when world size > 1), pick this rank's device and make the result this
    process's ``DistContext.current()``.

    The GPU is made this process's current device before the group exists, and ``init_process_group`` gets no
    ``device_id``: with it, NCCL communication hangs at random on torch 2.6-2.7 (pytorch/pytorch#153960; NVIDIA's
    NeMo Automodel stopped passing it for that reason). What it offered, a known device for ``barrier``, the
    barrier gets from ``device_ids`` (``utils.distributed.barrier``)."""
    if dist_url == "env://" and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    else:
        rank = rank_offset + local_rank
    device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count())) if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = dict(backend=backend, init_method=dist_url, timeout=datetime.timedelta(minutes=30))
        if dist_url != "env://":
            kwargs.update(rank=rank, world_size=world_size)
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device).make_current()


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU of the ``local_rank``-th process of a node that sees ``visible`` GPUs: its own when it sees them all,
    the only one when the cluster binds one GPU per task (SLURM ``--gpus-per-task=1``, cgroup device limits: every
    task sees its GPU as 0)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise UserError(f"this process is local rank {local_rank} of its node but sees {visible} GPU(s) "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                    f"{visible} process(es) per node (torchrun --nproc_per_node {visible}), or give each task its "
                    "own GPU")
