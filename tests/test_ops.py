"""Every kernel operation (forward and backward) against an independent NumPy reference.

References are float64 NumPy (tests/reference_gpt.py and the formulas below); inputs are seeded.
Tolerances are per operation and say why: linear layers and sums are held to float32 error
bounds computed from their operands (tests/tolerances.py), which hold for any BLAS kernel. The
element-wise functions and softmax are our own C code (no BLAS, no -march: the same rounding on
every x86-64 CPU); their tolerances are ulp bounds or measured worst cases (softmax and
cross-entropy: 1/9 of the tolerance). Attention uses BLAS: worst 1/28 of its tolerance measured
with OpenBLAS's Haswell, Sandybridge and Nehalem kernels.
"""
import zlib

import numpy as np
import pytest

import reference_gpt as ref
from mpitrain import ops
from tolerances import assert_close, assert_within, gamma, matmul_bound, sum_bound

pytestmark = pytest.mark.numerics


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))  # stable across runs


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


# ---- exp / tanh: the kernel's own vectorisable versions ---------------------------------------

def test_expf_relative_error_within_4_ulp():
    # Cephes-polynomial exp: ~2 ulp; 4 ulp of float32 is 4.8e-7 relative.
    x = f32(np.concatenate([np.linspace(-87.0, 88.0, 200001), rng_for("exp").normal(0, 5, 10000)]))
    got = ops.vec_expf(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert_close(got, want, rtol=4.8e-7, atol=0)


def test_expf_outside_the_normal_range():
    # below -87.3 the result would leave the normal float range: exactly 0 (no denormals);
    # above 88 it saturates at exp(88) instead of overflowing; NaN propagates.
    got = ops.vec_expf(f32([-1000.0, -np.inf, -87.4, 1000.0, np.nan]))
    assert got[0] == 0 and got[1] == 0 and got[2] == 0
    assert np.isfinite(got[3]) and got[3] > 1e38
    assert np.isnan(got[4])


def test_tanhf_absolute_error():
    # (e^2x - 1)/(e^2x + 1) loses relative precision near 0 but keeps absolute error < 3e-7,
    # which is what GELU needs (it adds tanh to 1).
    x = f32(np.concatenate([np.linspace(-20, 20, 400001), rng_for("tanh").normal(0, 1, 10000)]))
    got = ops.vec_tanhf(x).astype(np.float64)
    assert_close(got, np.tanh(x.astype(np.float64)), rtol=0, atol=3e-7)
    assert np.all(np.abs(got) <= 1.0)


# ---- embedding ---------------------------------------------------------------------------------

def test_encoder_forward_backward():
    rng = rng_for("enc")
    B, T, V, C, maxT = 3, 7, 11, 16, 9
    inp = rng.integers(0, V, (B, T)).astype(np.int32)
    inp[0, :3] = 5  # repeated ids must accumulate
    wte, wpe = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(maxT, C)))
    out = ops.encoder_forward(inp, wte, wpe)
    # one float32 addition per element: exact
    np.testing.assert_array_equal(out, wte[inp] + wpe[:T])
    dout = f32(rng.normal(size=(B, T, C)))
    dwte, dwpe = ops.encoder_backward(dout, inp, V, maxT)
    r_dwte = np.zeros((V, C))
    np.add.at(r_dwte, inp.reshape(-1), dout.reshape(-1, C).astype(np.float64))
    r_dwpe = np.zeros((maxT, C))
    r_dwpe[:T] = dout.astype(np.float64).sum(0)
    # sums of float32 terms in some order: |error| <= gamma_n sum |terms| (n = the count)
    abs_dwte = np.zeros((V, C))
    np.add.at(abs_dwte, inp.reshape(-1), np.abs(dout.reshape(-1, C).astype(np.float64)))
    assert_within(dwte, r_dwte, gamma(B * T) * abs_dwte, "dwte")
    r_abs_dwpe = np.zeros((maxT, C))
    r_abs_dwpe[:T] = np.abs(dout.astype(np.float64)).sum(0)
    assert_within(dwpe, r_dwpe, gamma(B) * r_abs_dwpe, "dwpe")


# ---- linear -------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,IC,OC", [(1, 1, 1), (5, 7, 3), (64, 96, 160), (130, 384, 48)])
def test_matmul_forward_backward(N, IC, OC):
    rng = rng_for("mm", N, IC, OC)
    x, w = f32(rng.normal(size=(N, IC))), f32(rng.normal(size=(OC, IC)) / np.sqrt(IC))
    b, add = f32(rng.normal(size=OC)), f32(rng.normal(size=(N, OC)))
    xd, wd = x.astype(np.float64), w.astype(np.float64)
    # each output is a float32 sum of K products (plus the bias and the addend): the bound
    # gamma_K sum |terms|, whatever order or blocking the BLAS kernel uses
    assert_within(ops.matmul_forward(x, w), xd @ wd.T, matmul_bound(x, w.T), "x w^T")
    assert_within(ops.matmul_forward(x, w, b, add), xd @ wd.T + b + add,
                  matmul_bound(x, w.T, b, add), "x w^T + b + add")
    dout = f32(rng.normal(size=(N, OC)))
    dx, dw, db = ops.matmul_backward(dout, x, w)
    dd = dout.astype(np.float64)
    assert_within(dx, dd @ wd, matmul_bound(dout, w), "dx")
    assert_within(dw, dd.T @ xd, matmul_bound(dout.T, x), "dw")
    assert_within(db, dd.sum(0), sum_bound(dout, axis=0), "db")


# ---- GELU ---------------------------------------------------------------------------------------

def test_gelu_forward_backward():
    rng = rng_for("gelu")
    x = f32(np.concatenate([np.linspace(-10, 10, 20001), rng.normal(0, 2, 5000)]))
    xd = x.astype(np.float64)
    # |error| <= 0.5 |x| * 3e-7 (tanh) + rounding: 2e-6 absolute up to |x| = 10.
    assert_close(ops.gelu_forward(x), ref.gelu(xd), rtol=1e-6, atol=2e-6)
    dout = f32(rng.normal(size=x.shape))
    assert_close(ops.gelu_backward(x, dout), ref.gelu_backward(xd, dout),
                 rtol=1e-5, atol=1e-5)


def test_gelu_backward_matches_finite_differences_of_the_kernel():
    x = f32(np.linspace(-4, 4, 801))
    h = 1e-2  # central differences of a smooth function in float32: error ~ 1e-4
    fd = (ops.gelu_forward(f32(x + h)).astype(np.float64)
          - ops.gelu_forward(f32(x - h))) / (2 * h)
    assert_close(ops.gelu_backward(x, np.ones_like(x)), fd, atol=2e-4)


# ---- attention ----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 4, 1), (2, 5, 8, 2), (2, 33, 48, 3), (1, 128, 64, 2)])
def test_attention_forward_backward(B, T, C, NH):
    rng = rng_for("att", B, T, C, NH)
    qkv = f32(rng.normal(0, 1, (B, T, 3 * C)))
    out, lse = ops.attention_forward(qkv, NH)
    r_out, (q, k, v, p, scale, rope) = ref.attention(qkv.astype(np.float64), NH)
    # softmax rows of <= T terms and a T-term weighted sum, all float32: 1e-5 absolute.
    assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    r_lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    assert_close(lse, r_lse, rtol=1e-5, atol=1e-5)
    dout = f32(rng.normal(0, 1, (B, T, C)))
    dqkv = ops.attention_backward(dout, qkv, lse, NH)
    r_dqkv = ref.attention_backward(dout.astype(np.float64), (q, k, v, p, scale, rope))
    assert_close(dqkv, r_dqkv, rtol=1e-4, atol=2e-5)


def test_attention_is_causal():
    rng = rng_for("causal")
    qkv = f32(rng.normal(size=(1, 10, 24)))
    out, _ = ops.attention_forward(qkv, 2)
    qkv2 = qkv.copy()
    qkv2[0, 6:] += 5.0  # changing the future must not change earlier positions
    out2, _ = ops.attention_forward(qkv2, 2)
    np.testing.assert_array_equal(out[0, :6], out2[0, :6])
    assert not np.allclose(out[0, 6:], out2[0, 6:])


# ---- fused softmax + cross-entropy --------------------------------------------------------------

@pytest.mark.parametrize("R,V", [(1, 2), (7, 13), (5, 30000)])
def test_softmax_xent(R, V):
    rng = rng_for("xent", R, V)
    logits = f32(rng.normal(0, 3, (R, V)))
    targets = rng.integers(0, V, R).astype(np.int32)
    scale = 0.37
    losses, dlogits = ops.softmax_xent(logits, targets, scale)
    ld = logits.astype(np.float64)
    assert_close(losses, ref.token_losses(ld, targets), rtol=1e-6, atol=1e-5)
    p = np.exp(ld - ld.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(R), targets] -= 1
    # probabilities are <= 1; float32 exp/sum error ~1e-6 relative
    assert_close(dlogits, p * scale, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ops.softmax_xent(logits, targets, want_grad=False), losses)


def test_softmax_xent_extreme_logits_stay_finite():
    logits = f32([[1e4, -1e4, 0.0], [-50.0, 50.0, 50.0]])
    losses, d = ops.softmax_xent(logits, np.array([1, 0], np.int32))
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(d))
    assert_close(losses, [2e4, 100 + np.log(2)], rtol=1e-6)


def test_wrappers_refuse_wrong_buffers():
    with pytest.raises(TypeError):
        ops.gelu_forward(np.zeros(4))  # float64
    with pytest.raises(ValueError):
        ops.matmul_forward(np.zeros((4, 8), np.float32)[:, ::2], np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError):
        ops.softmax_xent(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError):
        ops.softmax_xent(np.zeros((2, 3), np.float32), np.array([0, 3], np.int32))
