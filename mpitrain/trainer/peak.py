"""FLOPs of a training step and the SGEMM peak they are compared against: Node Zero's final
statistics ("fraction of the measured SGEMM peak") and scripts/bench_kernel.py both use these.

FLOPs per training token: 6 x the weights used in matrix products + attention's QK^T and AV
over the full T x T square, x3 with backward. The peak is the best of a few size^3 SGEMMs
through scipy-openblas32 (the library the kernel calls); Node Zero times it after training
while the workers sleep, on one OpenBLAS thread per CPU.
"""
import ctypes
import functools
import os
import time

import numpy as np


def flops_per_token(cfg, seq_len: int) -> int:
    """Training FLOPs per token: 6 x (weights used in matrix products: the blocks' four linear
    layers and lm_head; embeddings are lookups) + attention's QK^T and AV, 4*T*d forward per
    layer counted over the full T x T square as PyTorch's SDPA computes it, x3 with backward."""
    d, f = cfg.d_model, cfg.d_ff
    matmul_weights = cfg.n_layers * (4 * d * d + 2 * d * f) + d * cfg.vocab_size
    return 6 * matmul_weights + cfg.n_layers * 12 * seq_len * d


@functools.lru_cache(maxsize=None)
def openblas():
    """scipy-openblas32's library, with the argument types of the calls made here."""
    import scipy_openblas32

    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"),
                      mode=ctypes.RTLD_GLOBAL)
    lib.scipy_cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
    return lib


def sgemm(lib, ta, tb, m, n, k, a, b, c):
    """Row-major C(m,n) = op(A) op(B); op = transpose when ta/tb (arrays hold the stored form)."""
    lib.scipy_cblas_sgemm(101, 112 if ta else 111, 112 if tb else 111, m, n, k, 1.0,
                          a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0,
                          c.ctypes.data, n)


def sgemm_peak_gflops(threads: int = None, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of C = A @ B (size^3, float32) on `threads` OpenBLAS threads
    (default: one per CPU). Leaves OpenBLAS at the thread count it had before."""
    lib = openblas()
    before = lib.scipy_openblas_get_num_threads()
    lib.scipy_openblas_set_num_threads(threads or os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    c = np.empty((size, size), np.float32)
    best = float("inf")
    try:
        for _ in range(repeats + 1):  # the first call warms caches and the thread pool
            t0 = time.perf_counter()
            sgemm(lib, False, False, size, size, size, a, b, c)
            best = min(best, time.perf_counter() - t0)
    finally:
        lib.scipy_openblas_set_num_threads(before)
    return 2.0 * size ** 3 / best / 1e9
