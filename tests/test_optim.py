"""The optimizer (optim.update: clip + AdamW; optim.grad_norm) on a model's arenas against an
independent float64 NumPy reference, and its bitwise independence of threads, parts and
sharding.

Tolerances: AdamW runs in float32; each step rounds a parameter to float32 (half an ulp, 6e-8
relative) after moving it by about lr, so after 10 steps params agree with float64 to rtol 1e-6
(10 half-ulps) plus atol 1e-7 for the update's own rounding. The moments agree to rtol 1e-5,
plus an absolute term of a few float32 ulps of their inputs (m: gradients ~1e-2, terms ~1e-3,
atol 1e-9; v: terms ~1e-5, atol 1e-13), because m + (1 - b1) * (g - m) cancels when m is near
zero. The norm sums exact double squares in double: it agrees with a float64 reference to rtol
1e-12. Clipped gradients are float32 products: rtol 1e-6.
"""
import numpy as np
import pytest

from mpitrain import Model, ModelConfig, optim

pytestmark = pytest.mark.numerics

CFG = ModelConfig(vocab_size=101, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
SHAPES = [(40, 24), (24,), (24,), (7, 3, 5), (1,), (33, 17)]  # decay: 2-D and 3-D only


def ref_adamw(p, g, m, v, lr, step, beta1, beta2, eps, wd, decay_mask):
    """torch.optim.AdamW's update rule (its documentation's pseudo-code), in float64."""
    p = p * np.where(decay_mask, 1 - lr * wd, 1.0)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def make_model(seed, threads=1, parts=0):
    """A model with random parameters (zero optimizer state) and its random generator."""
    model = Model(CFG, threads=threads)
    model.work_parts = parts
    rng = np.random.default_rng(seed)
    model.param_buffer[...] = rng.normal(0, 1, model.num_params)
    return model, rng


def random_grads(rng, n):
    g = rng.normal(0, 1e-2, n).astype(np.float32)
    g[rng.random(n) < 0.05] = 0.0  # never-touched entries (e.g. unused embedding rows) stay put
    return g


def decay_mask(model):
    seg = model.decay_segments
    return np.repeat(seg.decay.astype(bool), np.diff(seg.bounds))


def state(model):
    return [model.param_buffer.copy()] + [a.copy() for a in model.optimizer_arenas]


def test_adamw_declares_two_moments_and_the_model_holds_them():
    assert optim.ADAMW.state == ("m", "v")
    model = Model(CFG)
    assert list(model.optimizer_buffers) == ["m", "v"]
    for arena in model.optimizer_arenas:
        assert arena.shape == model.param_buffer.shape and not np.shares_memory(
            arena, model.param_buffer)


def test_decay_segments_follow_dimensions():
    seg = optim.decay_segments(SHAPES)
    sizes = [int(np.prod(s)) for s in SHAPES]
    np.testing.assert_array_equal(seg.bounds, np.concatenate([[0], np.cumsum(sizes)]))
    np.testing.assert_array_equal(seg.decay, [1, 0, 0, 1, 0, 1])


def test_segments_slice_rebases_and_cuts():
    seg = optim.Segments([0, 5, 9, 20], [1, 0, 1])
    part = seg.slice(3, 12)
    np.testing.assert_array_equal(part.bounds, [0, 2, 6, 9])
    np.testing.assert_array_equal(part.decay, [1, 0, 1])
    empty = seg.slice(7, 7)
    assert empty.size == 0


@pytest.mark.parametrize("parts", [1, 3])
def test_adamw_ten_steps_match_reference(parts):
    model, rng = make_model(1, threads=3, parts=parts)
    n, mask = model.num_params, decay_mask(model)
    m, v = model.optimizer_arenas
    rp, rm, rv = model.param_buffer.astype(np.float64), np.zeros(n), np.zeros(n)
    for step in range(1, 11):
        g = random_grads(rng, n)
        model.grad_buffer[...] = g
        lr = 1e-3 * step / 10  # a warmup-like schedule: the step's lr changes every call
        optim.update(model, lr=lr, step=step, norm=0.0, weight_decay=0.1)
        rp, rm, rv = ref_adamw(rp, g.astype(np.float64), rm, rv, lr, step, 0.9, 0.999, 1e-8,
                               0.1, mask)
        np.testing.assert_allclose(model.param_buffer, rp, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m, rm, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(v, rv, rtol=1e-5, atol=1e-13)
        np.testing.assert_array_equal(model.grad_buffer, g)  # no clipping asked: untouched


def test_adamw_decay_only_where_flagged():
    # Zero gradients: the only change is the decoupled decay p *= 1 - lr * wd on 2-D tensors.
    model, _ = make_model(2)
    before = model.param_buffer.copy()
    mask = decay_mask(model)
    assert mask.any() and not mask.all()
    optim.update(model, lr=0.5, step=1, norm=0.0, weight_decay=0.2)
    np.testing.assert_allclose(model.param_buffer[mask], before[mask] * 0.9, rtol=1e-7)
    np.testing.assert_array_equal(model.param_buffer[~mask], before[~mask])


def test_adamw_resumed_step_uses_given_bias_correction():
    # A run resumed at step 5 must update exactly as the uninterrupted run's fifth step.
    model, rng = make_model(3)
    grads = [random_grads(rng, model.num_params) for _ in range(5)]
    other, _ = make_model(3)
    for s, g in enumerate(grads, 1):
        model.grad_buffer[...] = g
        optim.update(model, lr=1e-3, step=s, norm=0.0)
    for s, g in enumerate(grads[:4], 1):
        other.grad_buffer[...] = g
        optim.update(other, lr=1e-3, step=s, norm=0.0)
    resumed, _ = make_model(0)  # as if reloaded from a checkpoint
    for a, b in zip([resumed.param_buffer] + resumed.optimizer_arenas, state(other)):
        a[...] = b
    resumed.grad_buffer[...] = grads[4]
    optim.update(resumed, lr=1e-3, step=5, norm=0.0)
    for a, b in zip(state(resumed), state(model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 8191, 8192, 8193, 100_003])
def test_grad_norm_matches_float64(n):
    model = Model(CFG, threads=2)
    rng = np.random.default_rng(n)
    g = rng.normal(0, 3, n).astype(np.float32)
    expected = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    assert optim.grad_norm(model, g) == pytest.approx(expected, rel=1e-12, abs=0)


def _three_steps(threads, parts, shards=1):
    """Clip (step 1) + AdamW for three steps, the arena updated in `shards` ranges as the MPI
    workers update their slices."""
    model, rng = make_model(4, threads=threads, parts=parts)
    n = model.num_params
    model.grad_buffer[...] = rng.normal(0, 1, n)
    norm = optim.grad_norm(model)
    cuts = [n * k // shards for k in range(shards + 1)]
    for step in (1, 2, 3):
        for lo, hi in zip(cuts, cuts[1:]):
            shard = model.grad_buffer[lo:hi].copy() if shards > 1 else None
            optim.update(model, lr=1e-2, step=step, norm=norm, max_norm=1.0 if step == 1 else 0,
                         lo=lo, hi=hi, grads=shard)
            if shard is not None:
                model.grad_buffer[lo:hi] = shard
    return (norm, *state(model), model.grad_buffer.copy())


def test_results_bitwise_independent_of_threads_parts_and_shards():
    want = _three_steps(1, 1)
    assert want[0] > 1.0  # the first step clipped
    for threads, parts, shards in ((2, 2, 1), (3, 3, 1), (12, 12, 1), (12, 0, 1), (2, 2, 3),
                                   (1, 1, 11)):
        got = _three_steps(threads, parts, shards)
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(a, b)


def test_clip_scales_only_above_max_norm():
    model, rng = make_model(5, threads=2)
    g = rng.normal(0, 1, model.num_params).astype(np.float32)
    model.grad_buffer[...] = g
    norm = optim.grad_norm(model)
    expected = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    assert norm == pytest.approx(expected, rel=1e-12)
    optim.update(model, lr=0.0, step=1, norm=norm, max_norm=1.0)
    np.testing.assert_allclose(model.grad_buffer, g * (1.0 / (expected + 1e-6)), rtol=1e-6)
    assert optim.grad_norm(model) == pytest.approx(1.0, rel=1e-5)
    # Now below the limit, and with clipping off: unchanged, bit for bit.
    small = model.grad_buffer.copy()
    for max_norm in (10.0, 0.0, -1.0):
        optim.update(model, lr=0.0, step=2, norm=optim.grad_norm(model), max_norm=max_norm)
        np.testing.assert_array_equal(model.grad_buffer, small)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_leaves_non_finite_gradients_alone(bad):
    model = Model(CFG)
    g = np.array([1.0, bad, 2.0], np.float32)
    norm = optim.grad_norm(model, g)
    assert not np.isfinite(norm)
    optim.update(model, lr=0.0, step=1, norm=norm, max_norm=1.0, lo=0, hi=3, grads=g)
    np.testing.assert_array_equal(g[[0, 2]], [1.0, 2.0])


def test_update_refuses_wrong_buffers_and_arguments():
    model = Model(CFG)
    n = model.num_params
    ok = dict(lr=1e-3, step=1, norm=0.0)
    with pytest.raises(ValueError):
        optim.update(model, **ok, grads=np.zeros(n, np.float64))
    with pytest.raises(ValueError):
        optim.update(model, **ok, grads=np.zeros(8, np.float32))
    with pytest.raises(ValueError):
        optim.update(model, **ok, lo=10, hi=5)
    with pytest.raises(ValueError):
        optim.update(model, **ok, hi=n + 1)
    with pytest.raises(ValueError):
        optim.update(model, **ok, lo=0, hi=4, grads=np.zeros(4, np.float32)[::-1])
    with pytest.raises(ValueError):
        optim.update(model, lr=1e-3, step=0, norm=0.0)
    with pytest.raises(ValueError):
        optim.update(model, lr=1e-3, step=1.5, norm=0.0)
    for bad in (dict(beta1=1.0), dict(beta2=-0.1), dict(lr=-1.0), dict(eps=-1.0),
                dict(weight_decay=-0.1), dict(lr=np.nan)):
        with pytest.raises(ValueError, match="refused"):
            optim.update(model, **{**ok, **bad})
    with pytest.raises(ValueError):
        optim.grad_norm(model, np.zeros(32, np.float32)[::2])
    with pytest.raises(ValueError):
        optim.Segments([0, 5, 3], [1, 0])
