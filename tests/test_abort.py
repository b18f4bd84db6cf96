"""An uncaught exception on any rank aborts the whole job promptly, naming the rank.

The fault is injected with the test hook MPITRAIN_FAULT=RANK:STEP (docs/TRAINING.md). Without
the abort path a plain `python` rank that raises leaves the others waiting forever; with it the
job ends in about a second (limit here: 30 s)."""
import time

import pytest

from test_train_support import (read_metrics, record_time, run_train, tiny_args,  # noqa: F401
                                tiny_dataset)

pytestmark = pytest.mark.slow  # MPI multi-rank runs


@pytest.mark.parametrize("rank", [0, 2])
def test_exception_on_one_rank_aborts_the_job(tiny_dataset, tmp_path, rank):
    t0 = time.monotonic()
    run_dir = str(tmp_path / "run")
    proc = run_train(4, *tiny_args(tiny_dataset, run_dir), env={"MPITRAIN_FAULT": f"{rank}:3"},
                     timeout=60)
    elapsed = time.monotonic() - t0
    steps = [r for r in read_metrics(run_dir) if "loss" in r and "event" not in r]
    if steps:   # from the last step logged before the fault (its wall-clock time)
        record_time(f"exception on rank {rank} of 4", time.time() - steps[-1]["time"])
    assert proc.returncode != 0
    assert f"mpitrain: rank {rank}: RuntimeError: injected fault (MPITRAIN_FAULT) at step 3" \
        in proc.stderr, proc.stderr
    assert elapsed < 30, elapsed
