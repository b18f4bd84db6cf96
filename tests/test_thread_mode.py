"""Thread mode through the real command line (`python -m mpitrain train` without mpirun).

- the first 20 losses of the tiny preset with --threads 2, 4 and 12 agree to 1e-4 relative
  with each other and with `mpirun -n 3` / `-n 12` on the same data and seed (validation
  losses too)
- repeated runs with the same thread count are bitwise identical (losses and checkpoint)
- counters: Node Zero's thread computed nothing; worker thread w computed exactly its groups'
  windows (the kernel's per-thread counters, and the windows each thread was given)
- a thread-mode checkpoint resumes under MPI and an MPI checkpoint in thread mode, continuing
  with the straight run's losses
- user mistakes (--threads-per-rank here, --threads under mpirun, --threads 1) are one line, exit 2
- a worker thread or Node Zero that raises ends the run with a message naming it (no hang)
"""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO
from mpitrain import launcher
from mpitrain.config import PRESETS
from mpitrain.topology import assign_windows
from test_train_support import (end_record, read_metrics, run_train, step_losses, tiny_args,
                                tiny_dataset, val_losses)  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # thread-mode runs and MPI runs in subprocesses

REL = 1e-4
BATCH = PRESETS["tiny"]["train"]["batch_size"]


def thread_env(extra=None):
    """The environment of a plain (non-mpirun) run."""
    env = {k: v for k, v in os.environ.items()
           if k not in launcher.ALL_VARS}
    env["PYTHONPATH"] = REPO
    env.update(extra or {})
    return env


def run_threads(threads, *args, env=None, timeout=120):
    """`python -m mpitrain train --threads N ARGS` to completion."""
    extra = [] if threads is None else ["--threads", str(threads)]
    return subprocess.run([sys.executable, "-m", "mpitrain", "train", *extra, *map(str, args)],
                          env=thread_env(env), capture_output=True, text=True, timeout=timeout)


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """20 tiny steps: ('t', N) = --threads N, ('t4b',) a repeat of --threads 4, ('m', n) =
    mpirun -n n. Run directory by key."""
    root = tmp_path_factory.mktemp("thread_runs")
    out = {}
    for key in (("t", 2), ("t", 4), ("t", 12), ("t4b", 4)):
        run_dir = str(root / f"{key[0]}{key[1]}")
        proc = run_threads(key[1], *tiny_args(tiny_dataset, run_dir))
        assert proc.returncode == 0, proc.stderr
        out[key] = run_dir
    for n in (3, 12):
        run_dir = str(root / f"m{n}")
        proc = run_train(n, *tiny_args(tiny_dataset, run_dir))
        assert proc.returncode == 0, proc.stderr
        out[("m", n)] = run_dir
    return out


def test_losses_agree_with_each_other_and_mpi(runs):
    ref = step_losses(read_metrics(runs[("t", 2)]))
    assert sorted(ref) == list(range(1, 21))
    assert ref[20] < ref[1] - 0.5  # it learns
    ref_val = val_losses(read_metrics(runs[("t", 2)]))
    assert sorted(ref_val) == [0, 5, 10, 15, 20]
    for key in (("t", 4), ("t", 12), ("m", 3), ("m", 12)):
        records = read_metrics(runs[key])
        got = step_losses(records)
        assert sorted(got) == list(range(1, 21)), key
        for s in range(1, 21):
            assert _rel(got[s], ref[s]) < REL, (key, s, got[s], ref[s])
        got_val = val_losses(records)
        assert all(_rel(got_val[s], ref_val[s]) < REL for s in ref_val), (key, got_val)


def _arenas(path):
    with h5py.File(path, "r") as f:
        return {f"{g}/{k}": f[g][k][()] for g in ("params", "optimizer/m", "optimizer/v")
                for k in f[g]}


def test_repeated_runs_are_bitwise_identical(runs):
    a, b = read_metrics(runs[("t", 4)]), read_metrics(runs[("t4b", 4)])
    assert step_losses(a) == step_losses(b)
    assert val_losses(a) == val_losses(b)
    ckpt = "checkpoint_step_20.h5"
    x, y = _arenas(os.path.join(runs[("t", 4)], ckpt)), _arenas(os.path.join(runs[("t4b", 4)], ckpt))
    assert x.keys() == y.keys() and len(x) > 0
    for k in x:
        assert np.array_equal(x[k], y[k]), k


@pytest.mark.parametrize("threads", [2, 4, 12])
def test_counters_node_zero_none_workers_their_windows(runs, threads):
    end = end_record(read_metrics(runs[("t", threads)]))
    counters = np.array(end["counters"])
    assert counters.shape == (threads, 2)
    assert counters[0].tolist() == [0, 0]                 # Node Zero's thread never trains
    assert (counters[1:, 0] == 20).all()                  # the replica's training calls
    expected = [20 * len(w) for w in assign_windows(threads - 1, BATCH)]
    assert counters[1:, 1].tolist() == expected           # kernel thread w: its groups' windows
    assert len(end["peak_rss_mb"]) == threads


def test_run_directory_matches_mpi_mode(runs):
    names = sorted(os.listdir(runs[("m", 3)]))
    assert sorted(os.listdir(runs[("t", 4)])) == names
    beat = json.load(open(os.path.join(runs[("t", 4)], "heartbeat.json")))
    assert beat["step"] == 20
    log = open(os.path.join(runs[("t", 4)], "train.log")).read()
    assert "thread mode" in log and "Node Zero + 3 worker(s)" in log


def test_windows_are_the_groups_windows(tiny_dataset, tmp_path):
    """Each worker thread is given exactly its groups' windows of every step, as MPI rank w+1
    would take them (the trace hook of process.py, one file per worker thread)."""
    from mpitrain import schedule
    from mpitrain.dataset import Dataset

    trace, run_dir = tmp_path / "trace", str(tmp_path / "run")
    trace.mkdir()
    proc = run_threads(5, *tiny_args(tiny_dataset, run_dir, "--max-steps", 6),
                       env={"MPITRAIN_TRACE_WINDOWS": str(trace)})
    assert proc.returncode == 0, proc.stderr
    num_windows = Dataset.open(tiny_dataset).num_windows("train", 16)
    shares = assign_windows(4, BATCH)
    position = schedule.DataPosition()
    batches = {}
    for step in range(1, 7):
        batches[step], position = schedule.next_batch(position, BATCH, num_windows, 0)
    for w, share in enumerate(shares):
        lines = [json.loads(x) for x in open(trace / f"worker_{w}.jsonl")]
        assert [r["step"] for r in lines] == list(range(1, 7))
        for r in lines:
            assert r["windows"] == batches[r["step"]][share].tolist()


def test_thread_checkpoint_resumes_under_mpi_and_back(runs, tiny_dataset, tmp_path):
    ref = step_losses(read_metrics(runs[("t", 2)]))
    # thread mode -> MPI
    run_dir = str(tmp_path / "t_to_m")
    first = run_threads(4, *tiny_args(tiny_dataset, run_dir, "--stop-at", 10))
    assert first.returncode == 0, first.stderr
    second = run_train(3, *tiny_args(tiny_dataset, run_dir, "--resume", "auto"))
    assert second.returncode == 0, second.stderr
    got = step_losses(read_metrics(run_dir))
    assert sorted(got) == list(range(1, 21))
    assert all(_rel(got[s], ref[s]) < REL for s in range(11, 21)), got
    # MPI -> thread mode
    run_dir = str(tmp_path / "m_to_t")
    first = run_train(3, *tiny_args(tiny_dataset, run_dir, "--stop-at", 10))
    assert first.returncode == 0, first.stderr
    second = run_threads(12, *tiny_args(tiny_dataset, run_dir, "--resume", "auto"))
    assert second.returncode == 0, second.stderr
    records = read_metrics(run_dir)
    got = step_losses(records)
    assert all(_rel(got[s], ref[s]) < REL for s in range(11, 21)), got
    assert any(r.get("event") == "resume" and r["step"] == 10 for r in records)


def test_resume_in_thread_mode_is_bitwise(runs, tiny_dataset, tmp_path):
    """10 steps + resume + 10 steps at --threads 4 equal 20 straight steps bit for bit."""
    run_dir = str(tmp_path / "run")
    assert run_threads(4, *tiny_args(tiny_dataset, run_dir, "--stop-at", 10)).returncode == 0
    proc = run_threads(4, *tiny_args(tiny_dataset, run_dir, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr
    a = _arenas(os.path.join(run_dir, "checkpoint_step_20.h5"))
    b = _arenas(os.path.join(runs[("t", 4)], "checkpoint_step_20.h5"))
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _one_line_error(proc, words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0], lines[0]


def test_options_of_the_other_mode_are_refused(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_threads(None, *tiny_args(tiny_dataset, str(run_dir), "--threads-per-rank", 2))
    _one_line_error(proc, "--threads-per-rank is for MPI mode")
    proc = run_threads(1, *tiny_args(tiny_dataset, str(run_dir)))
    _one_line_error(proc, "--threads must be in [2,")
    proc = run_train(3, *tiny_args(tiny_dataset, str(run_dir), "--threads", 4))
    assert proc.returncode != 0
    assert "--threads is for thread mode" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()                          # nothing written


@pytest.mark.parametrize("fault, who", [("1:3", "worker thread"), ("0:3", "Node Zero")])
def test_a_failing_thread_ends_the_run(tiny_dataset, tmp_path, fault, who):
    proc = run_threads(3, *tiny_args(tiny_dataset, str(tmp_path / "run")),
                       env={"MPITRAIN_FAULT": fault}, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"mpitrain: {who}: RuntimeError: injected fault" in proc.stderr


@pytest.mark.parametrize("mode", ["threads", "mpi"])
def test_resume_from_the_step_0_checkpoint(runs, tiny_dataset, tmp_path, mode):
    """Resuming from checkpoint_step_0.h5 (a resume whose start step is 0) must not hang: Node
    Zero sends the state of every resume and the workers wait for it. The run then equals the
    straight run bit for bit at the same world (--threads 4 / its MPI twin at tolerance)."""
    start = os.path.join(runs[("t", 4)], "checkpoint_step_0.h5")
    run_dir = str(tmp_path / "from0")
    args = tiny_args(tiny_dataset, run_dir, "--resume", start)
    proc = run_threads(4, *args, timeout=60) if mode == "threads" else run_train(3, *args)
    assert proc.returncode == 0, proc.stderr
    got = step_losses(read_metrics(run_dir))
    ref = step_losses(read_metrics(runs[("t", 4)]))
    assert sorted(got) == list(range(1, 21))
    if mode == "threads":
        a = _arenas(os.path.join(run_dir, "checkpoint_step_20.h5"))
        b = _arenas(os.path.join(runs[("t", 4)], "checkpoint_step_20.h5"))
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    else:
        assert all(_rel(got[s], ref[s]) < REL for s in range(1, 21)), got
