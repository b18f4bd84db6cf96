"""A stalled worker is noticed: no progress for --stall-timeout seconds ends the job with status
3, the last line of stderr and of train.log naming the stalled rank, host and PID and the newest
checkpoint, and no process left behind. MPI mode: SIGSTOP of a worker, at -n 4, -n 12 and on two
logical nodes (`-launcher fork -hosts ...`), and --resume auto afterwards ends bit for bit as
the run that never stalled; thread mode: the worker thread hangs (test hook MPITRAIN_STALL)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from test_thread_mode import thread_env
from test_train_support import (process_gone as _gone, read_metrics,  # noqa: F401
                                record_time, run_train, start_train, step_losses,
                                tiny_dataset, wait_training)

TIMEOUT = 2.0   # --stall-timeout of these tests (s)
LIMIT = 20.0    # s from the stall to the end of the job


def _last_log_line(run_dir):
    with open(os.path.join(run_dir, "train.log")) as f:
        return f.read().splitlines()[-1]


LONG = ("--epochs", 10000, "--eval-every", 100000, "--save-every", 100000)   # no end in sight


def _stall_one(dataset, run_dir, n, victim_rank, hosts=None, options=LONG, step=1):
    """Start a run, SIGSTOP rank `victim_rank` once `step` steps are done, and check how the job
    ends: status 3 within LIMIT, the last line of stderr and of train.log naming the stopped
    rank, host and PID, one stall event, no process left. Returns that last line."""
    proc = start_train(n, "--preset", "tiny", "--dataset", dataset, "--run-dir", run_dir,
                       *options, "--quiet", "--stall-timeout", TIMEOUT, hosts=hosts)
    beat = wait_training(proc, run_dir, timeout=180, step=step)
    victim = beat["ranks"][victim_rank]
    os.kill(victim["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        try:
            _, err = proc.communicate(timeout=LIMIT + 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the job did not end after a worker stalled")
        elapsed = time.monotonic() - t0
        record_time(f"SIGSTOP rank {victim_rank} of {n}" + (f" on {hosts}" if hosts else ""),
                    elapsed)
        assert proc.returncode == 3, err
        assert elapsed < LIMIT
        last = err.splitlines()[-1]
        culprit = f"rank {victim_rank} (host {victim['host']}, pid {victim['pid']}) is stopped"
        assert culprit in last, err
        assert culprit in _last_log_line(run_dir)
        assert last.endswith(".h5; continue with --resume auto"), last
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            stalls = [r for r in map(json.loads, f) if r.get("event") == "stall"]
        assert [(s["ranks"], s["pids"]) for s in stalls] == [([victim_rank], [victim["pid"]])]
        assert all(_gone(r["pid"]) for r in beat["ranks"]), "a rank was left behind"
        return last
    finally:   # never leave a stopped process behind, whatever failed
        if _is_ours(victim["pid"]):
            os.kill(victim["pid"], signal.SIGKILL)
            os.kill(victim["pid"], signal.SIGCONT)


def _is_ours(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mpitrain" in f.read()
    except OSError:
        return False


@pytest.mark.slow
def test_sigstop_of_a_worker_ends_the_job_with_status_3(tiny_dataset, tmp_path):
    last = _stall_one(tiny_dataset, str(tmp_path / "run"), 4, 2)
    assert last.endswith("checkpoint_step_0.h5; continue with --resume auto"), last


@pytest.mark.slow
def test_sigstop_at_12_ranks(tiny_dataset, tmp_path):
    _stall_one(tiny_dataset, str(tmp_path / "run"), 12, 7)


@pytest.mark.slow
@pytest.mark.parametrize("hosts,victim", [("nodea:6,nodeb:6", 9), ("nodea:3,nodeb:2", 4),
                                          ("nodea:3,nodeb:2", 1)])
def test_sigstop_on_two_nodes(tiny_dataset, tmp_path, hosts, victim):
    n = sum(int(h.split(":")[1]) for h in hosts.split(","))
    _stall_one(tiny_dataset, str(tmp_path / "run"), n, victim, hosts=hosts)


def _state(path):
    with h5py.File(path, "r") as f:
        return {g: {k: f[g][k][()] for k in f[g]}
                for g in ("params", "optimizer/m", "optimizer/v")}


@pytest.mark.slow
def test_resume_after_a_stall_ends_bitwise_as_the_straight_run(tiny_dataset, tmp_path):
    """Two logical nodes (Node Zero + 2 workers, 2 workers): a worker stopped after step 15,
    the job ends with status 3 naming a checkpoint; --resume auto from it ends on the
    parameters and Adam moments of the run that was never stopped, bit for bit."""
    hosts, steps = "nodea:3,nodeb:2", 120
    options = ("--max-steps", steps, "--epochs", 1000, "--eval-every", 10, "--save-every", 10)
    straight, stalled = str(tmp_path / "straight"), str(tmp_path / "stalled")
    proc = run_train(5, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", straight,
                     *options, "--quiet", hosts=hosts, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = _stall_one(tiny_dataset, stalled, 5, 4, hosts=hosts, options=options, step=15)
    saved = int(re.search(r"checkpoint_step_(\d+)\.h5; continue", last).group(1))
    assert 10 <= saved < steps, last
    proc = run_train(5, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", stalled,
                     *options, "--quiet", "--resume", "auto", hosts=hosts, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(stalled)
    assert [r["step"] for r in records if r.get("event") == "resume"] == [saved]
    resumed = step_losses(records[[r.get("event") for r in records].index("resume"):])
    reference = step_losses(read_metrics(straight))
    assert resumed == {s: reference[s] for s in range(saved + 1, steps + 1)}
    a = _state(os.path.join(straight, f"checkpoint_step_{steps}.h5"))
    b = _state(os.path.join(stalled, f"checkpoint_step_{steps}.h5"))
    for g in a:
        for k in a[g]:
            assert np.array_equal(a[g][k], b[g][k]), (g, k)


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
