"""`mpitrain train ... | head -2`: a reader that goes away never ends training, in thread mode
and under mpirun (where mpiexec itself would die of SIGPIPE and take every rank with it if it
wrote to the closed pipe: trainer/output.py). The run finishes with its checkpoints, train.log
has everything, and the status is 0."""
import os
import subprocess
import sys

import pytest

from test_train_support import _env, mpirun_or_skip, read_metrics, tiny_dataset  # noqa: F401

STEPS = 30


def _piped(cmd, run_dir, merge_stderr):
    args = ["--preset", "tiny", "--dataset", cmd[1], "--run-dir", run_dir, "--max-steps", STEPS,
            "--epochs", 100, "--eval-every", 5, "--save-every", 10]
    line = " ".join(f'"{a}"' for a in [*cmd[0], "-m", "mpitrain", "train", *map(str, args)])
    redirect = "2>&1" if merge_stderr else '2>"$ERR"'
    err = os.path.join(run_dir + ".err")
    env = _env({"ERR": err})
    p = subprocess.run(["bash", "-c", f'{line} {redirect} | head -2; '
                        'echo "status=${PIPESTATUS[0]}"'], env=env, capture_output=True,
                       text=True, timeout=180)
    out, status = p.stdout.rsplit("status=", 1)
    return int(status), out


@pytest.mark.parametrize("mode", ["threads", "mpi"])
@pytest.mark.parametrize("merge_stderr", [False, True])
def test_closed_stdout_never_ends_a_run(tiny_dataset, tmp_path, mode, merge_stderr):
    run_dir = str(tmp_path / "run")
    launch = [sys.executable] if mode == "threads" else [mpirun_or_skip(), "-n", "3",
                                                           sys.executable]
    status, out = _piped((launch, tiny_dataset), run_dir, merge_stderr)
    assert status == 0, out
    assert len(out.splitlines()) == 2
    records = read_metrics(run_dir)
    assert any(r.get("event") == "end" for r in records)
    assert any(r.get("event") == "checkpoint" and r["step"] == STEPS for r in records)
    with open(os.path.join(run_dir, "train.log")) as f:
        log = f.read()
    assert f"step {STEPS}/{STEPS}" in log and "peak RSS by rank" in log
