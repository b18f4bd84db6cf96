"""Tolerances of the numerical tests: float32 error bounds computed from the inputs, and the
assertion helpers every comparison goes through.

Two kinds of tolerance, each stated where it is used:
 - a bound: for a sum of K float32 products, |fl(sum) - sum| <= gamma_K * sum |a_i b_i| with
   gamma_K = K u / (1 - K u) and u = 2^-24 (Higham, Accuracy and Stability of Numerical
   Algorithms, 3.1 and 3.5). This holds for any summation order or blocking, so it holds for
   every BLAS kernel (Haswell, Sandybridge, SkylakeX, ...). matmul_bound and sum_bound compute
   it elementwise from the operands;
 - a measured worst case with margin: where errors pass through a whole network (softmax,
   LayerNorm, attention, GELU) a bound is far too loose to catch anything, so the tolerance is
   the worst error measured with OpenBLAS's Haswell, Sandybridge, Nehalem (SSE only) and default
   kernels, times a margin of at least 10. Such tolerances say "measured" in their comment.

Set MPITRAIN_TOL_LOG=path to append, for every assertion, the worst ratio of error to
tolerance (JSON lines, with the test's id): how the measured worst cases were taken.
"""
import json
import os

import numpy as np

U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)


def gamma(n, u=U32):
    """gamma_n = n u / (1 - n u): bound on the relative error of a sum of n rounded terms."""
    n = max(int(n), 1)
    assert n * u < 0.5, n
    return n * u / (1 - n * u)


def matmul_bound(a, b, *addends):
    """Elementwise bound on |fl(a @ b + addends...) - (a @ b + addends...)| for float32 a
    (..., K), b (K, N) and addends broadcasting to the result: a sum of K + len(addends) terms,
    so gamma_{K+len(addends)} (|a| @ |b| + sum |addend|). Holds for any summation order, with or
    without fused multiply-adds (any BLAS kernel, any blocking, any thread split)."""
    a64, b64 = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    total = a64 @ b64
    for c in addends:
        total = total + np.abs(np.asarray(c, np.float64))
    return gamma(a64.shape[-1] + len(addends)) * total


def sum_bound(x, axis=None):
    """Elementwise bound on |fl(sum(x, axis)) - sum(x, axis)| for float32 x, any order."""
    x64 = np.abs(np.asarray(x, np.float64))
    n = x64.size if axis is None else x64.shape[axis]
    return gamma(n) * x64.sum(axis=axis)


def _log(ratio, what):
    path = os.environ.get("MPITRAIN_TOL_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "ratio": float(ratio),
                                "coretype": os.environ.get("OPENBLAS_CORETYPE", "default")})
                    + "\n")


def assert_within(got, want, bound, err_msg=""):
    """|got - want| <= bound, elementwise (bound from matmul_bound / sum_bound or an array)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)
    worst = float(ratio.max(initial=0.0))
    _log(worst, err_msg)
    assert worst <= 1.0, (f"{err_msg}: error {float(err.max(initial=0)):.3g} exceeds its bound "
                          f"by {worst:.3g}x at {np.unravel_index(int(ratio.argmax()), err.shape)}")


def assert_close(got, want, rtol=1e-7, atol=0.0, err_msg=""):
    """np.testing.assert_allclose (same defaults), which also logs the worst ratio of error to
    atol + rtol |want| when MPITRAIN_TOL_LOG is set."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if os.environ.get("MPITRAIN_TOL_LOG"):
        try:
            err = np.abs(g - w)
        except ValueError:  # shapes differ: assert_allclose says so below
            err = None
        if err is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(err == 0, 0.0, err / (atol + rtol * np.abs(w)))
            _log(np.nanmax(ratio, initial=0.0), err_msg)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_scalar(got, want, rel=0.0, abs_=0.0, err_msg=""):
    """|got - want| <= abs_ + rel |want| for scalars (logged like assert_close)."""
    err = abs(float(got) - float(want))
    tol = abs_ + rel * abs(float(want))
    ratio = 0.0 if err == 0 else (err / tol if tol else float("inf"))
    _log(ratio, err_msg)
    assert err <= tol, f"{err_msg}: |{got!r} - {want!r}| = {err:.3g} > {tol:.3g}"
