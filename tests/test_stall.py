"""A stalled worker is noticed: no progress for --stall-timeout seconds ends the job with status
3, the last line of stderr and of train.log naming the stalled rank and PID and the newest
checkpoint, and no process left behind. MPI mode: SIGSTOP of a worker; thread mode: the worker
thread hangs (test hook MPITRAIN_STALL)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from test_thread_mode import thread_env
from test_train_support import start_train, tiny_dataset, wait_training  # noqa: F401

TIMEOUT = 2.0   # --stall-timeout of these tests (s)
LIMIT = 20.0    # s from the stall to the end of the job


def _last_log_line(run_dir):
    with open(os.path.join(run_dir, "train.log")) as f:
        return f.read().splitlines()[-1]


def _gone(pid, within=5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigstop_of_a_worker_ends_the_job_with_status_3(tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start_train(4, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run_dir,
                       "--epochs", 10000, "--eval-every", 100000, "--save-every", 100000,
                       "--quiet", "--stall-timeout", TIMEOUT)
    beat = wait_training(proc, run_dir)
    victim = beat["ranks"][2]
    os.kill(victim["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=LIMIT + 20)
    except subprocess.TimeoutExpired:
        os.kill(victim["pid"], signal.SIGKILL)
        proc.kill()
        pytest.fail("the job did not end after a worker stalled")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 3, err
    assert elapsed < LIMIT
    culprit = f"rank 2 (host {victim['host']}, pid {victim['pid']}) is stopped"
    assert culprit in err.splitlines()[-1], err
    assert culprit in _last_log_line(run_dir)
    assert "checkpoint_step_0.h5; continue with --resume auto" in err.splitlines()[-1]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        stalls = [r for r in map(json.loads, f) if r.get("event") == "stall"]
    assert [(s["ranks"], s["pids"]) for s in stalls] == [([2], [victim["pid"]])]
    assert all(_gone(r["pid"]) for r in beat["ranks"]), "a rank was left behind"


def test_a_hung_worker_thread_ends_the_run_with_status_3(tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    env = thread_env()
    env["MPITRAIN_STALL"] = "1:7"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mpitrain", "train", "--threads", "3", "--preset", "tiny",
         "--dataset", tiny_dataset, "--run-dir", run_dir, "--epochs", "1000", "--eval-every",
         "5", "--save-every", "5", "--quiet", "--stall-timeout", str(TIMEOUT)],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - t0 < 60
    last = proc.stderr.splitlines()[-1]
    assert re.search(r"stalled: rank 1 \(host \S+, pid \d+\) made no progress", last), last
    assert last.endswith("checkpoint_step_5.h5; continue with --resume auto"), last
    assert "stalled: rank 1" in _last_log_line(run_dir)
    assert os.path.exists(os.path.join(run_dir, "checkpoint_step_5.h5"))
