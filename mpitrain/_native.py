"""Loads the compiled C kernel (mpitrain._kernel) and its BLAS.

The extension links against libscipy_openblas.so from the scipy-openblas32 wheel. A regular
install finds it through an rpath; an editable install does not, so we load the library by its
absolute path first (RTLD_GLOBAL): the dynamic loader then reuses it by soname.
"""
import ctypes
import os

_lib = None
_ffi = None


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


def as_ptr(array, ctype="float *"):
    """A C pointer into a NumPy array's memory (no copy). The caller checks dtype and layout."""
    ffi, _ = kernel()
    return ffi.cast(ctype, ffi.from_buffer(array, require_writable=False))
