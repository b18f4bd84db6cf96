"""The transport between Node Zero and the workers: one small interface, an MPI implementation.

Node Zero's logic (node_zero.py) talks only to a `WorkerLink`: send a command to every worker,
take the lead worker's next report or state, send a state to every worker (resume), gather the
kernel counters, let the workers go. Each call that waits returns a `Pending` whose `done()` never
blocks, so Node Zero decides how to wait (it sleeps, and does its housekeeping meanwhile). Thread
mode implements the same interface with threads.

Waiting without spinning. An MPICH rank inside a blocking call burns a core; with 12 ranks on 2
cores that slowed the computing ranks 6.2x in the measurements of issue 4, against 1.05x when the
waiting ranks polled a non-blocking call with Test and a 1 ms sleep, and an Iallreduce polled
with Test and a 100 us sleep took 0.45 s against 0.90 s blocking. So every wait here is a
non-blocking MPI call polled with Test and a sleep, and the sleep grows while the wait lasts:
every wake-up preempts a rank (or kernel thread) that computes. Node Zero, which is off the
critical path (it issues commands ahead), starts at 1 ms and doubles up to 20 ms; a 1 ms sleep
loop beside the kernel's 2-thread step alone cost it about 5%. The workers reach each step's
reduction at different times (their groups hold different numbers of windows): they first wait
in an Ibarrier sleeping 100 us doubling up to 2 ms -- at -n 12 ten of them wait there while the
slowest computes; with their fixed 100 us polls its compute took 2.98 s a step, with the
back-off 2.8 s (one instrumented run) -- and then run the collective itself, in which every
rank must call Test for it to progress, polling every 100 us.
"""
import pickle
import time

import numpy as np

from mpitrain.trainer.messages import HEADER, REPORT_SIZE, Command, Report

NODE_ZERO_SLEEP = 1e-3      # s: Node Zero's first sleep in a wait ...
NODE_ZERO_MAX_SLEEP = 2e-2  # ... doubling up to this
WORKER_SLEEP = 1e-4         # s between polls on a worker inside a collective
WORKER_MAX_SLEEP = 2e-3     # s: a worker's longest sleep while it waits for the others
TAG_COMMAND, TAG_REPORT, TAG_STATE = 11, 12, 13
TAG_GATHER = 99             # pairwise_allgather, on the workers' communicator
TAG_REDUCE = 100            # + round: pairwise_reduce_scatter, on the workers' communicator
REDUCE_PIECE = 1 << 21      # floats a message of pairwise_reduce_scatter carries (8 MB)
LEAD_RANK = 1               # worker 0 reports to Node Zero and sends it state


def _mpi():
    from mpi4py import MPI  # imported late: importing it initialises MPI

    return MPI


def wait(requests, sleep_s: float, max_sleep_s: float = 0.0) -> None:
    """Complete MPI requests by polling Testall with sleeps in between (never a blocking Wait);
    the sleeps start at sleep_s and double up to max_sleep_s (when larger)."""
    MPI = _mpi()
    requests = list(requests)
    while not MPI.Request.Testall(requests):
        time.sleep(sleep_s)
        sleep_s = min(2 * sleep_s, max(sleep_s, max_sleep_s))


def bcast_object(comm, obj, root: int = 0, sleep_s: float = NODE_ZERO_SLEEP):
    """comm.bcast(obj) without spinning: the pickled length, then the bytes, each an Ibcast."""
    size = np.zeros(1, np.int64)
    data = None
    if comm.Get_rank() == root:
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        size[0] = data.size
    wait([comm.Ibcast(size, root=root)], sleep_s)
    if comm.Get_rank() != root:
        data = np.empty(int(size[0]), np.uint8)
    wait([comm.Ibcast(data, root=root)], sleep_s)
    return obj if comm.Get_rank() == root else pickle.loads(data.tobytes())


def pairwise_reduce_scatter(comm, array: np.ndarray, shard: np.ndarray, counts: list,
                            sleep_s: float = WORKER_SLEEP, piece: int = REDUCE_PIECE) -> None:
    """shard = this rank's slice (counts[rank] floats, slices in rank order) of the sum of
    `array` over the ranks of `comm`: the pairwise exchange of MPICH's Ireduce_scatter, written
    out. In round i = 1..k-1 rank r sends its part of rank r+i's slice and adds rank r-i's part
    of its own slice, so the sum runs in a fixed order (own part, then r-1, r-2, ...; checked
    bit for bit in tests/test_reduce_mpi.py): a run is reproducible. Messages carry at most `piece`
    floats, received into two buffers in turn. Measured with 136 MB of float32 on 2 cores:
    0.03 s against MPICH's 0.07 s between 2 ranks, 0.25 s against 0.33 s among 11 (MPICH
    stages the data through temporary buffers; here the sum is one vectorised add a piece)."""
    k, r = comm.Get_size(), comm.Get_rank()
    displs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if not np.shares_memory(shard, array):   # one rank may pass its whole array as the shard
        shard[...] = array[displs[r]:displs[r + 1]]
    if k == 1:
        return
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
        return requests, received

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


def pairwise_allgather(comm, array: np.ndarray, counts: list, displs: list,
                       sleep_s: float = WORKER_SLEEP) -> None:
    """Every rank's slice [displs[w], displs[w] + counts[w]) of `array` to all, in place: each
    rank receives every other slice straight into `array` while sending its own to all, all
    messages at once. 136 MB among 11 ranks on 2 cores: 0.11 s against 0.13 s for MPICH's
    Iallgatherv (its ring, the fastest of its algorithms here)."""
    k, r = comm.Get_size(), comm.Get_rank()
    mine = array[displs[r]:displs[r] + counts[r]]
    requests = []
    for i in range(1, k):
        src, dst = (r - i) % k, (r + i) % k
        requests.append(comm.Irecv(array[displs[src]:displs[src] + counts[src]], source=src,
                                   tag=TAG_GATHER))
        requests.append(comm.Isend(mine, dest=dst, tag=TAG_GATHER))
    wait(requests, sleep_s)


class Pending:
    """Something started that may not have finished; `done()` tests it without blocking,
    `wait(timeout)` sleeps up to `timeout` seconds unless it is done, and `result` holds what it
    produced once it has."""

    def __init__(self, requests=(), finish=None):
        self._requests = list(requests)
        self._finish = finish
        self._done = False
        self.result = None

    def done(self) -> bool:
        if not self._done and _mpi().Request.Testall(self._requests):
            self._done = True
            if self._finish is not None:
                self.result = self._finish()
        return self._done

    def wait(self, timeout: float) -> bool:
        """done(), after sleeping `timeout` seconds if it was not done yet."""
        if self.done():
            return True
        time.sleep(timeout)
        return self.done()


class TestPending(Pending):
    """A Pending over a non-blocking test: test() -> (done, result)."""

    def __init__(self, test):
        super().__init__()
        self._test = test

    def done(self) -> bool:
        if not self._done:
            self._done, result = self._test()
            if self._done:
                self.result = result
        return self._done


def wait_pending(pending: Pending, between=None) -> Pending:
    """Node Zero's wait: sleeps growing from NODE_ZERO_SLEEP to NODE_ZERO_MAX_SLEEP, calling
    `between()` (its housekeeping) after each."""
    sleep = NODE_ZERO_SLEEP
    while not pending.wait(sleep):
        if between is not None:
            between()
        sleep = min(2 * sleep, NODE_ZERO_MAX_SLEEP)
    return pending


class WorkerLink:
    """Node Zero's side: what it needs from the workers, whatever carries the messages."""

    num_workers: int

    def send_command(self, command: Command) -> None:
        """Queue a command for every worker (in order; never blocks)."""
        raise NotImplementedError

    def next_report(self) -> Pending:
        """The lead worker's next Report (as `result`)."""
        raise NotImplementedError

    def receive_state(self, buffers: list) -> Pending:
        """Fill `buffers` (1-D float32 arenas) with the state the lead worker sends next."""
        raise NotImplementedError

    def send_state(self, buffers: list) -> Pending:
        """Send `buffers` (parameters, m, v) to every worker (resume)."""
        raise NotImplementedError

    def gather_counters(self, own: tuple) -> Pending:
        """Every rank's (kernel train_calls, kernel windows, peak RSS in KiB): int64
        [ranks, 3], Node Zero first."""
        raise NotImplementedError

    def release(self) -> Pending:
        """Tell the workers everything is written: they may exit."""
        raise NotImplementedError


class MPIWorkerLink(WorkerLink):
    """Node Zero (rank 0 of `world`) talking to ranks 1.. of `world`."""

    def __init__(self, world, batch_size: int):
        self.world = world
        self.num_workers = world.Get_size() - 1
        self.batch_size = batch_size
        self._sends = []  # outstanding command sends (eager: they complete at once)

    def send_command(self, command: Command) -> None:
        buf = command.encode(self.batch_size)
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        for rank in range(1, self.world.Get_size()):
            self._sends.append((self.world.Isend(buf, dest=rank, tag=TAG_COMMAND), buf))

    def next_report(self) -> Pending:
        buf = np.empty(REPORT_SIZE, np.float64)
        req = self.world.Irecv(buf, source=LEAD_RANK, tag=TAG_REPORT)
        return Pending([req], lambda: Report.decode(buf))

    def receive_state(self, buffers: list) -> Pending:
        return Pending([self.world.Irecv(b, source=LEAD_RANK, tag=TAG_STATE) for b in buffers])

    def send_state(self, buffers: list) -> Pending:
        return Pending([self.world.Ibcast(b, root=0) for b in buffers])

    def gather_counters(self, own: tuple) -> Pending:
        send = np.array(own, np.int64)
        recv = np.empty((self.world.Get_size(), send.size), np.int64)
        return Pending([self.world.Igather(send, recv, root=0)], lambda: recv)

    def release(self) -> Pending:
        return Pending([self.world.Ibarrier()])


class MPIWorkerComm:
    """A worker's side: commands from Node Zero, reductions among the workers only.

    `workers` is the workers' communicator with the icosahedral graph topology attached
    (rank there = worker index = world rank - 1)."""

    def __init__(self, world, workers, batch_size: int):
        self.world = world
        self.workers = workers
        self.index = workers.Get_rank()
        self.num_workers = workers.Get_size()
        self.is_lead = world.Get_rank() == LEAD_RANK
        self._cmd = np.empty(HEADER + batch_size, np.int64)
        self._cmd_req = world.Irecv(self._cmd, source=0, tag=TAG_COMMAND)
        self._reports = []

    def next_command(self) -> Command:
        wait([self._cmd_req], WORKER_SLEEP, WORKER_MAX_SLEEP)
        command = Command.decode(self._cmd)
        # Post the receive for the one after at once, so Node Zero's send lands while we work.
        self._cmd_req = self.world.Irecv(self._cmd, source=0, tag=TAG_COMMAND)
        return command

    def _arrive(self) -> None:
        """Wait, mostly asleep, until every worker has reached this point (see the module
        docstring), so the collective that follows runs with all of them polling."""
        wait([self.workers.Ibarrier()], WORKER_SLEEP, WORKER_MAX_SLEEP)

    def allreduce_sum(self, array: np.ndarray) -> None:
        """In-place sum over all workers (zero-copy on `array`, e.g. model.grad_buffer)."""
        wait([self.workers.Iallreduce(_mpi().IN_PLACE, array, op=_mpi().SUM)], WORKER_SLEEP)

    def reduce_scatter_sum(self, array: np.ndarray, shard: np.ndarray, counts: list) -> None:
        """shard = this worker's slice (counts[index] floats, slices in worker order) of the
        sum of `array` over all workers. The step's first collective: the workers arrive at
        it at different times."""
        self._arrive()
        pairwise_reduce_scatter(self.workers, array, shard, counts)

    def allgather_in_place(self, array: np.ndarray, counts: list, displs: list) -> None:
        """Every worker's slice [displs[w], displs[w] + counts[w]) of `array` to all."""
        pairwise_allgather(self.workers, array, counts, displs)

    def report(self, report: Report) -> None:
        buf = report.encode()
        self._reports = [(r, b) for r, b in self._reports if not r.Test()]
        self._reports.append((self.world.Isend(buf, dest=0, tag=TAG_REPORT), buf))

    def send_state(self, buffers: list) -> None:
        """Lead worker: send state to Node Zero and wait until it has left these buffers (the
        caller changes them next); Node Zero writes it to disk while we go on."""
        wait([self.world.Isend(b, dest=0, tag=TAG_STATE) for b in buffers], WORKER_SLEEP)

    def receive_state(self, buffers: list) -> None:
        wait([self.world.Ibcast(b, root=0) for b in buffers], WORKER_SLEEP, WORKER_MAX_SLEEP)

    def send_counters(self, counters: tuple) -> None:
        send = np.array(counters, np.int64)
        wait([self.world.Igather(send, None, root=0)], WORKER_SLEEP, WORKER_MAX_SLEEP)

    def finish(self) -> None:
        """Wait (sleeping) until Node Zero has written everything; then the process may exit."""
        wait([r for r, _ in self._reports], WORKER_SLEEP, WORKER_MAX_SLEEP)
        self._cmd_req.Cancel()
        wait([self._cmd_req], WORKER_SLEEP)
        wait([self.world.Ibarrier()], WORKER_SLEEP, NODE_ZERO_MAX_SLEEP)


def make_worker_comm(world, batch_size: int, edges: list):
    """Split the workers off `world` (collective over world) and attach the graph topology.

    Returns an MPIWorkerComm on a worker, None on Node Zero."""
    MPI = _mpi()
    rank = world.Get_rank()
    workers = world.Split(MPI.UNDEFINED if rank == 0 else 0, rank)
    if rank == 0:
        return None
    w = workers.Get_rank()
    graph = workers.Create_dist_graph_adjacent(edges[w], edges[w], reorder=False)
    workers.Free()
    return MPIWorkerComm(world, graph, batch_size)
