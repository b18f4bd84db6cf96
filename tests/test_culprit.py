"""A rank that dies (SIGKILL) is named: the last line of stderr and of train.log names its rank,
host and PID (trainer/watcher.py), whatever the number of ranks and nodes; no surviving rank
prints a traceback; the watcher leaves no process behind; a clean run leaves no watcher and
prints nothing of it."""
import os
import signal
import subprocess
import sys
import time

import pytest

from test_train_support import (_env, heartbeat, mpirun_or_skip, run_train, tiny_args,  # noqa: F401
                                tiny_dataset)

LIMIT = 20.0   # s from the kill to the end of the job (measured: 0.2-0.5 s)


def _watchers():
    """PIDs of the watcher processes now running."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"mpitrain.trainer.watcher" in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _gone(pid, within=5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


def _kill_one(dataset, run_dir, n, victim_rank, hosts=None):
    layout = ["-launcher", "fork", "-hosts", hosts] if hosts else []
    cmd = [mpirun_or_skip(), *layout, "-n", str(n), sys.executable, "-m", "mpitrain", "train",
           "--preset", "tiny", "--dataset", dataset, "--run-dir", run_dir, "--epochs", "10000",
           "--eval-every", "100000", "--save-every", "100000", "--quiet"]
    before = set(_watchers())
    proc = subprocess.Popen(cmd, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    t0 = time.monotonic()
    while True:
        beat = heartbeat(run_dir)
        if beat is not None and beat["step"] > 0:
            break
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 180, "training did not start"
        time.sleep(0.2)
    victim = beat["ranks"][victim_rank]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=LIMIT + 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end after a rank died")
    assert time.monotonic() - t0 < LIMIT
    assert proc.returncode != 0
    named = f"rank {victim_rank} (host {victim['host']}, pid {victim['pid']}) died"
    assert named in err.splitlines()[-1], err
    with open(os.path.join(run_dir, "train.log")) as f:
        assert named in f.read().splitlines()[-1]
    assert "Traceback" not in err, err
    assert all(_gone(r["pid"]) for r in beat["ranks"]), "a rank was left behind"
    assert all(_gone(pid) for pid in set(_watchers()) - before), "the watcher was left behind"


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
@pytest.mark.xfail(strict=False, reason="a survivor is named instead in 1 of 9 kills measured in "
                   "this layout (docs/TRAINING.md, 'Signals and faults')")
def test_a_killed_worker_is_named_on_two_nodes(tiny_dataset, tmp_path):
    _kill_one(tiny_dataset, str(tmp_path / "run"), 12, 9, hosts="nodea:6,nodeb:6")


@pytest.mark.slow
def test_a_clean_run_leaves_no_watcher_and_says_nothing_of_it(tiny_dataset, tmp_path):
    before = set(_watchers())
    run_dir = str(tmp_path / "run")
    proc = run_train(3, *tiny_args(tiny_dataset, run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "died" not in proc.stderr and "MPI call failed" not in proc.stderr, proc.stderr
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "died" not in f.read()
    assert all(_gone(pid) for pid in set(_watchers()) - before), "the watcher was left behind"
