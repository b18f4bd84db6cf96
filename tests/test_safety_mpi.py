"""Skipped non-finite steps under `mpirun -n 3`: a run stopped mid-way and resumed with
`--resume auto` reaches the same final parameters and optimizer state, bitwise, as the
uninterrupted run with the same injected steps (MPITRAIN_NONFINITE, trainer/process.py). The
MPI path decides a skip on every worker from the global sums (worker.finite_step), with the
optimizer state sharded among the workers; the thread-mode twin is in test_safety.py."""
import pytest

from test_safety import assert_all_sound, same_state, state, strict_records
from test_train_support import run_train, tiny_dataset  # noqa: F401 (fixture)


def mpi_train(dataset, run_dir, *extra, env=None):
    """mpirun -n 3, tiny preset, 20 planned steps, a checkpoint every 5."""
    return run_train(3, "--preset", "tiny", "--dataset", dataset, "--run-dir", run_dir,
                     "--max-steps", 20, "--epochs", 100, "--eval-every", 5, "--save-every", 5,
                     "--quiet", *extra, env=env, timeout=300)


@pytest.mark.slow
def test_nonfinite_steps_resume_bitwise_under_mpirun(tiny_dataset, tmp_path):
    env = {"MPITRAIN_NONFINITE": "6-8,12"}
    straight = str(tmp_path / "straight")
    r = mpi_train(tiny_dataset, straight, env=env)
    assert r.returncode == 0, r.stderr
    assert_all_sound(straight)
    assert [x["step"] for x in strict_records(straight)
            if x.get("event") == "nonfinite"] == [6, 7, 8, 12]

    split = str(tmp_path / "split")
    first = mpi_train(tiny_dataset, split, "--stop-at", 10, env=env)
    assert first.returncode == 0, first.stderr
    second = mpi_train(tiny_dataset, split, "--resume", "auto", env=env)
    assert second.returncode == 0, second.stderr
    assert_all_sound(split)
    for step in (10, 15, 20):
        same_state(state(f"{straight}/checkpoint_step_{step}.h5"),
                   state(f"{split}/checkpoint_step_{step}.h5"))
    # The skipped steps changed the run: the parameters differ from a run without them.
    clean = str(tmp_path / "clean")
    assert mpi_train(tiny_dataset, clean, "--stop-at", 10).returncode == 0
    with pytest.raises(AssertionError):
        same_state(state(f"{straight}/checkpoint_step_10.h5"),
                   state(f"{clean}/checkpoint_step_10.h5"))
