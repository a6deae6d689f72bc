"""One writer per folder: a second process gets one line naming the holder; a dead holder's lock is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import CHEAP_TEACHERS, assert_user_error, run_main, toy_gld, weights_dir

from utils import locks
from utils.locks import LOCK_NAME, FolderLock, LockHeld


def hold_in_another_process(folder):
    """A child process that takes the lock and waits; returns it once the lock file names it."""
    code = ("import sys, time; sys.path.insert(0, '.'); from utils.locks import FolderLock; "
            f"FolderLock({str(folder)!r}, 'test').acquire(); print('held', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=locks.Path(__file__).resolve().parent.parent,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    child = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(LockHeld, match=f"process {child.pid} on {socket.gethostname()}"):
            FolderLock(tmp_path, "the run folder").acquire()
    finally:
        child.kill()
        child.wait()
    with FolderLock(tmp_path, "the run folder") as lock:  # its holder is gone (SIGKILL: the file stayed)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(LockHeld):
            FolderLock(tmp_path, "the run folder").acquire()  # this process holds it already
        assert lock.holder()["token"] == lock.token
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_a_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "token": "x", "job": None,
                                                  "since": "then"}))
    with pytest.raises(LockHeld, match="node-elsewhere"):  # touched just now: alive as far as we can tell
        FolderLock(tmp_path, "the run folder").acquire()
    old = time.time() - locks.STALE_AFTER_S - 5
    os.utime(tmp_path / LOCK_NAME, (old, old))
    FolderLock(tmp_path, "the run folder").acquire().release()  # its heartbeat stopped: taken over
    # a requeued SLURM job (same job id, another node) takes over its previous incarnation's lock at once
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 7, "token": "y", "job": "4242",
                                                  "since": "then"}))
    FolderLock(tmp_path, "the run folder").acquire().release()


def test_releasing_never_removes_another_holders_lock(tmp_path):
    lock = FolderLock(tmp_path, "x").acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "h", "pid": 1, "token": "someone else", "job": None}))
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_second_training_on_the_same_folder_stops_with_one_line(tmp_path):
    """Two gld_distill.py -r auto on one -c both ran to the end, both writing checkpoint_last.pt and metrics."""
    ckpt = tmp_path / "run"
    child = hold_in_another_process(ckpt)  # as a running training's rank 0 holds it
    try:
        res = run_main("gld_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", ckpt, "-r", "auto",
                         "--gld_root_path", toy_gld(), "--path_to_pretrained_weights", weights_dir(),
                         "--student_init", "random", "--imsize", 32, "-b", 4, "--epochs", 1, "--num_workers", 0,
                         "--no_progress")
    finally:
        child.kill()
        child.wait()
    assert_user_error(res, 1, f"process {child.pid}", "-c/--ckpt_dir")  # the holder, and the flag naming the folder
    assert not (ckpt / "metrics.jsonl").exists() and not (ckpt / "checkpoint_last.pt").exists()


def test_an_entry_being_written_by_another_job_is_not_written_again(tmp_path):
    """A feature-store entry that another job is extracting (here: a --refresh_cache of complete entries while a
    child process holds their locks) stops the evaluation with one line naming the holder."""
    import torch

    import oxford_paris_eval
    from datasets.toy import make_toy_revisitop
    from models.students import build_student, student_checkpoint_state

    make_toy_revisitop(tmp_path / "data", "roxford5k", n_queries=3, n_db=10, size=32, seed=0)
    torch.save({"state_dict": student_checkpoint_state(build_student("resnet18"))}, tmp_path / "s.pt")
    argv = ["-a", "resnet18", "-r", str(tmp_path / "s.pt"), "-dp", str(tmp_path / "data"), "--imsize", "32",
            "--num_workers", "0", "--no_progress", "--device", "cpu", "--feature_cache", str(tmp_path / "fc")]
    oxford_paris_eval.main(argv)
    entries = [p for p in (tmp_path / "fc").iterdir() if p.is_dir()]
    assert len(entries) == 2 and not any((p / LOCK_NAME).exists() for p in entries)  # released when done
    holders = [hold_in_another_process(p) for p in entries]
    try:
        with pytest.raises(SystemExit, match=f"process ({holders[0].pid}|{holders[1].pid})"):
            oxford_paris_eval.main([*argv, "--refresh_cache"])
    finally:
        for child in holders:
            child.kill()
            child.wait()
    assert all(any(p.glob("shard-*.npy")) for p in entries)  # nothing was cleared
