"""Checked Python wrappers around single kernel operations, for tests.

The training step calls C once per micro-batch; these wrappers exist so each operation can be
tested on its own against a NumPy reference. They call the test-only module
mpitrain._kernel_testing (kernels/mt_testing.h), not the package's kernel API. Every wrapper
checks dtype, shape and contiguity before a pointer reaches C.
"""
import numpy as np

from mpitrain._native import check, testing_kernel as kernel


def as_ptr(array, ctype="float *"):
    """A C pointer (of the testing module) into a NumPy array's memory, no copy."""
    ffi, _ = kernel()
    return ffi.cast(ctype, ffi.from_buffer(array, require_writable=False))


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


def _ids(a, name, shape):
    check_array(a, name, shape, dtype=np.int32)
    return a


def encoder_forward(inp, wte, wpe):
    """inp (B,T) int32 ids, wte (V,C), wpe (maxT,C) -> out (B,T,C)."""
    B, T = inp.shape
    V, C = wte.shape
    _ids(inp, "inp", (B, T))
    check_array(wte, "wte", (V, C))
    check_array(wpe, "wpe")
    if wpe.ndim != 2 or wpe.shape[1] != C or wpe.shape[0] < T:
        raise ValueError(f"wpe: expected shape (>= {T}, {C}), got {wpe.shape}")
    if inp.min() < 0 or inp.max() >= V:
        raise ValueError(f"inp: ids must lie in [0, {V})")
    out = np.empty((B, T, C), np.float32)
    _, lib = kernel()
    lib.encoder_forward(as_ptr(out), as_ptr(inp, "int32_t *"), as_ptr(wte), as_ptr(wpe), B, T, C)
    return out


def encoder_backward(dout, inp, V, maxT):
    """Gradients (dwte (V,C), dwpe (maxT,C)) of the embedding given dout (B,T,C)."""
    B, T, C = dout.shape
    check_array(dout, "dout", (B, T, C))
    _ids(inp, "inp", (B, T))
    if inp.min() < 0 or inp.max() >= V or T > maxT:
        raise ValueError("inp: ids out of range or sequence longer than maxT")
    dwte = np.zeros((V, C), np.float32)
    dwpe = np.zeros((maxT, C), np.float32)
    _, lib = kernel()
    lib.encoder_backward(as_ptr(dwte), as_ptr(dwpe), as_ptr(dout), as_ptr(inp, "int32_t *"),
                         B, T, C)
    return dwte, dwpe


def matmul_forward(x, w, bias=None, add=None):
    """x (N,IC) @ w (OC,IC)^T + bias (OC) + add (N,OC) -> (N,OC)."""
    N, IC = x.shape
    OC = w.shape[0]
    check_array(x, "x", (N, IC))
    check_array(w, "w", (OC, IC))
    if bias is not None:
        check_array(bias, "bias", (OC,))
    if add is not None:
        check_array(add, "add", (N, OC))
    out = np.empty((N, OC), np.float32)
    ffi, lib = kernel()
    lib.matmul_forward(as_ptr(out), as_ptr(x), as_ptr(w),
                       ffi.NULL if bias is None else as_ptr(bias),
                       ffi.NULL if add is None else as_ptr(add), N, IC, OC)
    return out


def matmul_backward(dout, x, w):
    """Gradients (dx (N,IC), dw (OC,IC), dbias (OC)) of x @ w^T + bias given dout (N,OC)."""
    N, IC = x.shape
    OC = w.shape[0]
    check_array(dout, "dout", (N, OC))
    check_array(x, "x", (N, IC))
    check_array(w, "w", (OC, IC))
    dx = np.zeros((N, IC), np.float32)
    dw = np.zeros((OC, IC), np.float32)
    db = np.zeros(OC, np.float32)
    _, lib = kernel()
    lib.matmul_backward(as_ptr(dx), as_ptr(dw), as_ptr(db), as_ptr(dout), as_ptr(x), as_ptr(w),
                        N, IC, OC)
    return dx, dw, db


def _elementwise(fn_name, x):
    check_array(x, "x")
    out = np.empty_like(x)
    _, lib = kernel()
    getattr(lib, fn_name)(as_ptr(out), as_ptr(x), x.size)
    return out


def gelu_forward(x):
    """GELU (tanh form) of a float32 array of any shape."""
    return _elementwise("gelu_forward", x)


def gelu_backward(x, dout):
    """d/dx of sum(gelu(x) * dout)."""
    check_array(x, "x")
    check_array(dout, "dout", x.shape)
    dx = np.zeros_like(x)
    _, lib = kernel()
    lib.gelu_backward(as_ptr(dx), as_ptr(x), as_ptr(dout), x.size)
    return dx


def vec_expf(x):
    """The kernel's own vectorised exp."""
    return _elementwise("vec_expf", x)


def vec_tanhf(x):
    """The kernel's own vectorised tanh."""
    return _elementwise("vec_tanhf", x)


def attention_forward(qkv, n_heads):
    """qkv (B,T,3C) -> (out (B,T,C), lse (B,NH,T)): causal multi-head attention."""
    B, T, C3 = qkv.shape
    check_array(qkv, "qkv", (B, T, C3))
    C = C3 // 3
    if C3 % 3 or C % n_heads:
        raise ValueError(f"qkv: last axis {C3} is not 3*C with C divisible by {n_heads}")
    out = np.empty((B, T, C), np.float32)
    lse = np.empty((B, n_heads, T), np.float32)
    _, lib = kernel()
    check(lib.attention_forward(as_ptr(out), as_ptr(lse), as_ptr(qkv), B, T, C, n_heads),
          "attention_forward")
    return out, lse


def attention_backward(dout, qkv, lse, n_heads):
    """dqkv (B,T,3C) of attention given dout (B,T,C) and the forward's lse."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    check_array(qkv, "qkv", (B, T, C3))
    check_array(dout, "dout", (B, T, C))
    check_array(lse, "lse", (B, n_heads, T))
    dqkv = np.zeros_like(qkv)
    _, lib = kernel()
    check(lib.attention_backward(as_ptr(dqkv), as_ptr(dout), as_ptr(qkv), as_ptr(lse),
                                 B, T, C, n_heads), "attention_backward")
    return dqkv


def softmax_xent(logits, targets, grad_scale=1.0, want_grad=True):
    """Per-row losses (R,) and, with want_grad, dlogits (R,V) = (softmax - onehot) * grad_scale
    (computed in place on a copy of logits)."""
    R, V = logits.shape
    check_array(logits, "logits", (R, V))
    _ids(targets, "targets", (R,))
    if targets.min() < 0 or targets.max() >= V:
        raise ValueError(f"targets: ids must lie in [0, {V})")
    work = logits.copy()
    losses = np.empty(R, np.float32)
    _, lib = kernel()
    lib.softmax_xent_rows(as_ptr(work), as_ptr(losses), as_ptr(targets, "int32_t *"), R, V,
                          grad_scale, 1 if want_grad else 0)
    return (losses, work) if want_grad else losses
