"""The model options through the real trainer: the step invariant and determinism hold with
every option on (tiny preset, all options at once): thread mode and `mpirun -n 3` agree to
1e-4 relative (the bound tests/test_thread_mode.py uses: different reduction orders), a repeat
is bitwise, and 10 steps + resume + 10 steps equal 20 straight steps bit for bit."""
import os

import numpy as np
import pytest

from test_thread_mode import _arenas, run_threads
from test_train_support import (read_metrics, run_train, step_losses, tiny_args,  # noqa: F401
                                tiny_dataset)

pytestmark = pytest.mark.slow

OPTIONS = ["--set", "position=rotary", "--set", "init=lattice", "--set",
           "attention_pattern=ulam", "--set", "attention_window=3"]


def test_options_keep_the_step_invariant_and_resume_bitwise(tiny_dataset, tmp_path):
    runs = {}
    for key, launch in (("t4", lambda a: run_threads(4, *a)), ("t4b", lambda a: run_threads(4, *a)),
                        ("m3", lambda a: run_train(3, *a))):
        run_dir = str(tmp_path / key)
        proc = launch(tiny_args(tiny_dataset, run_dir, *OPTIONS))
        assert proc.returncode == 0, proc.stderr
        runs[key] = step_losses(read_metrics(run_dir))
    assert len(runs["t4"]) == 20 and runs["t4"] == runs["t4b"]
    for step, loss in runs["t4"].items():
        assert abs(loss - runs["m3"][step]) <= 1e-4 * abs(loss), step
    run_dir = str(tmp_path / "resumed")
    assert run_threads(4, *tiny_args(tiny_dataset, run_dir, *OPTIONS, "--stop-at", 10)).returncode == 0
    proc = run_threads(4, *tiny_args(tiny_dataset, run_dir, "--resume", "auto"))  # options from it
    assert proc.returncode == 0, proc.stderr
    a = _arenas(os.path.join(run_dir, "checkpoint_step_20.h5"))
    b = _arenas(os.path.join(str(tmp_path / "t4"), "checkpoint_step_20.h5"))
    assert "params/transformer.wpe.weight" not in a and "transformer.wpe.weight" not in a
    for k in a:
        assert np.array_equal(a[k], b[k]), k
