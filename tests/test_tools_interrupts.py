"""The data tools under Ctrl-C and after a kill: one line and exit code 130, workers that stay quiet, queued work
cancelled rather than drained, and a killed extraction's temporary files cleaned up instead of reported."""
import ast
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from utils.launch import run_tool
from utils.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED
from utils.workers import worker_pool


def test_run_tool_turns_ctrl_c_into_one_line_and_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_tool(interrupted)
    assert stop.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().endswith(": interrupted")


def test_every_tool_starts_through_run_tool():
    for path in sorted((ROOT / "tools").glob("*.py")):
        tree = ast.parse(path.read_text())
        guard = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert guard, path.name
        assert "run_tool(main)" in ast.unparse(guard[0]) or path.name == "gpu_check.py", path.name


def _sigint_disposition(_):
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_pool_workers_leave_ctrl_c_to_the_tool_and_queued_work_is_cancelled():
    with worker_pool(2) as pool:
        assert all(pool.map(_sigint_disposition, range(4)))
    futures = []
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(2) as pool:
            futures = [pool.submit(time.sleep, 0.2) for _ in range(40)]
            raise KeyboardInterrupt
    assert sum(f.cancelled() for f in futures) >= 30  # not drained: a plain `with` would run all 40


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_PREEMPTED),
                                       (signal.SIGUSR1, EXIT_PREEMPTED)])
def test_a_tool_interrupted_mid_work_exits_with_one_line(tmp_path, sig, code):
    """Ctrl-C (130) and a cluster's stop signals (75: requeue) reach the whole process group, as in a terminal or
    from scancel."""
    proc = subprocess.Popen([sys.executable, "tools/make_toy_data.py", "--out", str(tmp_path / "toy"), "--parts",
                             "gld", "--gld_landmarks", "4000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not any(tmp_path.rglob("*.jpg")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_killed_extractions_temporary_files_are_removed_not_reported(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import prepare_revisitop

    from datasets.toy import make_toy_revisitop1m

    names = make_toy_revisitop1m(tmp_path, n=6, size=32)
    stale = tmp_path / "revisitop1m" / "jpg" / names[0].rsplit("/", 1)[0] / f".{names[0].rsplit('/', 1)[1]}.x1y2.tmp"
    stale.write_bytes(b"half an image")
    assert prepare_revisitop.check_r1m(tmp_path) == []
    out = capsys.readouterr().out
    assert not stale.exists() and "removed 1 temporary file" in out and "0 unexpected files" in out
