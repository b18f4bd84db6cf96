"""collectives.pairwise_reduce_scatter and pairwise_allgather under mpirun. The reduce-scatter gives
rank r's slice as the float32 sum in the fixed order it documents (own part, then ranks r-1,
r-2, ...), bit for bit -- so a run is reproducible -- and the sum to float tolerance, for uneven
slices, messages cut into pieces and slices shorter than a piece; the all-gather then puts
every rank's slice in every rank's array. shared_reduce_scatter (arrays in shared memory, read in
place) sums in the same order, bit for bit, and releases the pages it read without losing
them."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import mpirun_path

pytestmark = pytest.mark.slow  # MPI multi-rank runs

CODE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mpi4py import MPI
    from mpitrain.trainer.collectives import pairwise_allgather, pairwise_reduce_scatter
    comm = MPI.COMM_WORLD
    k, r = comm.size, comm.rank
    results = []
    for n, piece in ((1000, 7), (1003, 64), (5, 2), (4099, 4096), (k + 1, 1)):
        rng = np.random.default_rng(100 + r)
        # magnitudes over many octaves: a different summation order would show in the bits
        array = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(np.float32)
        counts = [n // k + (1 if w < n % k else 0) for w in range(k)]
        ours = np.empty(counts[r], np.float32)
        pairwise_reduce_scatter(comm, array, ours, counts, sleep_s=1e-4, piece=piece)
        everything = comm.allgather(array)
        lo = sum(counts[:r])
        theirs = everything[r][lo:lo + counts[r]].copy()
        for i in range(1, k):
            theirs += everything[(r - i) % k][lo:lo + counts[r]]
        exact = np.sum(np.array(everything, np.float64), axis=0)[lo:lo + counts[r]]
        # a float32 sum of k terms in any order is within gamma_(k-1) sum |terms| of the exact
        # sum (u = 2^-24, gamma_n = n u / (1 - n u)); the exact sum itself is rounded once more
        u = 2.0 ** -24
        bound = ((k - 1) * u / (1 - (k - 1) * u) + u) \
            * np.sum(np.abs(np.array(everything, np.float64)), axis=0)[lo:lo + counts[r]]
        close = bool(np.all(np.abs(ours - exact) <= bound))
        whole = array.copy()
        displs = [sum(counts[:w]) for w in range(k)]
        whole[lo:lo + counts[r]] = ours
        pairwise_allgather(comm, whole, counts, displs, sleep_s=1e-4)
        slices = comm.allgather(ours)
        gathered = bool(np.array_equal(whole, np.concatenate(slices)))
        results.append([n, piece, bool(np.array_equal(ours, theirs)), close, gathered])
    gathered = comm.gather(results, root=0)
    if r == 0:
        print(json.dumps(gathered), flush=True)
""")


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_pairwise_reduce_scatter_and_allgather(ranks):
    mpirun = mpirun_path()
    if mpirun is None:
        pytest.skip("mpirun not available")
    r = subprocess.run([mpirun, "-n", str(ranks), sys.executable, "-c", CODE],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    gathered = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(gathered) == ranks
    for rank, results in enumerate(gathered):
        for n, piece, equal, close, gathered in results:
            assert equal, f"rank {rank}, n {n}, piece {piece}: not the documented order"
            assert close, f"rank {rank}, n {n}, piece {piece}: not the sum"
            assert gathered, f"rank {rank}, n {n}: the all-gather missed a slice"


def _shared_arrays(k, n, seed):
    """k float32 arrays of n in one shared (MAP_SHARED) mapping, as MPI's shared windows are."""
    import mmap

    import numpy as np

    flat = np.frombuffer(mmap.mmap(-1, k * n * 4, flags=mmap.MAP_SHARED), np.float32)
    rng = np.random.default_rng(seed)
    flat[...] = rng.standard_normal(k * n) * 10.0 ** rng.integers(-6, 6, k * n)
    return [flat[w * n:(w + 1) * n] for w in range(k)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 11])
def test_shared_reduce_scatter_sums_in_the_pairwise_order(k):
    """Rank r's slice in the order of pairwise_reduce_scatter (own, r-1, r-2, ...), bit for
    bit, for uneven slices cut into pieces; the arrays it reads are left as they were."""
    import numpy as np

    from mpitrain.trainer.collectives import shared_reduce_scatter

    n = 10_007
    arrays = _shared_arrays(k, n, seed=k)
    before = [a.copy() for a in arrays]
    counts = [n // k + (1 if w < n % k else 0) for w in range(k)]
    for r in range(k):
        lo = sum(counts[:r])
        shard = np.empty(counts[r], np.float32)
        shared_reduce_scatter(arrays, r, shard, counts, piece=1000)
        expected = before[r][lo:lo + counts[r]].copy()
        for i in range(1, k):
            expected += before[(r - i) % k][lo:lo + counts[r]]
        assert np.array_equal(shard, expected), r
    for a, b in zip(arrays, before):
        assert np.array_equal(a, b)
    if k == 1:   # one rank may pass its whole array as the shard
        shared_reduce_scatter(arrays, 0, arrays[0], counts)
        assert np.array_equal(arrays[0], before[0])


def test_released_pages_leave_the_rss_and_keep_their_contents():
    import os

    import numpy as np

    from mpitrain.trainer.collectives import _release

    def rss_mb():
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    (array,) = _shared_arrays(1, 16 << 20, seed=0)   # 64 MB, all touched
    copy = array.copy()
    touched = rss_mb()
    _release(array)
    assert rss_mb() < touched - 60
    assert np.array_equal(array, copy)     # read back from the shared memory
