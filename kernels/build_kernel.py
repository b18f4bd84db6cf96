"""cffi builds of the mpitrain C kernel: two extension modules from the same kernels/*.c files.

  mpitrain._kernel          the package's API, declared in kernels/mpitrain_kernel.h
  mpitrain._kernel_testing  the single layers, for tests only (kernels/mt_testing.h; wrapped by
                            mpitrain/ops.py)

Each module compiles every kernels/*.c file (the testing one is self-contained: loading it needs
nothing from the other). Matrix products link against scipy-openblas32 (symbols prefixed
``scipy_``). At run time mpitrain/_native.py loads that library first, so the module resolves
it both from a regular install (rpath below) and from an editable one.

Environment:
  MPITRAIN_CFLAGS   extra compiler flags appended to the defaults (for example sanitizers).
"""
import os
import pathlib
import shlex

import cffi
import scipy_openblas32

HERE = pathlib.Path(__file__).resolve().parent


def _cdef_text(header: pathlib.Path) -> str:
    # cffi's cdef cannot read preprocessor lines; the header keeps them to guards and includes.
    return "\n".join(l for l in header.read_text().splitlines() if not l.lstrip().startswith("#"))


def _sources():
    return sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))


_cflags = ["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-pthread",
           "-Wall", "-Wno-unused-function"]
_cflags += shlex.split(os.environ.get("MPITRAIN_CFLAGS", ""))


def _builder(module: str, header: str) -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(_cdef_text(HERE / header))
    ffi.set_source(
        module,
        f'#include "{header}"\n',
        sources=_sources(),
        include_dirs=[str(HERE), scipy_openblas32.get_include_dir()],
        library_dirs=[scipy_openblas32.get_lib_dir()],
        libraries=["scipy_openblas", "m"],
        define_macros=[("BLAS_SYMBOL_PREFIX", "scipy_")],
        extra_compile_args=_cflags,
        # A regular install puts scipy_openblas32 beside mpitrain in site-packages.
        extra_link_args=["-pthread", "-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"],
    )
    return ffi


ffibuilder = _builder("mpitrain._kernel", "mpitrain_kernel.h")
testing_ffibuilder = _builder("mpitrain._kernel_testing", "mt_testing.h")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    testing_ffibuilder.compile(verbose=True)
