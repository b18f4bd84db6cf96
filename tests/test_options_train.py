"""The model options through the real trainer: the step invariant and determinism hold for
every option alone and for all of them at once (tiny preset, 20 steps). Thread mode and
`mpirun -n 2` / `-n 3` (all options: `-n 12` too) agree to 1e-4 relative (the bound
tests/test_thread_mode.py uses: different worker counts sum in different orders), a repeat is
bitwise, and 10 steps + resume + 10 steps equal 20 straight steps bit for bit, in thread mode
and (all options) under `mpirun -n 3`."""
import os

import numpy as np
import pytest

from test_thread_mode import _arenas, run_threads
from test_train_support import (read_metrics, run_train, step_losses, tiny_args,  # noqa: F401
                                tiny_dataset)

pytestmark = pytest.mark.slow

VARIANTS = {
    "rotary": ["--set", "position=rotary"],
    "lattice": ["--set", "init=lattice"],
    "ulam": ["--set", "attention_pattern=ulam", "--set", "attention_window=3"],
}
VARIANTS["all"] = [a for v in VARIANTS.values() for a in v]
STEPS = 20


def _final(run_dir):
    return _arenas(os.path.join(run_dir, f"checkpoint_step_{STEPS}.h5"))


def _resume_matches(launch, dataset, run_dir, options, straight):
    """Stop at step 10, resume (the options come from the checkpoint), compare bitwise."""
    proc = launch(tiny_args(dataset, run_dir, *options, "--stop-at", 10))
    assert proc.returncode == 0, proc.stderr
    proc = launch(tiny_args(dataset, run_dir, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr
    a, b = _final(run_dir), _final(straight)
    assert a.keys() == b.keys() and a
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_option_keeps_the_step_invariant_and_resumes_bitwise(variant, tiny_dataset,
                                                                   tmp_path):
    options = VARIANTS[variant]
    launches = {"t4": lambda a: run_threads(4, *a), "t4b": lambda a: run_threads(4, *a),
                "m2": lambda a: run_train(2, *a), "m3": lambda a: run_train(3, *a)}
    if variant == "all":
        launches["m12"] = lambda a: run_train(12, *a, timeout=300)
    runs = {}
    for key, launch in launches.items():
        run_dir = str(tmp_path / key)
        proc = launch(tiny_args(tiny_dataset, run_dir, *options))
        assert proc.returncode == 0, proc.stderr
        runs[key] = step_losses(read_metrics(run_dir))
    assert len(runs["t4"]) == STEPS and runs["t4"] == runs["t4b"]
    a, b = _final(str(tmp_path / "t4")), _final(str(tmp_path / "t4b"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for key in launches:
        for step, loss in runs["t4"].items():
            assert abs(loss - runs[key][step]) <= 1e-4 * abs(loss), (key, step)
    if variant in ("rotary", "all"):
        assert "params/transformer.wpe.weight" not in a   # rotary has no position table
    _resume_matches(lambda a: run_threads(4, *a), tiny_dataset, str(tmp_path / "resumed"),
                    options, str(tmp_path / "t4"))
    if variant == "all":
        _resume_matches(lambda a: run_train(3, *a), tiny_dataset, str(tmp_path / "resumed3"),
                        options, str(tmp_path / "m3"))
