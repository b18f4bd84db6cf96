"""LayerNorm in the C kernel against an independent NumPy (float64) reference.

Tolerances: LayerNorm is our own C code (no BLAS, built without -march, so the same rounding on
every x86-64 CPU). Forward over C<=512 agrees with float64 to ~1e-6 relative (measured worst:
1/9 of atol/rtol 1e-5, and of rtol 1e-4 on rstd). Backward: db is a plain float32 sum over the
N rows, held to its bound gamma_N sum |dout|; dx and dw combine several rounded row sums:
atol/rtol 1e-4 (measured worst 1/66 of it).
"""
import numpy as np
import pytest

from mpitrain import ops
from tolerances import assert_close, assert_within, sum_bound

pytestmark = pytest.mark.numerics


def ref_layernorm(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    return xhat * w + b, mean[:, 0], 1 / np.sqrt(var[:, 0] + eps)


def ref_layernorm_backward(dout, x, w, eps=1e-5):
    x = x.astype(np.float64)
    dout = dout.astype(np.float64)
    C = x.shape[1]
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    dxhat = dout * w
    dx = rstd / C * (C * dxhat - dxhat.sum(-1, keepdims=True) - xhat * (dxhat * xhat).sum(-1, keepdims=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


@pytest.mark.parametrize("N,C", [(1, 1), (3, 7), (64, 384), (5, 512)])
def test_layernorm_forward_matches_numpy(N, C):
    rng = np.random.default_rng(N * 1000 + C)
    x = rng.normal(0, 2, (N, C)).astype(np.float32) + 3
    w = rng.normal(1, 0.1, C).astype(np.float32)
    b = rng.normal(0, 0.1, C).astype(np.float32)
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    r_out, r_mean, r_rstd = ref_layernorm(x, w, b)
    assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    assert_close(mean, r_mean, rtol=1e-5, atol=1e-5)
    assert_close(rstd, r_rstd, rtol=1e-4)


@pytest.mark.parametrize("N,C", [(1, 2), (4, 9), (32, 384)])
def test_layernorm_backward_matches_numpy(N, C):
    rng = np.random.default_rng(7 + N + C)
    x = rng.normal(0, 1, (N, C)).astype(np.float32)
    w = rng.normal(1, 0.1, C).astype(np.float32)
    b = np.zeros(C, np.float32)
    dout = rng.normal(0, 1, (N, C)).astype(np.float32)
    _, mean, rstd = ops.layernorm_forward(x, w, b)
    dx, dw, db = ops.layernorm_backward(dout, x, w, mean, rstd)
    r_dx, r_dw, r_db = ref_layernorm_backward(dout, x, w)
    assert_close(dx, r_dx, rtol=1e-4, atol=1e-4)
    assert_close(dw, r_dw, rtol=1e-4, atol=1e-4)
    assert_within(db, r_db, sum_bound(dout, axis=0), "db")


def test_wrapper_refuses_wrong_buffers():
    x = np.zeros((4, 8), np.float64)
    w = np.ones(8, np.float32)
    with pytest.raises(TypeError):
        ops.layernorm_forward(x, w, w)
    with pytest.raises(ValueError):
        ops.layernorm_forward(np.zeros((4, 16), np.float32)[:, ::2], w, w)
