"""The workers' reduce-scatter and all-gather, written out with point-to-point messages.

Both replace an MPICH collective that measured slower on this machine (docs/BENCHMARKS.md, MPI
scaling): the same exchange pattern, without MPICH's staging through temporary buffers. Their
waits poll every WORKER_SLEEP (waiting.py): inside a collective every rank must call Test for
it to progress.
"""

import numpy as np

from mpitrain import pages
from mpitrain.trainer.waiting import WORKER_SLEEP, wait

TAG_GATHER = 99             # pairwise_allgather, on the workers' communicator
TAG_REDUCE = 100            # + round: pairwise_reduce_scatter, on the workers' communicator
REDUCE_PIECE = 1 << 21      # floats a message of pairwise_reduce_scatter carries (8 MB)


def pairwise_reduce_scatter(comm, array: np.ndarray, shard: np.ndarray, counts: list,
                            sleep_s: float = WORKER_SLEEP, piece: int = REDUCE_PIECE,
                            remote=None) -> int:
    """shard = this rank's slice (counts[rank] floats, slices in rank order) of the sum of
    `array` over the ranks of `comm`: the pairwise exchange of MPICH's Ireduce_scatter, written
    out. In round i = 1..k-1 rank r sends its part of rank r+i's slice and adds rank r-i's part
    of its own slice, so the sum runs in a fixed order (own part, then r-1, r-2, ...; checked
    bit for bit in tests/test_reduce_mpi.py): a run is reproducible. Messages carry at most `piece`
    floats, received into two buffers in turn. Measured with 136 MB of float32 on 2 cores:
    0.03 s against MPICH's 0.07 s between 2 ranks, 0.25 s against 0.33 s among 11 (MPICH
    stages the data through temporary buffers; here the sum is one vectorised add a piece).
    Returns the bytes sent to the ranks r for which remote[r] is true (other nodes)."""
    k, r = comm.Get_size(), comm.Get_rank()
    displs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if not np.may_share_memory(shard, array):   # one rank may pass its whole array as the shard
        shard[...] = array[displs[r]:displs[r + 1]]
    if k == 1:
        return 0
    steps = []   # (round, offset received, offset sent); None: nothing that way this step
    for i in range(1, k):
        dst = (r + i) % k
        n_recv = -(-counts[r] // piece)
        n_send = -(-counts[dst] // piece)
        steps += [(i, j * piece if j < n_recv else None, j * piece if j < n_send else None)
                  for j in range(max(n_recv, n_send))]
    buffers = [np.empty(min(piece, counts[r]), np.float32) for _ in range(2)]

    def post(j):
        i, o_recv, o_send = steps[j]
        src, dst = (r - i) % k, (r + i) % k
        requests, received = [], None
        if o_recv is not None:
            received = (o_recv, buffers[j % 2][:min(piece, counts[r] - o_recv)])
            requests.append(comm.Irecv(received[1], source=src, tag=TAG_REDUCE + i))
        if o_send is not None:
            lo = displs[dst] + o_send
            hi = min(lo + piece, displs[dst + 1])
            requests.append(comm.Isend(array[lo:hi], dest=dst, tag=TAG_REDUCE + i))
            if remote is not None and remote[dst]:
                sent_to_remote.append(4 * (hi - lo))
        return requests, received

    sent_to_remote = []

    current = post(0)
    for j in range(len(steps)):
        requests, received = current
        wait(requests, sleep_s)
        if j + 1 < len(steps):
            current = post(j + 1)   # into the other buffer, while we add this one
        if received is not None:
            o, buf = received
            part = shard[o:o + buf.size]
            np.add(part, buf, out=part)
    return sum(sent_to_remote)


def pairwise_allgather(comm, array: np.ndarray, counts: list, displs: list,
                       sleep_s: float = WORKER_SLEEP, remote=None) -> int:
    """Every rank's slice [displs[w], displs[w] + counts[w]) of `array` to all, in place: each
    rank receives every other slice straight into `array` while sending its own to all, all
    messages at once. 136 MB among 11 ranks on 2 cores: 0.11 s against 0.13 s for MPICH's
    Iallgatherv (its ring, the fastest of its algorithms here). Returns the bytes sent to the
    ranks r for which remote[r] is true (other nodes)."""
    k, r = comm.Get_size(), comm.Get_rank()
    sent = 0
    mine = array[displs[r]:displs[r] + counts[r]]
    requests = []
    for i in range(1, k):
        src, dst = (r - i) % k, (r + i) % k
        requests.append(comm.Irecv(array[displs[src]:displs[src] + counts[src]], source=src,
                                   tag=TAG_GATHER))
        requests.append(comm.Isend(mine, dest=dst, tag=TAG_GATHER))
        if remote is not None and remote[dst]:
            sent += mine.nbytes
    wait(requests, sleep_s)
    return sent


SHARED_PIECE = 1 << 18      # floats shared_reduce_scatter adds at a time (1 MB)


def shared_reduce_scatter(arrays: list, r: int, shard: np.ndarray, counts: list,
                          piece: int = SHARED_PIECE) -> None:
    """shard = slice r (counts[r] floats, slices in rank order) of the sum of `arrays`, every
    rank's array mapped in this process (shared memory), summed in the order of
    pairwise_reduce_scatter (own part, then r-1, r-2, ...) so that the result is bitwise the
    same. No message, no copy: the others' slices are read where they lie, `piece` floats at a
    time so that the piece of `shard` stays in cache. The pages of the others' arrays are
    released from this process after reading (pages.py: they stay in the shared
    memory), so they do not count in its RSS beyond one piece."""
    k = len(arrays)
    lo = sum(counts[:r])
    hi = lo + counts[r]
    own = arrays[r]
    for a in range(lo, hi, piece):
        b = min(a + piece, hi)
        out = shard[a - lo:b - lo]
        if not np.may_share_memory(out, own):   # one rank may pass its whole array as the shard
            out[...] = own[a:b]
        for i in range(1, k):
            part = arrays[(r - i) % k][a:b]
            np.add(out, part, out=out)
            _release(part)


def _release(view: np.ndarray) -> None:
    """Drop the whole pages of `view` (a shared mapping: its contents stay) from this
    process's resident set."""
    pages.release_inside(view.ctypes.data, view.nbytes)
