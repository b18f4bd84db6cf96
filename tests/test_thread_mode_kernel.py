"""The kernel's partitioned training step (thread mode: kernel thread w computes worker w's
windows), against the plain single-thread step as the reference.

- stress: many short steps (forward+backward, clip, AdamW) with 12 kernel threads partitioned
  by the placement give the single-thread run's losses (1e-4 relative) and parameters, and two
  such runs are bitwise identical (no result depends on timing)
- any partition (empty parts included) gives the single-thread gradient to float rounding
- the per-thread window counters count exactly each thread's windows
- a bad partition is refused before C sees it
"""
import numpy as np
import pytest

from mpitrain import Model, ModelConfig, optim
from mpitrain.topology import assign_windows
from tolerances import assert_close, assert_scalar

pytestmark = pytest.mark.numerics

CFG = ModelConfig(vocab_size=97, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
B, T = 24, 16


def _batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, CFG.vocab_size, (B, T)), rng.integers(0, CFG.vocab_size, (B, T)))
            for _ in range(steps)]


def _train(model, batches, partition=None, order=None):
    """Steps as thread mode takes them: windows reordered worker by worker, clip 1.0, AdamW."""
    losses = []
    for step, (x, y) in enumerate(batches, start=1):
        if order is not None:
            x, y = x[order], y[order]
        losses.append(model.forward_backward(x, y, partition=partition))
        optim.update(model, lr=3e-3, step=step, norm=optim.grad_norm(model), max_norm=1.0)
    return np.array(losses)


@pytest.mark.slow
def test_stress_12_threads_against_single_thread():
    batches = _batches(3) * 20        # few distinct batches: the loss must fall
    shares = assign_windows(12, B)
    order = np.array([j for s in shares for j in s])
    partition = [len(s) for s in shares]
    ref_model = Model(CFG, seed=3, threads=1)
    ref = _train(ref_model, batches, order=order)
    runs = []
    for _ in range(2):
        m = Model(CFG, seed=3, threads=12)
        runs.append((_train(m, batches, partition, order), m.param_buffer.copy(), m))
    (l1, p1, m1), (l2, p2, _) = runs
    assert np.array_equal(l1, l2) and np.array_equal(p1, p2)      # bitwise repeatable
    # 60 steps of float32 rounding differences (other blocking): losses measured within 1.1e-6
    # relative (rtol 1e-4: margin 90); parameters within 2.8e-4, AdamW moving rounding-level
    # gradients near zero by up to lr a step: atol = lr = 3e-3 (margin 10.7; worst cases over
    # OpenBLAS's Haswell, Sandybridge and Nehalem kernels)
    assert_close(l1, ref, rtol=1e-4, err_msg="losses")
    assert ref[-1] < ref[0] - 0.5                                 # it learned something
    assert_close(p1, ref_model.param_buffer, rtol=0, atol=3e-3, err_msg="params")
    assert m1.thread_windows() == [60 * n for n in partition]
    assert m1.counters() == (60, 60 * B)


@pytest.mark.parametrize("partition", [[24], [0, 24], [5, 0, 7, 0, 12], [1] * 24,
                                       [3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0]])
def test_any_partition_gives_the_reference_gradient(partition):
    (x, y), = _batches(1, seed=1)
    ref = Model(CFG, seed=5, threads=1)
    loss_ref = ref.forward_backward(x, y)
    m = Model(CFG, seed=5, threads=len(partition))
    loss = m.forward_backward(x, y, partition=partition)
    # one step's rounding differences: measured within 9e-7 of the largest gradient (atol 1e-5
    # of it: margin 11) with the Haswell, Sandybridge and Nehalem kernels
    assert_scalar(loss, loss_ref, rel=1e-6)
    scale = np.abs(ref.grad_buffer).max()
    assert_close(m.grad_buffer, ref.grad_buffer, rtol=0, atol=1e-5 * scale)
    assert m.thread_windows() == partition
    # accumulate adds the same gradient again
    m.forward_backward(x, y, partition=partition, accumulate=True)
    assert_close(m.grad_buffer, 2 * ref.grad_buffer, rtol=0, atol=2e-5 * scale)


def test_unpartitioned_threads_count_windows_once():
    (x, y), = _batches(1, seed=2)
    m = Model(CFG, seed=0, threads=3)
    m.work_parts = 3
    m.forward_backward(x, y)
    assert sum(m.thread_windows()) == B and len(m.thread_windows()) == 3


@pytest.mark.parametrize("partition", [[25], [12, 11], [30, -6], [], [2] * 12 + [0]])
def test_bad_partition_is_refused(partition):
    (x, y), = _batches(1)
    m = Model(CFG, seed=0, threads=12)
    with pytest.raises(ValueError, match="partition"):
        m.forward_backward(x, y, partition=partition)
    assert m.counters() == (0, 0)
