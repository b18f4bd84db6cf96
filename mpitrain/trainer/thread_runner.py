"""Thread mode: Node Zero and the workers as threads of one process (no MPI).

`--threads N` counts every thread: Node Zero on the main Python thread, and N-1 workers, which
are the N-1 kernel threads of one shared replica driven by one Python worker thread
(thread_worker.py). Node Zero's code (node_zero.py) and the workers' command loop (worker.py)
are MPI mode's own; only the transport (threads.py) and the training step differ. The loss
sequence equals MPI mode's to float rounding, and a checkpoint is the same file in both modes:
Node Zero writes it from its copy of the replica's arenas.

Signals (signals.py): the first Ctrl-C / SIGTERM / SIGHUP asks Node Zero to save and stop (as
in MPI mode), and the process exits 128 + its number; a second one ends the process at once
(os._exit).
"""
import os
import socket
import sys
import traceback

from mpitrain import exits
from mpitrain.errors import UserError
from mpitrain.topology import placement_table

MAX_THREADS = 145   # Node Zero + 144 workers: the placement is tested up to 144 workers


def _abort(what: str, status: int) -> None:
    """A second signal: end the process at once."""
    print(f"mpitrain: {what}: stopping at once", file=sys.stderr, flush=True)
    os._exit(status)


def run_threads(options: dict, threads: int) -> int:
    """options: see plan.make_plan. Returns the exit status."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # our kernel threads, not BLAS's
    from mpitrain.trainer.node_zero import NodeZero, run_node_zero
    from mpitrain.trainer.plan import make_plan
    from mpitrain.trainer.thread_worker import ThreadWorker
    from mpitrain.trainer.threads import ThreadWorkerLink, WorkerThreadError

    workers = threads - 1
    plan, checkpoint, dataset = make_plan(options)   # UserError: nothing written yet
    tc = plan.train_config
    link = ThreadWorkerLink(workers, tc.batch_size)
    host, pid = socket.gethostname(), os.getpid()
    ranks = [(host, pid)] * threads
    extra = (f"thread mode: one process (pid {pid}): Node Zero on the main thread, {workers} "
             f"worker(s) = the kernel threads of one shared replica\n"
             + placement_table(workers, tc.batch_size))
    try:
        node_zero = NodeZero(plan, link, ranks, dataset, checkpoint, header_extra=extra,
                             stall_timeout=options.get("stall_timeout"))
        del checkpoint
        link.start(lambda comm: ThreadWorker(plan, comm, workers).run())
        run_node_zero(node_zero, _abort)
        if node_zero.fault is not None:   # stopped in order after a fault: its one line
            print(f"mpitrain: {node_zero.fault}", file=sys.stderr, flush=True)
        return node_zero.exit_status
    except BaseException as e:
        # As MPI mode's abort path: say which thread failed and end the process at once (an
        # orderly interpreter exit was measured to hang in h5py's finaliser after a worker
        # thread's exception; a checkpoint being written is under its temporary name).
        link.abort()
        if isinstance(e, exits.Fault):   # a stalled worker thread: its one line, status 3
            print(f"mpitrain: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(e.exit_code)
        user = e.original if isinstance(e, WorkerThreadError) else e
        if isinstance(user, UserError):  # a user's mistake found late: one line, as before start
            print(f"mpitrain: error: {user}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(user.exit_code)
        if isinstance(e, WorkerThreadError):
            sys.stderr.write(e.details)
            who = "worker thread"
        else:
            traceback.print_exc(file=sys.stderr)
            who = "Node Zero"
        print(f"mpitrain: {who}: {e if who == 'worker thread' else f'{type(e).__name__}: {e}'}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exits.INTERNAL)
