"""A rank that dies (SIGKILL) is named: the last line of stderr and of train.log names its rank,
host and PID (trainer/watcher.py), whatever the number of ranks and nodes; no surviving rank
prints a traceback; the watcher leaves no process behind; a clean run leaves no watcher and
prints nothing of it."""
import os
import signal
import subprocess
import time

import pytest

from test_train_support import (process_gone as _gone, record_time, run_train,  # noqa: F401
                                start_train, tiny_args,
                                tiny_dataset, wait_training)

LIMIT = 20.0   # s from the kill to the end of the job (measured: 0.2-0.5 s)


def _watchers(run_dir):
    """PIDs of the watcher processes of runs in `run_dir` now running (its train.log is in the
    watcher's command line; other jobs on the machine have theirs)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
            if b"mpitrain.trainer.watcher" in words and \
                    os.path.join(run_dir, "train.log").encode() in words:
                found.append(int(pid))
        except OSError:
            pass
    return found


def _kill_one(dataset, run_dir, n, victim_rank, hosts=None):
    proc = start_train(n, "--preset", "tiny", "--dataset", dataset, "--run-dir", run_dir,
                       "--epochs", 10000, "--eval-every", 100000, "--save-every", 100000,
                       "--quiet", hosts=hosts)
    beat = wait_training(proc, run_dir, timeout=180)
    assert _watchers(run_dir), "no watcher runs"
    victim = beat["ranks"][victim_rank]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=LIMIT + 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end after a rank died")
    elapsed = time.monotonic() - t0
    record_time(f"kill rank {victim_rank} of {n}" + (f" on {hosts}" if hosts else ""), elapsed)
    assert elapsed < LIMIT
    assert proc.returncode != 0
    named = f"rank {victim_rank} (host {victim['host']}, pid {victim['pid']}) died"
    assert named in err.splitlines()[-1], err
    with open(os.path.join(run_dir, "train.log")) as f:
        assert named in f.read().splitlines()[-1]
    assert "Traceback" not in err, err
    assert all(_gone(r["pid"]) for r in beat["ranks"]), "a rank was left behind"
    assert all(_gone(pid) for pid in _watchers(run_dir)), "the watcher was left behind"


@pytest.mark.slow
def test_a_killed_worker_is_named_at_3_ranks(tiny_dataset, tmp_path):
    _kill_one(tiny_dataset, str(tmp_path / "run"), 3, 2)


@pytest.mark.slow
def test_a_killed_node_zero_is_named(tiny_dataset, tmp_path):
    _kill_one(tiny_dataset, str(tmp_path / "run"), 3, 0)


@pytest.mark.slow
def test_a_killed_worker_is_named_at_12_ranks(tiny_dataset, tmp_path):
    _kill_one(tiny_dataset, str(tmp_path / "run"), 12, 7)


@pytest.mark.slow
def test_a_killed_worker_is_named_on_two_nodes(tiny_dataset, tmp_path):
    _kill_one(tiny_dataset, str(tmp_path / "run"), 12, 9, hosts="nodea:6,nodeb:6")


@pytest.mark.slow
def test_a_clean_run_leaves_no_watcher_and_says_nothing_of_it(tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = run_train(3, *tiny_args(tiny_dataset, run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "died" not in proc.stderr and "MPI call failed" not in proc.stderr, proc.stderr
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "died" not in f.read()
    assert all(_gone(pid) for pid in _watchers(run_dir)), "the watcher was left behind"
