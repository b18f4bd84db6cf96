"""Flat memory over a long run: Node Zero's and the workers' resident sets (VmRSS in
/proc/PID/status) grow by less than 1 MiB from step 2,000 to step 20,000 of the tiny preset
under `mpirun -n 3`.

Why 1 MiB is a robust bound: by step 2,000 every allocation a step makes has been made many
times (glibc's heap and Python's object arenas have reached the size a step needs, the kernel
threads' buffers and MPICH's pools are allocated, every page of the small model touched), so
later steps reuse memory instead of asking for more; the measured growth after that is 0-64
KiB (a few pages of shared libraries' code touched late). A leak as small as the one this
test found (0.3 KB a step: UCX queued a record for every madvise call; mpitrain/pages.py)
adds 5 MB over the 18,000 steps.

The configuration is the cheapest that still runs the real training loop: Node Zero and two
worker processes, the tiny preset with one window per worker (--batch-size 2), no evaluation,
sample or checkpoint inside the measured stretch. About 5.5 ms a step here: the test takes
about 2 minutes on the 2-CPU machine when it is otherwise idle.
"""
import json
import os
import subprocess
import time

import pytest

from test_train_support import _env, train_cmd, tiny_dataset  # noqa: F401 (fixture)

FIRST, LAST = 2_000, 20_000
LIMIT_KIB = 1024   # 1 MiB


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def last_step(metrics_path: str):
    """The newest step record of metrics.jsonl (its last few KB), or None."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()[1:]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record and "event" not in record:
            return record["step"]
    return None


def rank_pids(metrics_path: str):
    """Every rank's PID from the start record (Node Zero first), once it is written."""
    try:
        with open(metrics_path) as f:
            first = f.readline()
    except OSError:
        return None
    return json.loads(first)["pids"] if first.endswith("\n") else None


@pytest.mark.slow
def test_rss_of_node_zero_and_workers_is_flat_from_step_2000_to_20000(tiny_dataset, tmp_path):
    run = str(tmp_path / "run")
    metrics = os.path.join(run, "metrics.jsonl")
    # A few steps beyond LAST, so that every process is still there to be measured.
    proc = subprocess.Popen(train_cmd(3, "--preset", "tiny", "--dataset", tiny_dataset,
                                      "--run-dir", run, "--max-steps", LAST + 200,
                                      "--epochs", 100_000, "--batch-size", 2,
                                      "--eval-every", 100_000, "--save-every", 100_000,
                                      "--quiet"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    samples = {}   # mark -> (step, [VmRSS KiB by rank])
    deadline = time.monotonic() + 900
    try:
        pids = None
        while proc.poll() is None and len(samples) < 2 and time.monotonic() < deadline:
            pids = pids or rank_pids(metrics)
            step = last_step(metrics)
            mark = FIRST if FIRST not in samples else LAST
            if pids and step is not None and step >= mark:
                samples[mark] = (step, [vm_rss_kib(p) for p in pids])
            time.sleep(0.05)
        _, err = proc.communicate(timeout=max(60, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert len(samples) == 2, (samples, err)
    (s0, before), (s1, after) = samples[FIRST], samples[LAST]
    assert s0 < FIRST + 500 and s1 < LAST + 200   # sampled where meant
    growth = [b - a for a, b in zip(before, after)]
    print(f"VmRSS KiB at step {s0}: {before}; at step {s1}: {after}; growth {growth}")
    for rank, kib in enumerate(growth):
        assert kib < LIMIT_KIB, (f"rank {rank} grew {kib} KiB from step {s0} to {s1}",
                                 before, after)
