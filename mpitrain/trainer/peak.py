"""The "fraction of the measured SGEMM peak" in the final statistics.

FLOPs per training token are counted as scripts/bench_kernel.py counts them (6 x the weights
used in matrix products + attention's QK^T and AV over the full T x T square, x3 with
backward); the peak is the best of five 1024^3 SGEMMs through scipy-openblas32 (the library the
kernel calls) on one OpenBLAS thread per CPU, timed by Node Zero after training while the
workers sleep.
"""
import ctypes
import os
import time

import numpy as np


def flops_per_token(cfg, seq_len: int) -> float:
    d, f = cfg.d_model, cfg.d_ff
    matmul_weights = cfg.n_layers * (4 * d * d + 2 * d * f) + d * cfg.vocab_size
    return 6.0 * matmul_weights + cfg.n_layers * 12.0 * seq_len * d


def sgemm_peak_gflops(size: int = 1024, repeats: int = 5, threads: int = None) -> float:
    import scipy_openblas32

    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"),
                      mode=ctypes.RTLD_GLOBAL)
    lib.scipy_cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
    before = lib.scipy_openblas_get_num_threads()
    lib.scipy_openblas_set_num_threads(threads or os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    c = np.empty((size, size), np.float32)
    best = float("inf")
    try:
        for _ in range(repeats + 1):  # the first warms caches and the thread pool
            t0 = time.perf_counter()
            lib.scipy_cblas_sgemm(101, 111, 111, size, size, size, 1.0, a.ctypes.data, size,
                                  b.ctypes.data, size, 0.0, c.ctypes.data, size)
            best = min(best, time.perf_counter() - t0)
    finally:
        lib.scipy_openblas_set_num_threads(before)
    return 2.0 * size ** 3 / best / 1e9
