"""Signals with the bundled MPICH launcher: SIGTERM (or Ctrl-C) to mpirun reaches every rank;
Node Zero evaluates, saves a checkpoint and every rank exits within 30 s, and the run resumes
from it. A second Ctrl-C aborts at once, without a checkpoint. A SIGKILL of one rank ends the
whole job.

Each test starts a long tiny run (thousands of planned steps) and signals it once training is
under way (heartbeat.json shows a step > 0)."""
import os
import signal
import subprocess
import time

import pytest

from mpitrain.checkpoint import load_checkpoint
from test_train_support import (BIGGER, read_metrics, record_time, run_train, start_train,
                                step_losses, wait_training,
                                tiny_dataset)  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # MPI runs in subprocesses, signalled

LIMIT = 30.0  # s from the signal to the end of the job


def _long_run(dataset, run_dir, n=4, extra=()):
    return start_train(n, "--preset", "tiny", "--dataset", dataset, "--run-dir", run_dir,
                       "--epochs", 10000, "--eval-every", 100000, "--save-every", 100000,
                       "--quiet", *extra)


def _finish(proc, t_signal, what):
    try:
        out, err = proc.communicate(timeout=LIMIT + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end after the signal")
    elapsed = time.monotonic() - t_signal
    record_time(what, elapsed)
    return out, err, elapsed


def test_sigterm_saves_and_exits(tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _long_run(tiny_dataset, run_dir)
    wait_training(proc, run_dir)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err, elapsed = _finish(proc, t0, "SIGTERM to mpirun -n 4")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert elapsed < LIMIT
    records = read_metrics(run_dir)
    last = max(step_losses(records))
    assert any(r.get("event") == "signal" and r["signal"] == signal.SIGTERM for r in records)
    assert any(r.get("event") == "checkpoint" and r["step"] == last for r in records)
    ck = load_checkpoint(os.path.join(run_dir, f"checkpoint_step_{last}.h5"))
    assert ck.step == last
    assert f"stopped by signal {int(signal.SIGTERM)} after step {last}" in out
    # and the run continues from there
    resumed = run_train(4, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run_dir,
                        "--epochs", 10000, "--resume", "auto", "--stop-at", last + 2, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert max(step_losses(read_metrics(run_dir))) == last + 2


def test_sigint_saves_and_second_sigint_aborts(tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _long_run(tiny_dataset, run_dir)
    wait_training(proc, run_dir)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err, elapsed = _finish(proc, t0, "SIGINT to mpirun -n 4")
    assert proc.returncode == 128 + signal.SIGINT, err
    assert elapsed < LIMIT
    assert any(r.get("event") == "signal" for r in read_metrics(run_dir))

    # A second Ctrl-C while Node Zero is still finishing: mpirun kills every rank. The model
    # is made larger than tiny so that the step in flight, the evaluation and the save take
    # well over the 0.1 s between the two signals (steps ~0.1-0.4 s, a save ~0.8 s, measured):
    # the abort wins that race and no checkpoint of the run's end may appear.
    run_dir = str(tmp_path / "run2")
    proc = _long_run(tiny_dataset, run_dir, extra=BIGGER)
    wait_training(proc, run_dir)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err, elapsed = _finish(proc, t0, "second SIGINT to mpirun -n 4 (from the first)")
    assert elapsed < 10
    # The status is mpirun's: its forced clean-up ends with 0 or 255 (both measured, MPICH
    # 5.0.2's hydra), or 128 + SIGINT when a rank's own MPI_Abort gets there first. So the
    # abort shows in what is missing: Node Zero's closing line and the final checkpoint.
    assert proc.returncode in (0, 255, 128 + signal.SIGINT), (proc.returncode, err)
    assert "stopped by signal" not in out          # Node Zero's "saved and stopped" line
    records = read_metrics(run_dir)   # (the first signal's event may or may not be written yet)
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [0]
    assert sorted(f for f in os.listdir(run_dir) if f.endswith(".h5")) == ["checkpoint_step_0.h5"]


@pytest.mark.parametrize("signum, rank", [(signal.SIGTERM, 2), (signal.SIGHUP, 3),
                                          (signal.SIGINT, 0)])
def test_a_signal_to_one_rank_stops_the_job(tiny_dataset, tmp_path, signum, rank):
    """A signal sent to a single rank (not through mpirun) saves and stops the whole job, with
    the status of that signal; a worker forwards it to Node Zero."""
    run_dir = str(tmp_path / "run")
    proc = _long_run(tiny_dataset, run_dir)
    beat = wait_training(proc, run_dir)
    t0 = time.monotonic()
    os.kill(beat["ranks"][rank]["pid"], signum)
    out, err, elapsed = _finish(proc, t0, f"signal {int(signum)} to rank {rank} of 4")
    assert proc.returncode == 128 + signum, err
    assert elapsed < LIMIT
    records = read_metrics(run_dir)
    last = max(step_losses(records))
    stops = [r for r in records if r.get("event") == "signal"]
    assert [(r["signal"], r["rank"]) for r in stops] == [(signum, rank)]
    assert any(r.get("event") == "checkpoint" and r["step"] == last for r in records)
    assert f"stopped by signal {int(signum)} after step {last}" in out


def _mpich_files() -> set:
    return {f for f in os.listdir("/dev/shm") if f.startswith("mpich_shm_")} \
        if os.path.isdir("/dev/shm") else set()


def test_sigkill_of_a_worker_ends_the_job(tiny_dataset, tmp_path):
    before = _mpich_files()
    run_dir = str(tmp_path / "run")
    proc = _long_run(tiny_dataset, run_dir)
    beat = wait_training(proc, run_dir)
    t0 = time.monotonic()
    os.kill(beat["ranks"][2]["pid"], signal.SIGKILL)
    out, err, elapsed = _finish(proc, t0, "SIGKILL to rank 2 of 4")
    assert proc.returncode != 0
    assert elapsed < LIMIT
    # MPICH's start-up file of the job is gone (MPICH removes it only in MPI_Finalize)
    assert not _mpich_files() - before
