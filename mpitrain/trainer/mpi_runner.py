"""MPI mode: wiring the ranks, agreeing on the plan, signals, and the abort path.

  1. every rank: host and PID to rank 0 (for the log header and heartbeat.json)
  2. rank 0 alone makes the plan (prepares the default corpus if needed, opens the dataset and
     the checkpoint); the others sleep in a non-blocking broadcast. A UserError found here is
     sent to every rank: rank 0 prints its one line and every rank exits 2.
  3. the workers split off their own communicator (with the icosahedral graph topology
     attached: docs/TOPOLOGY.md says what it is for)
  4. rank 0 runs Node Zero, the others MPIWorker, until Node Zero releases them

Abort path: `python -m mpitrain` under mpirun would otherwise leave the other ranks waiting
forever when one rank raises (measured). Any exception after step 2's agreement, on
any rank, prints the traceback and "mpitrain: rank R: <error>" and calls MPI.COMM_WORLD.Abort,
which ends every rank.

MPICH's start-up file: MPICH names the shared memory its ranks on a node set up in MPI_Init
with a file in /dev/shm, and removes that name only in MPI_Finalize, so a job that ends by a
kill (a dead rank, MPI_Abort, a second Ctrl-C) left 4 MB there for good (this machine had
gathered 308 such files, 1.3 GB of memory, from two days of fault tests). Once every rank has
attached, the name is not needed -- the memory lives until its last process unmaps it -- so the
ranks remove it at step 1 (rank 0) and after step 2 (all, for other nodes).

Signals (signals.py): Node Zero turns the first Ctrl-C or SIGTERM into "save and stop"; the
workers ignore the first (Node Zero will stop them); a second, on any rank, ends every rank
with MPI_Abort.
"""
import os
import socket
import sys
import time
import traceback

from mpitrain.errors import UserError
from mpitrain.exits import Fault


ABORT_GRACE = 0.3  # s between our last words and MPI_Abort (see _end)


def _unlink_mpich_files() -> None:
    """Remove the names of the MPICH start-up files in /dev/shm that this process maps (see the
    module docstring); another rank of the node may have removed them first."""
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split() for line in f]
    except OSError:          # not Linux: nothing we know how to find
        return
    for path in {f[5] for f in fields if len(f) == 6}:   # a 7th field: "(deleted)"
        if os.path.dirname(path) == "/dev/shm" and os.path.basename(path).startswith("mpich_shm_"):
            try:
                os.unlink(path)
            except OSError:
                pass


def _end(world, rank: int, what: str, status: int, details: str = "") -> None:
    """Our last words -- `details`, then one line naming the rank -- and end every rank with
    `status`. The pause lets mpirun forward this stderr first: without it the launcher lost the
    last line in 1 of 15 aborts (measured), as it tears the job down."""
    sys.stderr.write(f"{details}mpitrain: rank {rank}: {what}\n")
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)
    world.Abort(status)


def _abort(world, rank: int, exc: BaseException) -> None:
    """An exception on this rank: its traceback and the error, then end every rank."""
    text = "" if isinstance(exc, KeyboardInterrupt) else traceback.format_exc()
    _end(world, rank, f"{type(exc).__name__}: {exc}", 1, text)


def _signal_abort(world, rank: int):
    """signals.install_signals's abort for this rank: a second signal ends every rank."""
    return lambda what, status: _end(world, rank, f"{what}: aborting", status)


def run_mpi(options: dict) -> int:
    """options: see plan.make_plan. Returns the exit status (0) or raises the agreed UserError."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # our kernel threads, not BLAS's
    from mpi4py import MPI

    from mpitrain.topology import graph_edges, placement_table
    from mpitrain.trainer.comm import MPIWorkerLink, bcast_object, make_worker_comm
    from mpitrain.trainer.plan import make_plan

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    try:
        ranks = world.gather((socket.gethostname(), os.getpid()), root=0)
        plan = checkpoint = dataset = error = None
        if rank == 0:   # every rank is through MPI_Init: the start-up file may go
            _unlink_mpich_files()
            try:
                plan, checkpoint, dataset = make_plan(options)
            except UserError as e:
                error = str(e)
        plan, error = bcast_object(world, (plan, error))
        _unlink_mpich_files()
    except BaseException as e:
        _abort(world, rank, e)
    if error is not None:
        raise UserError(error)  # on every rank; the command line prints it on rank 0 only

    fault = None
    try:
        tc = plan.train_config
        comm = make_worker_comm(world, tc.batch_size, graph_edges(size - 1))
        if rank == 0:
            from mpitrain.trainer.node_zero import NodeZero, run_node_zero

            node_zero = NodeZero(plan, MPIWorkerLink(world, tc.batch_size), ranks, dataset,
                                 checkpoint, header_extra=placement_table(size - 1,
                                                                           tc.batch_size))
            del checkpoint
            run_node_zero(node_zero, _signal_abort(world, rank))
            fault = node_zero.fault
        else:
            from mpitrain.trainer.mpi_worker import MPIWorker
            from mpitrain.trainer.signals import install_signals

            install_signals(None, _signal_abort(world, rank))
            MPIWorker(plan, comm, rank).run()
    except BaseException as e:
        _abort(world, rank, e)
    if fault is not None:   # every rank has finished in order; mpirun passes on rank 0's 3
        raise Fault(fault)
    return 0
