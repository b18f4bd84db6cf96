"""Loads the compiled C kernel (mpitrain._kernel) and its BLAS, and turns its statuses into
exceptions.

The extension links against libscipy_openblas.so from the scipy-openblas32 wheel. A regular
install finds it through an rpath; an editable install does not, so we load the library by its
absolute path first (RTLD_GLOBAL): the dynamic loader then reuses it by soname.

Every kernel call returns a status (mt_status in kernels/mpitrain_kernel.h); `check` is the one
place a status becomes a Python exception.
"""
import ctypes
import os

_lib = None
_ffi = None
_testing = None


def _preload_openblas():
    import scipy_openblas32

    path = os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so")
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def kernel():
    """Return (ffi, lib) of the compiled kernel, loading it on first use."""
    global _lib, _ffi
    if _lib is None:
        _preload_openblas()
        from mpitrain import _kernel  # compiled by cffi at install time

        _ffi, _lib = _kernel.ffi, _kernel.lib
    return _ffi, _lib


def testing_kernel():
    """(ffi, lib) of mpitrain._kernel_testing: the kernel's single layers, for tests only."""
    global _testing
    if _testing is None:
        kernel()  # its BLAS first
        from mpitrain import _kernel_testing

        _testing = (_kernel_testing.ffi, _kernel_testing.lib)
    return _testing


def as_ptr(array, ctype="float *"):
    """A C pointer into a NumPy array's memory (no copy). The caller checks dtype and layout."""
    ffi, _ = kernel()
    return ffi.cast(ctype, ffi.from_buffer(array, require_writable=False))


def _statuses():
    _, lib = kernel()
    return {
        lib.MT_EINVAL: (ValueError, "the kernel refused its arguments"),
        lib.MT_ENOMEM: (MemoryError, "the kernel ran out of memory"),
        lib.MT_EBUSY: (RuntimeError, "another call on this model is running (a Model is not "
                                     "shared between Python threads; use its own threads)"),
    }


def check(status, what):
    """Raise the exception for a kernel status other than MT_OK, naming the call `what`."""
    if status == kernel()[1].MT_OK:
        return
    exc, message = _statuses().get(status, (RuntimeError, f"unknown kernel status {status}"))
    raise exc(f"{what}: {message}")
