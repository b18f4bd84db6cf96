"""Releasing the pages of a shared mapping from this process's resident set: the one place
mpitrain calls madvise(MADV_DONTNEED).

The callers release pages of MAP_SHARED mappings only -- the workers' shared-memory arenas
(trainer/collectives.py) and the read-only map of a dataset's tokens (tokenstream.py) -- so
the contents stay (in the shared memory or the page cache) and the next access maps the same
physical pages again; only this process's resident set shrinks.

The system call is made directly, not through the C library's madvise: the MPICH wheel's UCX
(libucm) patches that function and reports every call to UCX's memory-registration caches,
which keep a record of each call until they are next used -- on one node, never. With a
release or two every training step, a worker grew by about 0.3 KB a step (5 MB from step
2,000 to 20,000 of the tiny preset at `mpirun -n 3`; tests/test_memory_flat.py). No
registration can go stale here: a shared mapping's pages are not replaced by this call. Where
the system call's number is not known (an architecture other than those below) the C
library's function is used.
"""
import ctypes
import mmap
import platform

MADV_DONTNEED = 4                      # the same value on every Linux architecture
_SYS_MADVISE = {"x86_64": 28, "aarch64": 233, "riscv64": 233, "ppc64le": 205}.get(
    platform.machine())

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def release(first: int, last: int) -> None:
    """Drop the pages [first, last) (page-aligned addresses inside one shared mapping) from
    this process's resident set; their contents stay."""
    if last <= first:
        return
    if _SYS_MADVISE is not None:
        _libc.syscall(ctypes.c_long(_SYS_MADVISE), ctypes.c_void_p(first),
                      ctypes.c_size_t(last - first), ctypes.c_int(MADV_DONTNEED))
    else:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def release_inside(address: int, nbytes: int) -> None:
    """Release the whole pages inside [address, address + nbytes): a part of a mapping whose
    neighbouring bytes may be in use elsewhere."""
    release(-(-address // mmap.PAGESIZE) * mmap.PAGESIZE,
            (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE)


def release_covering(address: int, nbytes: int) -> None:
    """Release every page that [address, address + nbytes) touches: a mapping of its own
    (mmap maps whole pages, so the pages around its bytes are its own too)."""
    release(address // mmap.PAGESIZE * mmap.PAGESIZE,
            -(-(address + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
