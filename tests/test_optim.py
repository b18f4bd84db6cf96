"""The kernel's AdamW, gradient norm and clipping against an independent float64 NumPy reference.

Tolerances: AdamW runs in float32; each step rounds a parameter to float32 (half an ulp, 6e-8
relative) after moving it by about lr, so after 10 steps params agree with float64 to rtol 1e-6
(10 half-ulps) plus atol 1e-7 for the update's own rounding. The moments agree to rtol 1e-5, plus an absolute term of a few float32 ulps of their
inputs (m: gradients ~1e-2, terms ~1e-3, atol 1e-9; v: terms ~1e-5, atol 1e-13), because
m + (1 - b1) * (g - m) cancels when m is near zero. The norm sums exact double squares in double: it agrees with
a float64 reference to rtol 1e-12. Clipped gradients are float32 products: rtol 1e-6.
"""
import numpy as np
import pytest

from mpitrain import optim
from tolerances import assert_close, assert_scalar, gamma

pytestmark = pytest.mark.numerics

SHAPES = [(40, 24), (24,), (24,), (7, 3, 5), (1,), (33, 17)]  # decay: 2-D and 3-D only


def ref_adamw(p, g, m, v, lr, step, beta1, beta2, eps, wd, decay_mask):
    """torch.optim.AdamW's update rule (its documentation's pseudo-code), in float64."""
    p = p * np.where(decay_mask, 1 - lr * wd, 1.0)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def make_state(seed, n):
    rng = np.random.default_rng(seed)
    p = rng.normal(0, 1, n).astype(np.float32)
    return p, np.zeros(n, np.float32), np.zeros(n, np.float32), rng


def random_grads(rng, n):
    g = rng.normal(0, 1e-2, n).astype(np.float32)
    g[rng.random(n) < 0.05] = 0.0  # never-touched entries (e.g. unused embedding rows) stay put
    return g


def test_decay_segments_follow_dimensions():
    seg = optim.decay_segments(SHAPES)
    sizes = [int(np.prod(s)) for s in SHAPES]
    np.testing.assert_array_equal(seg.bounds, np.concatenate([[0], np.cumsum(sizes)]))
    np.testing.assert_array_equal(seg.decay, [1, 0, 0, 1, 0, 1])


@pytest.mark.parametrize("threads", [1, 3])
def test_adamw_ten_steps_match_reference(threads):
    seg = optim.decay_segments(SHAPES)
    n = seg.size
    mask = np.repeat(seg.decay.astype(bool), np.diff(seg.bounds))
    p, m, v, rng = make_state(1, n)
    rp, rm, rv = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for step in range(1, 11):
        g = random_grads(rng, n)
        lr = 1e-3 * step / 10  # a warmup-like schedule: the step's lr changes every call
        optim.adamw_step(p, g, m, v, lr=lr, step=step, weight_decay=0.1, segments=seg,
                         threads=threads)
        rp, rm, rv = ref_adamw(rp, g.astype(np.float64), rm, rv, lr, step, 0.9, 0.999, 1e-8,
                               0.1, mask)
        assert_close(p, rp, rtol=1e-6, atol=1e-7)
        assert_close(m, rm, rtol=1e-5, atol=1e-9)
        assert_close(v, rv, rtol=1e-5, atol=1e-13)


def test_adamw_decay_only_where_flagged():
    # Zero gradients: the only change is the decoupled decay p *= 1 - lr * wd on decayed ranges.
    seg = optim.Segments([0, 5, 9], [1, 0])
    p = np.arange(1, 10, dtype=np.float32)
    zeros = np.zeros(9, np.float32)
    optim.adamw_step(p, zeros, zeros.copy(), zeros.copy(), lr=0.5, step=1, weight_decay=0.2,
                     segments=seg)
    # two float32 roundings (the factor 1 - lr * wd, then the product): gamma_2 relative
    assert_close(p[:5], np.arange(1, 6) * 0.9, rtol=gamma(2))
    np.testing.assert_array_equal(p[5:], np.arange(6, 10, dtype=np.float32))


def test_adamw_resumed_step_uses_given_bias_correction():
    # A run resumed at step 5 must update exactly as the uninterrupted run's fifth step.
    n = 1000
    p, m, v, rng = make_state(2, n)
    grads = [random_grads(rng, n) for _ in range(5)]
    for s, g in enumerate(grads, 1):
        optim.adamw_step(p, g, m, v, lr=1e-3, step=s)
    q, m2, v2, _ = make_state(2, n)
    for s, g in enumerate(grads[:4], 1):
        optim.adamw_step(q, g, m2, v2, lr=1e-3, step=s)
    q, m2, v2 = q.copy(), m2.copy(), v2.copy()  # as if reloaded from a checkpoint
    optim.adamw_step(q, grads[4], m2, v2, lr=1e-3, step=5)
    np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 8191, 8192, 8193, 100_003])
def test_grad_norm_matches_float64(n):
    rng = np.random.default_rng(n)
    g = rng.normal(0, 3, n).astype(np.float32)
    expected = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    assert_scalar(optim.grad_norm(g), expected, rel=1e-12, abs_=0)


def test_results_bitwise_independent_of_threads():
    seg = optim.decay_segments([(300, 301), (301,), (1000, 50), (7,)])
    n = seg.size
    outs = []
    for threads in (1, 2, 3, 12):
        p, m, v, rng = make_state(3, n)
        g = rng.normal(0, 1, n).astype(np.float32)
        norm = optim.clip_grad_norm(g, 1.0, threads=threads)
        for step in (1, 2, 3):
            optim.adamw_step(p, g, m, v, lr=1e-2, step=step, segments=seg, threads=threads)
        outs.append((norm, optim.grad_norm(g, threads=threads), p, m, v, g))
    for other in outs[1:]:
        assert other[0] == outs[0][0] and other[1] == outs[0][1]
        for a, b in zip(other[2:], outs[0][2:]):
            np.testing.assert_array_equal(a, b)


def test_clip_scales_only_above_max_norm():
    rng = np.random.default_rng(4)
    g = rng.normal(0, 1, 20_000).astype(np.float32)
    before = g.copy()
    norm = optim.clip_grad_norm(g, 1.0, threads=2)
    expected = np.sqrt(np.sum(before.astype(np.float64) ** 2))
    assert_scalar(norm, expected, rel=1e-12)
    assert_close(g, before * (1.0 / (expected + 1e-6)), rtol=1e-6)
    assert_scalar(optim.grad_norm(g), 1.0, rel=1e-5)
    # Now below the limit: unchanged, bit for bit.
    small = g.copy()
    assert_scalar(optim.clip_grad_norm(g, 10.0), 1.0, rel=1e-5)
    np.testing.assert_array_equal(g, small)


def test_clip_leaves_non_finite_gradients_alone():
    g = np.array([1.0, np.nan, 2.0], np.float32)
    assert np.isnan(optim.clip_grad_norm(g, 1.0))
    np.testing.assert_array_equal(g[[0, 2]], [1.0, 2.0])


def test_wrappers_refuse_wrong_buffers_and_arguments():
    n = 16
    p, m, v, _ = make_state(5, n)
    g = np.zeros(n, np.float32)
    ok = dict(lr=1e-3, step=1)
    with pytest.raises(TypeError):
        optim.adamw_step(p.astype(np.float64), g, m, v, **ok)
    with pytest.raises(ValueError):
        optim.adamw_step(p, g[:8], m, v, **ok)
    with pytest.raises(ValueError):
        optim.adamw_step(p.reshape(4, 4), g, m, v, **ok)
    with pytest.raises(ValueError):
        optim.adamw_step(p, g, m, v, lr=1e-3, step=0)
    with pytest.raises(ValueError):
        optim.adamw_step(p, g, m, v, lr=1e-3, step=1, beta1=1.0)
    with pytest.raises(ValueError):
        optim.adamw_step(p, g, m, v, **ok, segments=optim.Segments([0, 8], [1]))
    with pytest.raises(ValueError):
        optim.adamw_step(p, g, m, v, **ok, threads=0)
    with pytest.raises(ValueError):
        optim.grad_norm(np.zeros(32, np.float32)[::2])
    with pytest.raises(ValueError):
        optim.clip_grad_norm(g, 0.0)
    with pytest.raises(ValueError):
        optim.Segments([0, 5, 3], [1, 0])
