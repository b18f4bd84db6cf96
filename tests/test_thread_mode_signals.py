"""SIGTERM, Ctrl-C or SIGHUP in thread mode: Node Zero saves a checkpoint of the last issued step
and the process exits 128 + the signal's number within 30 s; the run resumes from it. A second
signal stops the process at once with status 128 + the signal and no checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest

from mpitrain.checkpoint import load_checkpoint
from test_thread_mode import run_threads, thread_env
from test_train_support import (BIGGER, read_metrics, record_time, step_losses,  # noqa: F401
                                tiny_dataset, wait_training)

pytestmark = pytest.mark.slow  # training runs in subprocesses, signalled

LIMIT = 30.0  # s from the signal to the end of the process


def _long_run(dataset, run_dir, threads=12, extra=()):
    args = ["--threads", threads, "--preset", "tiny", "--dataset", dataset, "--run-dir",
            run_dir, "--epochs", 10000, "--eval-every", 100000, "--save-every", 100000,
            "--quiet", *extra]
    return subprocess.Popen([sys.executable, "-m", "mpitrain", "train", *map(str, args)],
                            env=thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_saves_and_exits(tiny_dataset, tmp_path, signum):
    run_dir = str(tmp_path / "run")
    proc = _long_run(tiny_dataset, run_dir)
    wait_training(proc, run_dir)
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=LIMIT + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process did not end after the signal")
    record_time(f"signal {int(signum)} in thread mode", time.monotonic() - t0)
    assert time.monotonic() - t0 < LIMIT
    assert proc.returncode == 128 + signum, err
    assert "stopped by signal" in out
    records = read_metrics(run_dir)
    last = max(step_losses(records))
    assert any(r.get("event") == "signal" and r["signal"] == signum for r in records)
    assert any(r.get("event") == "checkpoint" and r["step"] == last for r in records)
    ckpt = load_checkpoint(f"{run_dir}/checkpoint_step_{last}.h5")
    assert ckpt.step == last
    # and it resumes (a few more steps)
    proc = run_threads(4, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run_dir,
                       "--epochs", 10000, "--eval-every", 100000, "--save-every", 100000,
                       "--stop-at", last + 3, "--resume", "auto", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert max(step_losses(read_metrics(run_dir))) == last + 3


def test_second_sigint_stops_at_once_without_a_checkpoint(tiny_dataset, tmp_path):
    # as in test_signals: a model big enough that the abort beats the final save
    run_dir = str(tmp_path / "run")
    proc = _long_run(tiny_dataset, run_dir, threads=4, extra=BIGGER)
    wait_training(proc, run_dir)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process did not end after the second signal")
    record_time("second SIGINT in thread mode (from the first)", time.monotonic() - t0)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "mpitrain: second signal (SIGINT): stopping at once" in err
    assert "stopped by signal" not in out
    records = read_metrics(run_dir)
    assert any(r.get("event") == "signal" for r in records)
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [0]
    assert sorted(f for f in os.listdir(run_dir) if f.endswith(".h5")) == ["checkpoint_step_0.h5"]
