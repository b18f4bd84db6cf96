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

Signals (signals.py): Node Zero turns the first Ctrl-C, SIGTERM or SIGHUP into "save and
stop"; a worker that receives one tells Node Zero, which does the same; a second, on any rank,
ends every rank with MPI_Abort.

Exit status (mpitrain/exits.py): MPICH's mpiexec cannot be relied on to pass a rank's own
non-zero status on. Measured (5.0.2): ranks that exit at once without MPI give the bitwise OR
of their statuses (1 and 2 give 3); but a rank that exits non-zero after MPI_Finalize makes
mpiexec kill the ranks still exiting, and the job's status was then 9 (their SIGKILL), or 0
when the rank exited last -- the same run gave 0, 9 or 130 depending on the order in which
the ranks left. MPI_Abort(S) gave S every time, the other ranks having exited 0 or not. So a
run that ends in order with a status other than 0 (a signal, a fault) ends, once everything
is written and the workers released, with rank 0 calling MPI_Abort(status), its stderr first
pointed at /dev/null so that MPICH's "application called MPI_Abort" line does not follow our
last words (`_finish`).
"""
import os
import socket
import sys
import time
import traceback

from mpitrain import exits, formats
from mpitrain.errors import UserError
from mpitrain.trainer import watcher


ABORT_GRACE = 0.3  # s between our last words and MPI_Abort (see _end)
_watcher = None    # this rank's watcher.Link, once connected


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
    if _watcher is not None:
        _watcher.end()   # these are the last words, not the watcher's
    sys.stderr.write(f"{details}mpitrain: rank {rank}: {what}\n")
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)   # MPICH's "MPI_Abort" line would follow
    world.Abort(status)


def _finish(world, status: int) -> int:
    """Rank 0, after a run that ended in order: make mpiexec return `status` (see the module
    docstring)."""
    if status == exits.OK:
        if _watcher is not None:
            _watcher.bye()
        return status
    if _watcher is not None:
        _watcher.end()
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)   # let mpiexec forward our last lines first (as _end)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    world.Abort(status)
    return status             # not reached


REAP_AFTER = 2.0   # s: after mpiexec has returned the job's status


def _reap_later(pids) -> None:
    """A stopped rank outlives MPI_Abort (measured: mpiexec returned and the process stayed,
    stopped, for good), and killing it before the abort made mpiexec return 9 instead of the
    abort's status. So a detached process kills it once the job has ended."""
    if not pids:
        return
    import subprocess

    code = ("import os, signal, sys, time\n"
            "from mpitrain.trainer.stall import process_state\n"
            f"time.sleep({REAP_AFTER})\n"
            "for pid in map(int, sys.argv[1:]):\n"
            "    if process_state(pid) == 'T':\n"
            "        os.kill(pid, signal.SIGKILL)\n")
    subprocess.Popen([sys.executable, "-c", code, *map(str, pids)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def _abort(world, rank: int, exc: BaseException) -> None:
    """An exception on this rank: its traceback and the error, then end every rank. A Fault
    (a stalled worker) is no bug: its one line, and its status."""
    if _watcher is not None and _is_mpi_error(exc):
        _quiet_exit(world, exc)
    if isinstance(exc, exits.Fault):
        _reap_later(getattr(exc, "stopped_pids", ()))
        _end(world, rank, str(exc), exc.exit_code)
    text = "" if isinstance(exc, KeyboardInterrupt) else traceback.format_exc()
    _end(world, rank, f"{type(exc).__name__}: {exc}", exits.INTERNAL, text)


def _is_mpi_error(exc: BaseException) -> bool:
    from mpi4py import MPI

    return isinstance(exc, MPI.Exception)


def _quiet_exit(world, exc: BaseException) -> None:
    """An MPI call failed, most likely because a peer rank died: no traceback that would look
    like a cause. The watcher says what happened (watcher.py); this rank leaves silently."""
    _watcher.fail(f"{type(exc).__name__}: {exc}")
    time.sleep(ABORT_GRACE)   # the watcher has its word first
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    world.Abort(exits.INTERNAL)


def _signal_abort(world, rank: int):
    """signals.install_signals's abort for this rank: a second signal ends every rank."""
    return lambda what, status: _end(world, rank, f"{what}: aborting", status)


def run_mpi(options: dict) -> int:
    """options: see plan.make_plan. Returns the exit status (rank 0: the run's, the workers: 0)
    or raises the agreed UserError."""
    global _watcher
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # our kernel threads, not BLAS's
    watcher.before_mpi()
    from mpi4py import MPI

    from mpitrain.topology import graph_edges, placement_table
    from mpitrain.trainer.data_check import check_dataset_on_nodes
    from mpitrain.trainer.hierarchy import host_name
    from mpitrain.trainer.comm import MPIWorkerLink, bcast_object, make_worker_comm
    from mpitrain.trainer.plan import make_plan

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    from mpitrain.trainer.output import hangup_warning, write_past_mpiexec

    write_past_mpiexec()   # a closed pipe then meets this rank, not mpiexec (output.py)
    try:
        rows = world.gather((host_name(), os.getpid(), socket.gethostname()), root=0)
        ranks = machines = None
        if rank == 0:
            ranks, machines = [(h, pid) for h, pid, _ in rows], [m for _, _, m in rows]
        plan = checkpoint = dataset = error = address = None
        if rank == 0:   # every rank is through MPI_Init: the start-up file may go
            _unlink_mpich_files()
            warning = hangup_warning()
            if warning is not None:
                print(f"mpitrain: warning: {warning}", file=sys.stderr, flush=True)
            try:
                plan, checkpoint, dataset = make_plan(options)
            except UserError as e:
                error = str(e)
            if error is None:
                from mpitrain.trainer.output import mpiexec_pid

                address = watcher.start(os.path.join(plan.run_dir, formats.TRAIN_LOG),
                                        mpiexec_pid())
        plan, error, address = bcast_object(world, (plan, error, address))
        _unlink_mpich_files()
        if address is not None:
            _watcher = watcher.Link(address, rank)
        if error is None:   # every node reads the dataset itself: the same file everywhere
            error = check_dataset_on_nodes(world, plan.dataset_path)
            if error is not None and _watcher is not None:
                _watcher.end()   # a user's error is said by rank 0, not blamed on a rank
    except BaseException as e:
        _abort(world, rank, e)
    if error is not None:
        raise UserError(error)  # on every rank; the command line prints it on rank 0 only

    try:
        tc = plan.train_config
        comm = make_worker_comm(world, tc.batch_size, graph_edges(size - 1))
        if rank == 0:
            from mpitrain.trainer.node_zero import NodeZero, run_node_zero

            node_zero = NodeZero(plan, MPIWorkerLink(world, tc.batch_size), ranks, dataset,
                                 checkpoint, header_extra=placement_table(size - 1,
                                                                           tc.batch_size),
                                 stall_timeout=options.get("stall_timeout"), machines=machines)
            del checkpoint
            run_node_zero(node_zero, _signal_abort(world, rank))
            status = node_zero.exit_status
            if node_zero.fault is not None:   # stopped in order after a fault: its one line
                print(f"mpitrain: {node_zero.fault}", file=sys.stderr, flush=True)
        else:
            from mpitrain.trainer.mpi_worker import MPIWorker
            from mpitrain.trainer.signals import install_signals

            install_signals(comm.request_stop, _signal_abort(world, rank))
            MPIWorker(plan, comm, rank).run()
            _watcher.bye()
            return exits.OK
    except BaseException as e:
        _abort(world, rank, e)
    return _finish(world, status)

