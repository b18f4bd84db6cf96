"""Checked Python wrappers around single kernel operations.

The training step calls C once per micro-batch; these wrappers exist so each operation can be
tested on its own against a NumPy reference. Every wrapper checks dtype, shape and contiguity
before a pointer reaches C.
"""
import numpy as np

from mpitrain._native import as_ptr, kernel


def check_array(a, name, shape=None, dtype=np.float32):
    """Refuse anything C must not see: wrong dtype, shape, or a non-contiguous buffer."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    return a


def layernorm_forward(x, weight, bias, eps=1e-5):
    """x (N,C) -> (out (N,C), mean (N), rstd (N))."""
    N, C = x.shape
    check_array(x, "x", (N, C))
    check_array(weight, "weight", (C,))
    check_array(bias, "bias", (C,))
    out = np.empty_like(x)
    mean = np.empty(N, np.float32)
    rstd = np.empty(N, np.float32)
    _, lib = kernel()
    lib.layernorm_forward(as_ptr(out), as_ptr(mean), as_ptr(rstd), as_ptr(x),
                          as_ptr(weight), as_ptr(bias), N, C, eps)
    return out, mean, rstd


def layernorm_backward(dout, x, weight, mean, rstd):
    """Gradients (dx, dweight, dbias) of LayerNorm given the upstream gradient dout (N,C)."""
    N, C = x.shape
    for a, name, shape in ((dout, "dout", (N, C)), (x, "x", (N, C)), (weight, "weight", (C,)),
                           (mean, "mean", (N,)), (rstd, "rstd", (N,))):
        check_array(a, name, shape)
    dx = np.zeros_like(x)
    dw = np.zeros(C, np.float32)
    db = np.zeros(C, np.float32)
    _, lib = kernel()
    lib.layernorm_backward(as_ptr(dx), as_ptr(dw), as_ptr(db), as_ptr(dout), as_ptr(x),
                           as_ptr(weight), as_ptr(mean), as_ptr(rstd), N, C)
    return dx, dw, db
