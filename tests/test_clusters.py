"""Clusters: the SLURM launch (emulated with its variables on 127.0.0.1), stops on SIGTERM/SIGUSR1 that resume inside
the epoch to the weights of an uninterrupted run, submitit's local executor end to end, and the paper's world size
of 8 processes."""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import CHEAP_TEACHERS, ROOT, assert_exit, run_main, run_script, torchrun, toy_gld, weights_dir

from utils.checkpoint import load_file
from utils.errors import UsageError
from utils.launch import first_host, free_port, init_distributed, plan_launch
from utils.preemption import EXIT_PREEMPTED


def launch_args(**overrides):
    return argparse.Namespace(**{"world_size": None, "rank": 0, "dist_url": "env://", "nproc_per_node": None,
                                 **overrides})


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("nodelist, first", [("gpu[07-08]", "gpu07"), ("node12", "node12"),
                                             ("a[3,5-6],b[1-2]", "a3"), ("cpu1,cpu2", "cpu1"),
                                             ("rack[01-02]-n[3-4]", "rack01-n3"), ("127.0.0.1", "127.0.0.1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_launch_plans():
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "16",
             "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    plan = plan_launch(launch_args(), False, slurm)
    assert (plan.mode, plan.n_local, plan.first_rank, plan.world_size) == ("slurm, one task per rank", 1, 3, 16)
    assert plan.dist_url == f"tcp://gpu07:{20000 + 123456 % 20000}"
    assert plan_launch(launch_args(), False, {**slurm, "MASTER_ADDR": "h", "MASTER_PORT": "9"}).dist_url == "tcp://h:9"
    torchrun_env = {**slurm, "RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1"}  # torchrun's variables win
    assert plan_launch(launch_args(), False, torchrun_env).mode == "torchrun"
    per_node = {**slurm, "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    plan = plan_launch(launch_args(nproc_per_node=4), False, per_node)
    assert (plan.mode, plan.n_local, plan.first_rank, plan.world_size) == ("slurm, one task per node", 4, 4, 8)
    batch_script = {k: v for k, v in slurm.items() if not k.startswith("SLURM_STEP")}  # python in sbatch, no srun
    assert plan_launch(launch_args(), False, batch_script).mode == "one process"
    with pytest.raises(UsageError) as exc:
        plan_launch(launch_args(world_size=4), False, slurm)
    assert_exit(exc, 2, "--world_size 4", "16")  # the flag's value and the task count it contradicts
    assert "slurm, one task per rank, rank 3 of 16, master tcp://gpu07" in plan_launch(launch_args(), False,
                                                                                        slurm).describe()


# ------------------------------------------------------------------------------- same run, three launches
def gld_root():
    return toy_gld(n_landmarks=16, imgs_per_landmark=2, size=40, seed=3, n_singletons=0)


def distill(ckpt_dir, *extra):
    return ["gld_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", ckpt_dir, "--gld_root_path",
            gld_root(), "--path_to_pretrained_weights", weights_dir(), "--student_init", "random", "--imsize", 32,
            "-b", 2, "--epochs", 2, "--num_workers", 1, "--no_progress", "--log_every", 1, *extra]


def same_weights(a, b, atol=1e-6):
    a, b = load_file(a), load_file(b)
    assert a["epoch"] == b["epoch"] and a["iteration"] == b["iteration"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=atol, msg=key)
    assert torch.equal(a["loss_fn"]["pos_win_count"], b["loss_fn"]["pos_win_count"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank run (torchrun): 16 groups, 2 pairs per rank, 4 iterations per epoch, 2 epochs."""
    ckpt = tmp_path_factory.mktemp("reference")
    res = run_script(*distill(ckpt), launcher=torchrun(2))
    assert res.returncode == 0, res.stderr[-3000:]
    return ckpt / "checkpoint_last.pt"


@pytest.mark.slow
def test_slurm_one_task_per_rank_equals_torchrun(reference, tmp_path):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "77",
               "MASTER_PORT": port}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, *map(str, distill(tmp_path / "slurm"))], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "launch: slurm, one task per rank, rank 0 of 2, master tcp://127.0.0.1:" in outs[0][0]
    same_weights(reference, tmp_path / "slurm" / "checkpoint_last.pt")


@pytest.mark.slow
def test_slurm_one_task_per_node_spawning_two_equals_torchrun(reference, tmp_path):
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "1",
           "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "78",
           "MASTER_PORT": str(free_port())}
    res = run_script(*distill(tmp_path / "node", "--nproc_per_node", 2), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "launch: slurm, one task per node, ranks 0-1 of 2" in res.stdout
    same_weights(reference, tmp_path / "node" / "checkpoint_last.pt")


# ----------------------------------------------------------------------------------------- stop and resume
def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def iterations_logged(ckpt_dir):
    path = ckpt_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"type": "iter"' in line for line in path.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("moment, sig", [("iteration 1", signal.SIGTERM), ("iteration 6", signal.SIGUSR1),
                                         ("checkpoint write", signal.SIGTERM)])
def test_a_stop_signal_mid_run_resumes_to_the_uninterrupted_weights(reference, tmp_path, moment, sig):
    """2 ranks (spawned by one launch, which forwards the signal): every rank finishes its iteration, rank 0 writes
    checkpoint_last.pt, all exit with 75; -r auto resumes at the next iteration and ends on the reference's
    weights (same data order and augmentations)."""
    ckpt = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, distill(ckpt, "--nproc_per_node", 2))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if moment == "checkpoint write":  # the epoch-end save: its temporary file appears
            seen = wait_for(lambda: any(ckpt.glob(".checkpoint_last.pt.*.tmp")), proc)
        else:
            target = int(moment.split()[1])
            seen = wait_for(lambda: iterations_logged(ckpt) >= target, proc)
        assert seen, "the run ended before the signal"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = load_file(ckpt / "checkpoint_last.pt")
    assert stopped["epoch"] < 2
    res = run_main(*distill(ckpt, "--nproc_per_node", 2, "-r", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    if stopped["epoch_iteration"]:
        assert f"iteration {stopped['epoch_iteration']} of epoch {stopped['epoch'] + 1}" in res.stdout
    same_weights(reference, ckpt / "checkpoint_last.pt")
    iters = [int(line.split('"iteration": ')[1].split(",")[0]) for line in
             (ckpt / "metrics.jsonl").read_text().splitlines() if '"type": "iter"' in line]
    assert iters == list(range(1, 9))  # every iteration recorded once


# --------------------------------------------------------------------------------------------- submitit
def child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
def test_a_rank_killed_by_a_signal_is_named_with_its_signal(tmp_path):
    """One of two spawned ranks killed with SIGKILL: the job ended with exit 1 and only torch's "Terminating
    process ... via SIGTERM" line."""
    ckpt = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, distill(ckpt, "--nproc_per_node", 2, "--epochs", 20))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: iterations_logged(ckpt) >= 1, proc), "the run ended before the kill"
        ranks = [pid for pid in child_pids(proc.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(ranks) == 2
        victim = max(ranks)
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "Traceback" not in err
    assert f"(pid {victim})" in err and "SIGKILL" in err  # which rank, which signal


@pytest.mark.slow
def test_submit_through_submitits_local_executor_requeues_and_resumes(reference, tmp_path):
    """The whole path without a cluster: submit, the time-limit signal mid-run (submitit's test hook), the stop
    and save, submitit's requeue, the resumed job. The local executor emulates a 2-task job with its own
    variables, which tools/submit.py maps to the launch (SLURM variables are tested above)."""
    submitit = pytest.importorskip("submitit")
    sys.path.insert(0, str(ROOT / "tools"))
    import submit

    ckpt = tmp_path / "run"
    argv = ["--local", "--gpus_per_node", "0", "--tasks_per_node", "2", "--timeout", "30", "--job_dir",
            str(tmp_path / "jobs"), "--",
            *map(str, distill(ckpt, "--device", "cpu"))]
    old_env = dict(os.environ)
    os.environ.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    try:
        job = submit.main(argv)
        assert wait_for(lambda: iterations_logged(ckpt) >= 2, job._process), "the job ended before the signal"
        # what SLURM does --signal_delay seconds before the time limit: the signal to every task of the job (the
        # local executor's own test hook signals its controller process, which does not forward it)
        tasks = child_pids(job._process.pid)
        assert len(tasks) == 2, tasks
        for pid in tasks:
            os.kill(pid, signal.SIGUSR1)
        job.results()
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    assert isinstance(job, submitit.local.local.LocalJob)
    assert "1 CPU thread(s) in each of 2 processes" in (ckpt / "log.log").read_text()  # the tasks share the cores
    log = (ckpt / "log.log").read_text()
    assert "stopped on signal" in log and "resumed from" in log
    same_weights(reference, ckpt / "checkpoint_last.pt")


def test_submit_takes_cpu_tasks_per_node_only_without_gpus(capsys):
    pytest.importorskip("submitit")
    sys.path.insert(0, str(ROOT / "tools"))
    import submit

    script = ["--", "oxford_paris_eval.py", "-a", "resnet18", "-r", str(ROOT / "README.md"), "-dp", str(ROOT)]
    assert submit.parse_args(["--gpus_per_node", "0", "--tasks_per_node", "4", *script]).tasks == 4
    assert submit.parse_args(["--gpus_per_node", "0", *script]).tasks == 1
    assert submit.parse_args(["--gpus_per_node", "8", *script]).tasks == 8
    with pytest.raises(SystemExit) as stop:
        submit.parse_args(["--gpus_per_node", "8", "--tasks_per_node", "4", *script])
    assert_exit(stop, 2, "--tasks_per_node", err=capsys.readouterr().err)


# --------------------------------------------------------------------------------- the paper's world size
WORLD = 8


class TinyTeacher(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed_dim = dim
        self.conv = torch.nn.Conv2d(3, dim, 3, stride=2)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def world8_modules():
    from models.distill_model import DistillationLoss, DistillModel, WhitenedTeachers
    from models.loss import MultiTeacherDistillLoss
    from models.pca_layer import PCAWhitening
    from models.students import build_student

    torch.manual_seed(0)
    teachers = {"a": TinyTeacher(24), "b": TinyTeacher(16)}
    pcas = {n: PCAWhitening(t.embed_dim, 8).fit(F.normalize(torch.randn(64, t.embed_dim), dim=1))
            for n, t in teachers.items()}
    criterion = DistillationLoss(WhitenedTeachers.from_modules(teachers, pcas),
                                 MultiTeacherDistillLoss(teachers=list(teachers)), student_dim=8)
    return DistillModel(build_student("resnet18", embed_dim=8)), criterion


def world8_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(WORLD * 8, 3, 32, 32, generator=g), torch.randn(WORLD * 8, 3, 32, 32, generator=g)


def _world8_rank(rank, port, out):
    from engine.distill import distill_step, wrap_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(rank, False, f"tcp://127.0.0.1:{port}", 0, WORLD)
    try:
        bare, criterion = world8_modules()
        model, student = wrap_distributed(bare, ctx)
        model.train()
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
        x1, x2 = world8_batch()
        rows = slice(8 * rank, 8 * rank + 8)
        loss = distill_step(model, criterion, optimizer, torch.amp.GradScaler("cpu", enabled=False), x1[rows],
                            x2[rows], "none", ctx.device)
        if rank == 0:
            torch.save({"loss": loss, "grads": {k: v.grad for k, v in student.named_parameters()}}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_eight_processes_make_the_first_step_of_one_on_the_global_batch(tmp_path):
    """8 gloo processes with -b 8 = 1 process on the 64-pair global batch (the student normalised per 8-image
    shard, as on 8 CPUs without SyncBatchNorm): the same loss and the same gradient, so the same first step."""
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_world8_rank, args=(free_port(), out), nprocs=WORLD)
    got = torch.load(out, weights_only=True)
    bare, criterion = world8_modules()
    bare.train()
    student = bare.base_encoder
    x1, x2 = world8_batch()
    s1 = torch.cat([student(x1[8 * r:8 * r + 8]) for r in range(WORLD)])
    s2 = torch.cat([student(x2[8 * r:8 * r + 8]) for r in range(WORLD)])
    loss = sum(criterion(x1, x2, s1, s2).values())
    loss.backward()
    # as in the 2-rank test: float32 rounding of the embeddings through a 1/T = 20 softmax moves the KL by ~1e-5
    # relative, a world-size scaling error by a factor of 8
    assert abs(float(got["loss"]) / WORLD - float(loss)) < 1e-3 * float(loss)
    for name, param in student.named_parameters():
        error = (got["grads"][name] - param.grad).norm() / param.grad.norm().clamp_min(1e-12)
        assert error < 1e-2, (name, float(error))
