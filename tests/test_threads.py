"""Threads inside the kernel: deterministic, timing-independent, thread-count independent.

Each thread writes only what it owns and every sum runs in a fixed order, so
 - a repeated call gives bitwise-identical losses and gradients;
 - different thread counts give the same results to float32 tolerance (only the row/column
   blocking inside OpenBLAS calls changes): we allow rtol 1e-5 on the loss and atol 1e-5
   relative to each tensor's largest gradient (measured worst 5.4e-7 of it with OpenBLAS's
   Haswell, Sandybridge and Nehalem kernels: margin 18; a gradient entry sums terms that
   cancel, so its error follows the tensor's magnitude, not its own).
"""
import numpy as np
import pytest

from mpitrain import Model, ModelConfig, optim
from tolerances import assert_close, assert_scalar

pytestmark = pytest.mark.numerics

CFG = ModelConfig(vocab_size=300, max_seq_len=32, d_model=48, n_layers=2, n_heads=4, d_ff=96)


def data(B=6, T=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
            rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32))


@pytest.mark.parametrize("threads", [1, 3])
def test_repeats_are_bitwise_identical(threads):
    model = Model(CFG, seed=3, threads=threads)
    inputs, targets = data()
    loss = model.forward_backward(inputs, targets)
    grads = model.grad_buffer.copy()
    logits = model.forward(inputs)
    for _ in range(3):
        assert model.forward_backward(inputs, targets) == loss
        np.testing.assert_array_equal(model.grad_buffer, grads)
        np.testing.assert_array_equal(model.forward(inputs), logits)
    twin = Model(CFG, seed=3, threads=threads)
    assert twin.forward_backward(inputs, targets) == loss
    np.testing.assert_array_equal(twin.grad_buffer, grads)


def test_thread_counts_agree():
    inputs, targets = data()
    results = {}
    for threads in (1, 2, 12):
        model = Model(CFG, seed=4, threads=threads)
        model.work_parts = threads  # really split 12 ways, even on a machine with fewer CPUs
        loss = model.forward_backward(inputs, targets)
        results[threads] = (loss, {n: g.copy() for n, g in model.grads.items()},
                            model.loss(inputs, targets), model.forward(inputs))
    loss1, grads1, eval1, logits1 = results[1]
    for threads in (2, 12):
        loss, grads, ev, logits = results[threads]
        assert_scalar(loss, loss1, rel=1e-5)
        assert_scalar(ev, eval1, rel=1e-5)
        assert_close(logits, logits1, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            scale = float(np.abs(grads1[name]).max()) or 1.0
            assert_close(g, grads1[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_more_threads_than_work():
    # B*NH = 4 attention items, 3 rows, C = 48 columns: most of 12 threads own nothing somewhere.
    model = Model(CFG, seed=5, threads=12)
    model.work_parts = 12
    ref = Model(CFG, seed=5, threads=1)
    inputs, targets = data(B=1, T=3)
    assert_scalar(model.forward_backward(inputs, targets), ref.forward_backward(inputs, targets),
                  rel=1e-5)
    for name, g in model.grads.items():   # per tensor, as test_thread_counts_agree
        scale = float(np.abs(ref.grads[name]).max()) or 1.0
        assert_close(g, ref.grads[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_threads_setter_and_many_calls():
    # Many short steps on a pool that is resized: a barrier or hand-off bug would show up as a
    # hang, a crash or a differing result.
    model = Model(CFG, seed=6, threads=4)
    inputs, targets = data(B=2, T=8)
    first = model.forward_backward(inputs, targets)
    grads = model.grad_buffer.copy()
    for threads in (4, 2, 7, 4):
        model.threads = threads
        assert model.threads == threads
        for _ in range(25):
            loss = model.forward_backward(inputs, targets)
            assert_scalar(loss, first, rel=1e-5)
        if threads == 4:
            assert loss == first
            np.testing.assert_array_equal(model.grad_buffer, grads)
    with pytest.raises(ValueError):
        model.threads = 0
    assert model.threads == 4


def test_optimizer_through_the_model_is_thread_independent():
    inputs, targets = data()
    buffers = []
    for threads in (1, 3):
        model = Model(CFG, seed=8, threads=threads)
        for step in range(1, 4):
            model.forward_backward(inputs, targets)
            optim.update(model, lr=1e-3, step=step, norm=optim.grad_norm(model), max_norm=0.5)
        buffers.append(model.param_buffer.copy())
    # AdamW turns a gradient into about lr * sign(g) per step, so rounding-level gradient
    # differences on entries near zero move parameters by up to a fraction of lr: atol 1e-5 =
    # 1% of one step of lr 1e-3 (measured worst 9.3e-7 with the Haswell, Sandybridge and
    # Nehalem kernels: margin 10); a thread that skipped its part would be off by ~lr.
    assert_close(buffers[0], buffers[1], rtol=0, atol=1e-5)


def test_default_work_parts_follow_the_cpus():
    import os

    cpus = len(os.sched_getaffinity(0))
    model = Model(CFG, threads=12)
    assert model.work_parts == min(12, cpus)
    model.work_parts = 5
    assert model.work_parts == 5
    model.threads = 3  # a request above the new thread count is capped
    assert model.work_parts == 3
    model.work_parts = 0
    assert model.work_parts == min(3, cpus)
    with pytest.raises(ValueError):
        model.work_parts = 4


def test_concurrent_calls_on_one_model_are_refused_not_corrupting():
    # cffi releases the GIL: two Python threads calling one Model must not share its pool.
    import threading

    model = Model(CFG, seed=9, threads=2)
    inputs, targets = data(B=8)
    want = model.forward_backward(inputs, targets)
    outcomes = []

    def run():
        for _ in range(20):
            try:
                outcomes.append(model.forward_backward(inputs, targets))
            except RuntimeError as e:
                assert "another call" in str(e)
                outcomes.append("busy")

    workers = [threading.Thread(target=run) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(o == "busy" or o == want for o in outcomes)
    assert model.forward_backward(inputs, targets) == want


def test_changing_parts_on_one_pool():
    # Threads outside the active parts sleep through a step; switching the parts between calls
    # must neither lose a wake-up (hang) nor run a thread twice (wrong barrier counts).
    model = Model(CFG, seed=10, threads=12)
    inputs, targets = data(B=2, T=16)
    results = {}
    for parts in (1, 12, 3, 12, 2, 1, 7) * 2:
        model.work_parts = parts
        for _ in range(5):
            loss = model.forward_backward(inputs, targets)
            results.setdefault(parts, loss)
            assert loss == results[parts]  # bitwise: same parts, same result
    for loss in results.values():
        assert_scalar(loss, results[1], rel=1e-5)


@pytest.mark.slow
def test_models_release_their_threads():
    import gc
    import os

    def count():
        return len(os.listdir("/proc/self/task"))

    before = count()
    for _ in range(10):
        model = Model(CFG, threads=6)
        model.forward_backward(*data(B=1, T=4))
        assert count() >= before + 5
        del model
        gc.collect()
    assert count() == before


def test_timers_account_for_the_step():
    import time

    model = Model(CFG, threads=2)
    inputs, targets = data(B=24)
    model.forward_backward(inputs, targets)
    t0 = model.timers()
    start = time.perf_counter()
    for _ in range(3):
        model.forward_backward(inputs, targets)
    wall = time.perf_counter() - start
    t1 = model.timers()
    assert set(t1) == {"embedding", "layernorm", "matmul", "attention", "gelu", "output+loss",
                       "sync", "other"}
    spent = {k: t1[k] - t0[k] for k in t1}
    assert all(v >= 0 for v in spent.values())
    assert spent["matmul"] > 0 and spent["output+loss"] > 0 and spent["attention"] > 0
    # thread 0's intervals tile each call: their sum is the calls' time minus the Python-side
    # checks (a wide lower bound: a loaded machine may deschedule the Python part too)
    assert 0.3 * wall <= sum(spent.values()) <= wall
