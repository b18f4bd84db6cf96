"""The transport between Node Zero and the workers: one small interface, an MPI implementation.

Node Zero's logic (node_zero.py) talks only to a `WorkerLink`: send a command to every worker,
take the lead worker's next report or state, send a state to every worker (resume), gather the
kernel counters, let the workers go. Each call that waits returns a `Pending` whose `done()` never
blocks, so Node Zero decides how to wait (it sleeps, and does its housekeeping meanwhile). Thread
mode implements the same interface with threads.

Every wait here sleeps (waiting.py: why and how long); the workers' reduce-scatter and all-gather
are written out in collectives.py.

Shared memory on one node: when every worker runs on one node (the usual case, and this
machine's), the workers keep the parameters in one shared-memory window instead of a copy each,
and their gradient arenas in another, where every worker can read them. Each worker still
computes on all parameters and updates its own slice, so after the update a barrier replaces the
all-gather, and the reduce-scatter reads the others' slices in place
(collectives.shared_reduce_scatter) instead of exchanging messages; the node's cache holds one
copy of the weights instead of one per worker (docs/TRAINING.md has the measurements). With
MPITRAIN_SHARED_MEMORY=0 every worker keeps its own copies and the slices are exchanged; the two
give bitwise the same state (tests/test_train_mpi.py).

Across nodes the workers of every node share their arenas in the same way, and the reduction and
the publication are two-level: within the node through shared memory, between nodes by messages
carrying node sums (hierarchy.py says who sends what, and why it is one replica's all-reduce per
node). MPITRAIN_HIERARCHICAL=0 keeps the flat exchange among all workers with private copies
(the only scheme before; kept to measure against). Each worker counts the bytes its exchanges
send to other nodes (`step_bytes_remote`, in the end statistics).
"""
import os
import pickle
import sys
import time

import numpy as np

from mpitrain.trainer.collectives import (SHARED_PIECE, _release, pairwise_allgather,
                                          pairwise_reduce_scatter, shared_reduce_scatter)
from mpitrain.trainer.hierarchy import NodeLayout, node_sum
from mpitrain.trainer.messages import HEADER, REPORT_SIZE, Command, Report
from mpitrain.trainer.waiting import (NODE_ZERO_MAX_SLEEP, NODE_ZERO_SLEEP, WORKER_MAX_SLEEP,
                                      WORKER_SLEEP, Pending, _mpi, wait)

TAG_COMMAND, TAG_REPORT, TAG_STATE, TAG_STOP, TAG_PROGRESS = 11, 12, 13, 14, 15
# (collectives.py uses 99 and 100..)
TAG_NODE_SUM, TAG_PUBLISH = 21, 22                 # the two-level exchange (hierarchy.py)
LEAD_RANK = 1               # worker 0 reports to Node Zero and sends it state


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
        """Send `buffers` (parameters, then each optimizer state arena) to every worker (resume)."""
        raise NotImplementedError

    def gather_counters(self, own: tuple) -> Pending:
        """Every rank's (kernel train_calls, kernel windows, peak RSS in KiB[, bytes sent to
        other nodes by the steps, node of the worker]): int64 [ranks, 3 or 5], Node Zero
        first."""
        raise NotImplementedError

    def release(self) -> Pending:
        """Tell the workers everything is written: they may exit."""
        raise NotImplementedError

    def poll_stop(self):
        """(signal number, worker rank) when a worker received a stop signal, else None
        (never blocks)."""
        return None

    def progress(self) -> list:
        """Every worker's progress as Node Zero knows it now: [(count, time.monotonic() when
        it last grew)] by worker index (never blocks). A worker's count grows at each point of
        its command loop it passes (Worker.run)."""
        raise NotImplementedError


class MPIWorkerLink(WorkerLink):
    """Node Zero (rank 0 of `world`) talking to ranks 1.. of `world`."""

    def __init__(self, world, batch_size: int):
        self.world = world
        self.num_workers = world.Get_size() - 1
        self.batch_size = batch_size
        self._sends = []  # outstanding command sends (eager: they complete at once)
        self._stop = np.zeros(1, np.int64)
        self._stop_req = world.Irecv(self._stop, source=_mpi().ANY_SOURCE, tag=TAG_STOP)
        now = time.monotonic()
        self._progress = [[0, now] for _ in range(self.num_workers)]
        self._progress_bufs = [np.zeros(1, np.int64) for _ in range(self.num_workers)]
        self._progress_reqs = [world.Irecv(b, source=w + 1, tag=TAG_PROGRESS)
                               for w, b in enumerate(self._progress_bufs)]

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
        send = np.array((*own, 0, -1), np.int64)   # Node Zero: no step bytes, no worker's node
        recv = np.empty((self.world.Get_size(), send.size), np.int64)
        return Pending([self.world.Igather(send, recv, root=0)], lambda: recv)

    def poll_stop(self):
        if self._stop_req is None:
            return None
        status = _mpi().Status()
        if not self._stop_req.Test(status) or status.Is_cancelled():
            return None
        self._stop_req = None   # the first is enough; the others are dropped at the end
        return int(self._stop[0]), status.Get_source()

    def progress(self) -> list:
        for w, req in enumerate(self._progress_reqs):
            if req is None:
                continue
            while req.Test():          # drain what has come (one message at a time)
                count = int(self._progress_bufs[w][0])
                if count > self._progress[w][0]:
                    self._progress[w] = [count, time.monotonic()]
                req = self._progress_reqs[w] = self.world.Irecv(
                    self._progress_bufs[w], source=w + 1, tag=TAG_PROGRESS)
        return [tuple(p) for p in self._progress]

    def release(self) -> Pending:
        for req in self._progress_reqs:
            req.Cancel()
            req.Wait()
        self._progress_reqs = [None] * self.num_workers
        if self._stop_req is not None:   # too late for a stop: the run has ended
            self._stop_req.Cancel()
            self._stop_req.Wait()
            self._stop_req = None
        return Pending([self.world.Ibarrier()])


class MPIWorkerComm:
    """A worker's side: commands from Node Zero, reductions among the workers only.

    `workers` is the workers' communicator with the icosahedral graph topology attached
    (rank there = worker index = world rank - 1). The reductions and barriers run on it among
    all the workers; none travels along the graph's edges (docs/TOPOLOGY.md, "MPI graph")."""

    def __init__(self, world, workers, batch_size: int):
        self.world = world
        self.workers = workers
        self.index = workers.Get_rank()
        self.num_workers = workers.Get_size()
        self.is_lead = world.Get_rank() == LEAD_RANK
        self._cmd = np.empty(HEADER + batch_size, np.int64)
        self._cmd_req = world.Irecv(self._cmd, source=0, tag=TAG_COMMAND)
        self._reports = []
        self._windows = []             # the shared-memory windows (share_arenas)
        self._grads = None             # every worker's gradient arena, when shared
        self.writes_parameters = True  # whether this worker writes whole parameter arenas
        self.node_workers = 1          # workers on this worker's node (share_arenas)
        self.stop_signal = None        # set by the signal handler (request_stop)
        self._stop_sent = False
        self._progress = 0
        self.node = None               # the node's workers, when the exchange is two-level
        self._written = None           # the shared parameter arena this worker wrote whole
        self.step_bytes_remote = 0     # bytes sent to other nodes by the steps' exchanges

    def share_arenas(self, count: int):
        """Collective over the workers: (parameters, gradients), float32 arenas of `count`
        floats in shared memory among the workers of this node (see the module docstring), or
        (None, None). The parameters are one arena for the node's workers; the gradients an
        arena each, which the others read in the reduction. The node's first worker is the one
        that writes whole parameter arenas (initialisation, resume): `writes_parameters`. Sets
        `node_workers` and `layout` (every worker's node: hierarchy.NodeLayout)."""
        MPI = _mpi()
        node = self.workers.Split_type(MPI.COMM_TYPE_SHARED)
        self.node_workers = node.Get_size()
        first = node.Get_rank() == 0
        self.layout = NodeLayout.from_keys(
            self.workers.allgather(node.allreduce(self.index, op=MPI.MIN)))
        mine = self.layout.node_of[self.index]
        self.remote = [q != mine for q in self.layout.node_of]
        hierarchical = os.environ.get("MPITRAIN_HIERARCHICAL", "1") != "0"
        share = (self.layout.num_nodes == 1 or hierarchical) \
            and os.environ.get("MPITRAIN_SHARED_MEMORY", "1") != "0"
        if share:   # one look at the shared-memory file system per node; every node alike
            need = 4 * count * (1 + node.Get_size()) + (64 << 20)
            fits = bool(node.bcast(_shm_fits(need, warn=first) if first else None))
            share = bool(self.workers.allreduce(int(fits), op=MPI.MIN))
        if not share:
            node.Free()
            self._slicing = NodeLayout([list(range(self.num_workers))])   # flat slices
            return None, None
        self._slicing = self.layout
        self.local = node.Get_rank()
        params = self._window_arenas(node, count, first)[0]
        self._grads = self._window_arenas(node, count, True)
        if self.layout.num_nodes > 1:
            self.node = node                    # its barrier ends the two-level exchanges
            self._partnered = self.layout.partnered(self.index)
        else:
            node.Free()
        self.writes_parameters = first
        # (a window of one process may be private memory, which releasing would zero)
        self._written = params if first and self.node_workers > 1 else None
        return params, self._grads[self.local]

    def slices(self, n: int) -> tuple:
        """(counts, displs) of every worker's slice of an arena of n floats (ZeRO-1): across
        nodes with shared arenas each node owns an equal part (hierarchy.py), else each
        worker does."""
        self._counts, self._displs = self._slicing.slices(n)
        return self._counts, self._displs

    def _window_arenas(self, node, count: int, mine: bool) -> list:
        """A shared window with an arena of `count` floats from each rank of `node` for which
        `mine` is true: those arenas, in rank order."""
        from mpitrain.model import ALIGN_BYTES, aligned_arena

        MPI = _mpi()
        pad = ALIGN_BYTES // 4   # MPICH aligns a one-process window only as malloc does
        window = MPI.Win.Allocate_shared(4 * (count + pad) if mine else 0, 4, comm=node)
        window.Lock_all()        # a passive epoch: Win.Sync orders our stores and loads
        self._windows.append(window)
        arenas = []
        for rank in range(node.Get_size()):
            buf, _ = window.Shared_query(rank)
            if len(buf):
                arenas.append(aligned_arena(np.frombuffer(buf, np.float32, count + pad), count))
        return arenas

    def _sync(self) -> None:
        for window in self._windows:
            window.Sync()

    def publish_parameters(self, array: np.ndarray, counts: list, displs: list) -> None:
        """Every worker's updated slice of the parameters to all: a barrier when they share
        one arena (share_arenas), else an all-gather of the slices."""
        if not self._windows:
            self.step_bytes_remote += pairwise_allgather(self.workers, array, counts, displs,
                                                         remote=self.remote)
        elif self.node is None:
            self.parameters_ready()
        else:
            self._publish_two_level(array)

    def _publish_two_level(self, array: np.ndarray) -> None:
        """Our updated slice (in the node's shared arena) to our partner on every other node;
        the slices we are partner of into it; then the node's barrier (hierarchy.py)."""
        w, lay = self.index, self.layout
        counts, displs = self._counts, self._displs
        mine = array[displs[w]:displs[w] + counts[w]]
        requests = []
        for q in range(lay.num_nodes):
            if q != lay.node_of[w]:
                requests.append(self.workers.Isend(mine, dest=lay.partner(q, w), tag=TAG_PUBLISH))
                self.step_bytes_remote += mine.nbytes
        for v in self._partnered:
            requests.append(self.workers.Irecv(array[displs[v]:displs[v] + counts[v]], source=v,
                                               tag=TAG_PUBLISH))
        wait(requests, WORKER_SLEEP)
        self._node_ready()

    def _node_ready(self) -> None:
        """Every store of this node's workers into the shared arenas done and visible here."""
        self._sync()
        wait([self.node.Ibarrier()], WORKER_SLEEP, WORKER_MAX_SLEEP)
        self._sync()

    def parameters_ready(self) -> None:
        """With a shared parameter arena: wait (asleep) until every worker's writes to it are
        done and visible here. Without one, every worker wrote its own: nothing to wait for."""
        if self._windows:
            self._sync()
            wait([self.workers.Ibarrier()], WORKER_SLEEP, WORKER_MAX_SLEEP)
            self._sync()
            if self._written is not None:
                # The writer of a node's whole parameter arena (initialisation, resume) touched
                # every page of it, the token embedding's too, of which the others read only
                # their tokens' rows: unmapped here (the shared arena keeps them), its RSS is
                # theirs again, so every node's first worker is no larger than on one node.
                _release(self._written)
                self._written = None

    def request_stop(self, signum: int) -> None:
        """A signal handler: only note it; next_command tells Node Zero."""
        self.stop_signal = signum

    def _forward_stop(self) -> None:
        if self.stop_signal is not None and not self._stop_sent:
            self._stop_sent = True
            buf = np.array([self.stop_signal], np.int64)
            self._reports.append((self.world.Isend(buf, dest=0, tag=TAG_STOP), buf))

    def progress(self) -> None:
        """One more point of the command loop passed: tell Node Zero (stall detection)."""
        self._progress += 1
        buf = np.array([self._progress], np.int64)
        self._reports = [(r, b) for r, b in self._reports if not r.Test()]
        self._reports.append((self.world.Isend(buf, dest=0, tag=TAG_PROGRESS), buf))

    def next_command(self) -> Command:
        self._forward_stop()
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
        if self._grads is None:
            self._arrive()
            self.step_bytes_remote += pairwise_reduce_scatter(self.workers, array, shard, counts,
                                                              remote=self.remote)
        elif self.node is None:   # every gradient is written and visible: read them in place
            self._sync()
            self._arrive()
            self._sync()
            shared_reduce_scatter(self._grads, self.local, shard, counts)
        else:
            self._node_ready()
            self._reduce_two_level(shard)

    def _reduce_two_level(self, shard: np.ndarray) -> None:
        """shard = the sum of our slice: our node's sum (shared memory), then the other nodes'
        sums one after another in the layout's fixed order, once every worker has arrived;
        meanwhile the node sums of the slices we are partner of go to their owners
        (hierarchy.py).

        The other nodes' sums land in our own gradient arena's part of our slice: once our
        node's sum of it is made nothing reads it before the next step's backward (only the
        slice's owner sums it), so the exchange needs no buffer of its own: a worker's memory
        across nodes stays that of a worker on one node (a buffer for the other nodes' sums of
        the slice would add (nodes - 1) x P / workers bytes to every worker)."""
        w, lay = self.index, self.layout
        counts, displs = self._counts, self._displs
        sends = []
        own = self._grads[self.local]
        for v in self._partnered:      # the node's sum of v's slice, in place in our arena
            lo, hi = displs[v], displs[v] + counts[v]
            node_sum(self._grads, self.local, own[lo:hi], lo, hi, SHARED_PIECE)
            sends.append(self.workers.Isend(own[lo:hi], dest=v, tag=TAG_NODE_SUM))
            self.step_bytes_remote += 4 * (hi - lo)
        lo, hi = displs[w], displs[w] + counts[w]
        node_sum(self._grads, self.local, shard, lo, hi, SHARED_PIECE)
        # Every worker of every node here (asleep, as on one node), before the waits for the
        # other nodes' sums, which poll every WORKER_SLEEP to move the data: without it a node
        # that finished its windows first polled at that rate for as long as the slowest node
        # still computed (docs/SCALING.md: 0.8 CPU s a step less with it, at 2 nodes of 5
        # workers on 2 loaded cores).
        self._arrive()
        landing = own[lo:hi]
        for q in lay.sum_order(lay.node_of[w]):
            wait([self.workers.Irecv(landing, source=lay.partner(q, w), tag=TAG_NODE_SUM)],
                 WORKER_SLEEP)
            np.add(shard, landing, out=shard)
        wait(sends, WORKER_SLEEP)

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
        """counters, then the bytes sent to other nodes by the steps and this worker's node."""
        send = np.array((*counters, self.step_bytes_remote, self.layout.node_of[self.index]),
                        np.int64)
        wait([self.world.Igather(send, None, root=0)], WORKER_SLEEP, WORKER_MAX_SLEEP)

    def finish(self) -> None:
        """Wait (sleeping) until Node Zero has written everything; then the process may exit."""
        wait([r for r, _ in self._reports], WORKER_SLEEP, WORKER_MAX_SLEEP)
        self._cmd_req.Cancel()
        wait([self._cmd_req], WORKER_SLEEP)
        wait([self.world.Ibarrier()], WORKER_SLEEP, NODE_ZERO_MAX_SLEEP)
        for window in self._windows:   # every worker is past its last use of the arenas
            window.Unlock_all()
            window.Free()
        if self.node is not None:
            self.node.Free()


def _shm_fits(need: int, warn: bool, path: str = "/dev/shm") -> bool:
    """Whether `need` bytes fit in the file system that holds MPICH's shared-memory windows:
    where it is too small (a container's default 64 MB /dev/shm), writing into a window would
    kill the process with SIGBUS, so the workers keep private copies instead (slower)."""
    try:
        st = os.statvfs(path)
    except OSError:
        free = 0
    else:
        free = st.f_bavail * st.f_frsize
    if free < need and warn:
        print(f"mpitrain: warning: {path} has {free >> 20} MB free and the workers need "
              f"{need >> 20} MB to share their parameters and gradients: each keeps copies of "
              f"its own, which is slower", file=sys.stderr, flush=True)
    return free >= need


def make_worker_comm(world, batch_size: int, edges: list):
    """Split the workers off `world` (collective over world) and attach the graph topology
    (for introspection only: docs/TOPOLOGY.md, "MPI graph").

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
