"""The MPI trainer through the real command line (mpirun -n N python -m mpitrain train).

Proofs held here:
- the first 20 losses of the tiny preset agree to 1e-4 relative for -n 2, -n 3 and -n 12
  (measured: ~2e-8; the only difference is the order of float sums in the reductions);
- the kernel counters: Node Zero's are zero, the workers' windows add up to steps x batch size;
- 20 steps straight and 10 + resume + 10 give bitwise-identical parameters and Adam moments at
  the same world size, and the same losses (1e-4 relative) when resumed at another world size;
- the windows each worker trains are exactly its symmetry groups' windows of each step;
- workers sharing one parameter arena (the default on one node) and workers keeping a copy each
  (MPITRAIN_SHARED_MEMORY=0, as across nodes) end with bitwise-identical state, resume included.
Each run takes about 1 s (-n 2, -n 3) to 3 s (-n 12, oversubscribed) on 2 cores.
"""
import json
import os

import h5py
import numpy as np
import pytest

from mpitrain import optim, schedule
from mpitrain.config import PRESETS
from mpitrain.topology import assign_windows
from mpitrain.trainer.mpi_worker import call_ranges, tail_windows
from mpitrain.trainer.worker import MICRO_WINDOWS
from test_train_support import (end_record, read_metrics, run_train, step_losses, tiny_args,
                                tiny_dataset, val_losses)  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # MPI multi-rank runs

BATCH = PRESETS["tiny"]["train"]["batch_size"]
REL = 1e-4


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """20 tiny steps at -n 2 (with --keep-last 1), -n 3 and -n 12: run dir by world size."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for n in (2, 3, 12):
        run_dir = str(base / f"n{n}")
        extra = ["--keep-last", 1] if n == 2 else []
        proc = run_train(n, *tiny_args(tiny_dataset, run_dir, *extra))
        assert proc.returncode == 0, proc.stderr
        out[n] = run_dir
    return out


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_losses_agree_across_world_sizes(runs):
    ref = step_losses(read_metrics(runs[2]))
    assert sorted(ref) == list(range(1, 21))
    assert ref[20] < ref[1] - 0.5  # it learns
    for n in (3, 12):
        got = step_losses(read_metrics(runs[n]))
        assert sorted(got) == list(range(1, 21))
        for s in range(1, 21):
            assert _rel(got[s], ref[s]) < REL, (n, s, got[s], ref[s])
    ref_val = val_losses(read_metrics(runs[2]))
    assert sorted(ref_val) == [0, 5, 10, 15, 20]
    for n in (3, 12):
        got = val_losses(read_metrics(runs[n]))
        assert all(_rel(got[s], ref_val[s]) < REL for s in ref_val), (n, got, ref_val)


@pytest.mark.parametrize("n", [2, 3, 12])
def test_counters(runs, n):
    end = end_record(read_metrics(runs[n]))
    counters = np.array(end["counters"])
    assert counters.shape == (n, 2)
    assert counters[0].tolist() == [0, 0]                 # Node Zero never trains
    shares = assign_windows(n - 1, BATCH)
    # one kernel call per step for each MICRO_WINDOWS of the worker's windows, the tail apart
    cpus = len(os.sched_getaffinity(0))
    calls = [20 * len(call_ranges(len(w), tail_windows(shares, i, n - 1, cpus, 1)))
             for i, w in enumerate(shares)]
    assert counters[1:, 0].tolist() == calls
    assert counters[1:, 1].sum() == 20 * BATCH            # every window exactly once
    assert counters[1:, 1].tolist() == [20 * len(w) for w in shares]


def test_the_tail_and_the_calls():
    seed_shares = assign_windows(11, 32)                  # -n 12, seed preset
    assert [len(s) for s in seed_shares] == [3, 3, 3, 3, 3, 3, 5, 3, 2, 2, 2]
    assert [tail_windows(seed_shares, w, 11, 2, 1) for w in range(11)] == [0] * 6 + [2] + [0] * 4
    assert tail_windows(seed_shares, 6, 11, 12, 1) == 0   # a CPU each: none idles
    assert tail_windows(seed_shares, 6, 11, 2, 2) == 0    # it already runs on every CPU
    assert tail_windows(assign_windows(2, 32), 0, 2, 1, 1) == 0   # equal shares
    assert call_ranges(5, 2) == [(0, 3), (3, 5)]
    assert call_ranges(16, 0) == [(0, 8), (8, 16)]
    assert call_ranges(19, 3) == [(0, 8), (8, 16), (16, 19)]
    assert call_ranges(20, 10) == [(0, 8), (8, 10), (10, 18), (18, 20)]
    assert call_ranges(0, 0) == []
    assert MICRO_WINDOWS == 8


def test_run_directory_contents(runs):
    files = set(os.listdir(runs[3]))
    assert {"checkpoint_step_0.h5", "checkpoint_step_10.h5", "checkpoint_step_20.h5",
            "train.log", "metrics.jsonl", "heartbeat.json", "vocab.txt"} <= files
    # --keep-last 1: step 0 and the newest only
    assert sorted(f for f in os.listdir(runs[2]) if f.startswith("checkpoint_step_")) == \
        ["checkpoint_step_0.h5", "checkpoint_step_20.h5"]
    records = read_metrics(runs[3])
    for r in records:
        if "loss" in r and "event" not in r:
            assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    events = [r["event"] for r in records if "event" in r]
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("checkpoint") == 3
    with open(os.path.join(runs[3], "heartbeat.json")) as f:
        beat = json.load(f)
    assert beat["step"] == 20 and len(beat["ranks"]) == 3
    log = open(os.path.join(runs[3], "train.log")).read()
    for rank in range(3):
        assert f"rank {rank}: host " in log
    assert "parameters" in log and "graph neighbours" in log


def _state(path):
    with h5py.File(path, "r") as f:
        return {g: {k: f[g][k][()] for k in f[g]} for g in ("params", "optimizer/m",
                                                             "optimizer/v")}


def test_resume_is_bitwise_identical(runs, tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "resumed")
    first = run_train(3, *tiny_args(tiny_dataset, run_dir, "--stop-at", 10))
    assert first.returncode == 0, first.stderr
    assert max(step_losses(read_metrics(run_dir))) == 10
    second = run_train(3, *tiny_args(tiny_dataset, run_dir, "--resume", "auto"))
    assert second.returncode == 0, second.stderr
    records = read_metrics(run_dir)
    assert any(r.get("event") == "resume" and r["step"] == 10 for r in records)
    straight = step_losses(read_metrics(runs[3]))
    assert step_losses(records) == straight               # exactly, all 20
    a = _state(os.path.join(runs[3], "checkpoint_step_20.h5"))
    b = _state(os.path.join(run_dir, "checkpoint_step_20.h5"))
    for group in a:
        for name in a[group]:
            assert np.array_equal(a[group][name], b[group][name]), (group, name)


@pytest.mark.parametrize("n", [3, 12])
def test_private_copies_match_the_shared_arena(runs, tiny_dataset, tmp_path, n):
    """All-gathered private parameter copies and the node's shared arena: the same state, bit
    for bit (at -n 3 through a resume, so the resume's one-writer path is covered too)."""
    run_dir = str(tmp_path / "private")
    private = {"MPITRAIN_SHARED_MEMORY": "0"}
    stop = ["--stop-at", 10] if n == 3 else []
    proc = run_train(n, *tiny_args(tiny_dataset, run_dir, *stop), env=private)
    assert proc.returncode == 0, proc.stderr
    if n == 3:   # resume the private run with the shared arena
        proc = run_train(n, *tiny_args(tiny_dataset, run_dir, "--resume", "auto"))
        assert proc.returncode == 0, proc.stderr
    assert step_losses(read_metrics(run_dir)) == step_losses(read_metrics(runs[n]))
    a = _state(os.path.join(runs[n], "checkpoint_step_20.h5"))
    b = _state(os.path.join(run_dir, "checkpoint_step_20.h5"))
    for group in a:
        for name in a[group]:
            assert np.array_equal(a[group][name], b[group][name]), (group, name)


def test_resume_at_another_world_size(runs, tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "other")
    ckpt = os.path.join(runs[3], "checkpoint_step_10.h5")
    proc = run_train(2, *tiny_args(tiny_dataset, run_dir, "--resume", ckpt))
    assert proc.returncode == 0, proc.stderr
    got = step_losses(read_metrics(run_dir))
    straight = step_losses(read_metrics(runs[3]))
    assert sorted(got) == list(range(11, 21))
    assert all(_rel(got[s], straight[s]) < REL for s in got), (got, straight)


def test_windows_are_the_groups_windows(tiny_dataset, tmp_path):
    """Each worker's trained windows, recorded by the worker, against the placement function
    and the data order computed here."""
    trace = tmp_path / "trace"
    trace.mkdir()
    run_dir = str(tmp_path / "run")
    proc = run_train(5, *tiny_args(tiny_dataset, run_dir, "--max-steps", 6),
                     env={"MPITRAIN_TRACE_WINDOWS": str(trace)})
    assert proc.returncode == 0, proc.stderr
    from mpitrain.dataset import Dataset

    num_windows = Dataset.open(tiny_dataset).num_windows("train", 16)
    shares = assign_windows(4, BATCH)
    seen = {}
    for w in range(4):
        with open(trace / f"worker_{w}.jsonl") as f:
            seen[w] = {r["step"]: r["windows"] for r in map(json.loads, f)}
    position = schedule.DataPosition()
    for step in range(1, 7):
        ids, position = schedule.next_batch(position, BATCH, num_windows, 0)
        for w in range(4):
            assert seen[w][step] == ids[shares[w]].tolist(), (step, w)
        assert sorted(sum((seen[w][step] for w in range(4)), [])) == sorted(ids.tolist())


def test_matches_a_single_process_reference(runs, tiny_dataset):
    """The distributed run against the plain loop it implements, in this process: the same data
    order, learning-rate schedule, one forward_backward over the whole batch, clipping, AdamW."""
    from mpitrain import Model
    from mpitrain.config import ModelConfig, TrainConfig
    from mpitrain.dataset import Dataset

    records = read_metrics(runs[12])
    start = records[0]
    assert start["event"] == "start"
    mc, tc = ModelConfig.from_dict(start["model_config"]), TrainConfig.from_dict(
        start["train_config"])
    ds = Dataset.open(tiny_dataset)
    tokens, val = ds.split_tokens("train"), ds.split_tokens("val")
    num_windows = schedule.window_count(len(tokens), tc.seq_len)
    total = schedule.total_steps(num_windows, tc.batch_size, tc.epochs, tc.max_steps)
    model = Model(mc, seed=tc.seed)
    position, losses = schedule.DataPosition(), {}
    for step in range(1, 21):
        ids, position = schedule.next_batch(position, tc.batch_size, num_windows, tc.seed)
        x, y = schedule.gather_windows(tokens, ids, tc.seq_len)
        losses[step] = model.forward_backward(x, y)
        optim.update(model, lr=schedule.lr_at(step, tc.lr, tc.warmup, total), step=step,
                     norm=optim.grad_norm(model), **optim.train_settings(tc))
    got = step_losses(records)
    assert all(_rel(got[s], losses[s]) < REL for s in losses), (got, losses)
    eval_ids = schedule.eval_window_ids(schedule.window_count(len(val), tc.seq_len),
                                        tc.eval_windows)
    vx, vy = schedule.gather_windows(val, eval_ids, tc.seq_len)
    assert _rel(val_losses(records)[20], model.loss(vx, vy)) < REL


def test_shared_memory_only_where_it_fits(tmp_path, capsys):
    """A /dev/shm too small for the windows (a container's 64 MB default) would end a worker
    with SIGBUS when it first writes there: the workers keep private copies instead, and the
    lead worker says so."""
    from mpitrain.trainer.comm import _shm_fits

    assert _shm_fits(1 << 20, warn=True, path=str(tmp_path))
    assert capsys.readouterr().err == ""
    assert not _shm_fits(1 << 60, warn=True, path=str(tmp_path))
    assert "workers need 1099511627776 MB to share" in capsys.readouterr().err
    assert not _shm_fits(1 << 20, warn=False, path=str(tmp_path / "missing"))
    assert capsys.readouterr().err == ""
