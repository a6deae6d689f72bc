"""Submit one of the six scripts to a SLURM cluster with submitit, requeued on preemption or time limit.

    python tools/submit.py --nodes 2 --gpus_per_node 8 --partition P --timeout 4320 -- \\
        gld_distill.py -a resnet18 -ts resnet101_delg resnet101_dolg -c CKPT --gld_root_path GLD \\
        --path_to_pretrained_weights W

Everything after ``--`` is the script and its own flags. The job runs one task per GPU (``srun``); each task is one
rank (the launch reads submitit's environment: rank, world size, master = the first node). SLURM sends SIGUSR1
``--signal_delay`` seconds before the time limit (and SIGTERM on a preemption): a training run finishes its
iteration, writes ``checkpoint_last.pt`` and the job is requeued; the requeued job resumes it (a training script
always runs with ``-r auto``). An evaluation with ``--feature_cache`` keeps its finished shards when requeued.
Needs submitit: ``pip install -r requirements-cluster.txt``. ``--local`` runs the job on this machine with submitit's
local executor (a test of the whole path without a cluster).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# SLURM's advance warning and submitit's requeue handler use the signal the training stops on
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

from utils.argtypes import int_at_least, output_dir  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.launch import run_tool  # noqa: E402

SCRIPTS = ("gld_pca_learn.py", "svd_pca_learn.py", "gld_distill.py", "svd_distill.py", "oxford_paris_eval.py",
           "svd_eval.py")
TRAINING = ("gld_distill.py", "svd_distill.py")
INSTALL = "pip install -r requirements-cluster.txt"


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(f"submitting to SLURM needs submitit: {INSTALL}") from None
    return submitit


class ScriptJob:
    """The submitted callable: runs ``script`` with ``argv`` in each task; ``checkpoint`` (called by submitit on
    the time-limit signal) requeues it unchanged."""

    def __init__(self, script: str, argv: list[str]) -> None:
        self.script, self.argv = script, list(argv)
        if script in TRAINING and "-r" not in self.argv and "--resume" not in self.argv:
            self.argv += ["-r", "auto"]  # a requeued job continues its run

    def __call__(self) -> None:
        os.chdir(ROOT)
        self.set_rank_environment()
        module = importlib.import_module(self.script[: -len(".py")])
        module.main(self.argv)

    def set_rank_environment(self) -> None:
        """torchrun's variables from submitit's view of the task (which works on SLURM and with the local
        executor alike)."""
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks == 1:
            return
        hosts = getattr(env, "hostnames", None) or ["127.0.0.1"]
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))
        if env.cluster == "local":  # the tasks share this machine's cores (SLURM binds its tasks' own)
            os.environ["LOCAL_WORLD_SIZE"] = str(env.num_tasks)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1" if env.num_nodes == 1 else hosts[0])
        os.environ.setdefault("MASTER_PORT", str(20000 + int("".join(c for c in str(env.job_id) if c.isdigit())
                                                            or 0) % 20000))

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(ScriptJob(self.script, self.argv))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--nodes", type=int_at_least(1), default=1, help="nodes (default 1)")
    parser.add_argument("--gpus_per_node", type=int_at_least(0), default=8,
                        help="GPUs per node, one task each (default 8; 0: CPU tasks, --tasks_per_node of them)")
    parser.add_argument("--tasks_per_node", type=int_at_least(1), default=None,
                        help="with --gpus_per_node 0: CPU tasks per node, one rank each (default 1), for CPU clusters "
                             "or to try the cluster path without GPUs; give each its cores with --cpus_per_task")
    parser.add_argument("--cpus_per_task", type=int_at_least(1), default=10, help="CPUs per task (loader workers)")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--timeout", type=int_at_least(1), default=4320, metavar="MIN",
                        help="time limit of one job in minutes (default 4320); the job is requeued after it")
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None)
    parser.add_argument("--mem_gb", type=int_at_least(1), default=None, help="memory per node")
    parser.add_argument("--signal_delay", type=int_at_least(10), default=120,
                        help="seconds before the time limit at which SLURM sends SIGUSR1 (default 120)")
    parser.add_argument("--job_dir", type=output_dir, default="submitit_jobs", help="submitit's logs and pickles")
    parser.add_argument("--job_name", default=None, help="default: the script's name")
    parser.add_argument("--local", action="store_true",
                        help="run with submitit's local executor on this machine instead of SLURM")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its end")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [its flags]")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or command[0] not in SCRIPTS:
        parser.error(f"give the script after '--': one of {', '.join(SCRIPTS)}")
    if args.tasks_per_node is not None and args.gpus_per_node > 0:
        parser.error(f"--tasks_per_node goes with --gpus_per_node 0 (CPU tasks); with GPUs each of the "
                     f"{args.gpus_per_node} tasks of a node has one")
    args.tasks = args.gpus_per_node or args.tasks_per_node or 1
    args.script, args.script_argv = command[0], command[1:]
    module = importlib.import_module(args.script[: -len(".py")])
    try:
        module.parse_args(args.script_argv)  # the script's own flags are checked now, not on the cluster
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(2) from None
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    submitit = require_submitit()
    if __name__ != "__main__":  # imported (by a launcher of one's own, the tests): send the job's code by value, as
        import cloudpickle  # when run as a script, since the tasks cannot import this file as a module

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = (submitit.LocalExecutor(folder=args.job_dir) if args.local
                else submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=100))
    params = dict(timeout_min=args.timeout, nodes=args.nodes, tasks_per_node=args.tasks,
                  cpus_per_task=args.cpus_per_task, name=args.job_name or args.script[: -len(".py")])
    if args.local:
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=args.tasks,
                                   signal_delay_s=args.signal_delay)
    else:
        extra = {k: v for k, v in (("slurm_partition", args.partition), ("slurm_account", args.account),
                                   ("slurm_qos", args.qos), ("slurm_constraint", args.constraint),
                                   ("mem_gb", args.mem_gb)) if v is not None}
        executor.update_parameters(**params, gpus_per_node=args.gpus_per_node, slurm_signal_delay_s=args.signal_delay,
                                   **extra)
    job = executor.submit(ScriptJob(args.script, args.script_argv))
    print(f"submitted job {job.job_id}: {args.script} {' '.join(job.submission().function.argv)} "
          f"(logs in {args.job_dir})", flush=True)
    if args.wait:
        job.results()
        print(f"job {job.job_id} finished", flush=True)
    return job


if __name__ == "__main__":
    run_tool(main)
