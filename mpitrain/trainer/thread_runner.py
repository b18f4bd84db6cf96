"""Thread mode: Node Zero and the workers as threads of one process (no MPI).

`--threads N` counts every thread: Node Zero on the main Python thread, and N-1 workers, which
are the N-1 kernel threads of one shared replica (one Model: params, grads, optimizer state)
driven by one Python worker thread (kernel thread 0 is that Python thread, 1..N-2 the kernel's
pool). Node Zero's code (node_zero.py) and the worker's command loop (worker.py) are the MPI
mode's own; only the transport (threads.py) and the training step differ:

  step n   the batch's windows are ordered worker by worker (worker w's are its symmetry
           groups' windows, topology.assign_windows(N-1, batch_size)[w], as MPI rank w+1 would
           take), and the kernel gets the per-worker window counts: kernel thread w does the
           row-local work (embedding, LayerNorm, GEMM rows, GELU, attention) of exactly worker
           w's windows with its own activation rows. Weight gradients are split by output rows
           among the threads, each row summed over all windows in a fixed order (no mutex, no
           float atomics), so the step writes the summed gradient of the whole batch. Then one
           clip by the global norm and one AdamW on the replica (kernel threads by ranges).

The loss sequence equals MPI mode's to float rounding (the step invariant: each window's token
gradients are scaled by 1 / the global token count, and summed). A checkpoint is the same file
in both modes: Node Zero writes it from its copy of the replica's arenas.

Signals: the first Ctrl-C / SIGTERM asks Node Zero to save and stop (as in MPI mode); a second
one ends the process at once.
"""
import json
import os
import signal
import socket
import sys
import traceback

import numpy as np

from mpitrain import optim, schedule
from mpitrain.errors import UserError
from mpitrain.topology import assign_windows, placement_table
from mpitrain.trainer.messages import STEP, Report
from mpitrain.trainer.worker import Worker

MAX_THREADS = 145   # Node Zero + 144 workers: the placement is tested up to 144 workers


class ThreadWorker(Worker):
    """The worker thread: the MPI worker's command loop on the shared replica, whose kernel
    threads are the workers."""

    def __init__(self, plan, comm, num_workers: int):
        super().__init__(plan, comm, rank=1)
        m = self.model
        m.threads = num_workers                      # kernel thread w = worker w
        comm.thread_windows = m.thread_windows
        shares = assign_windows(num_workers, self.tc.batch_size)
        self.order = np.array([j for share in shares for j in share], np.int64)  # [B]
        self.partition = [len(share) for share in shares]
        self.shares = shares
        self.grad_shard = None                       # the base class's; unused here
        if self.trace is not None:                   # one trace file per worker thread
            self.trace.close()
            trace_dir = os.environ["MPITRAIN_TRACE_WINDOWS"]
            self.trace = _Traces(open(os.path.join(trace_dir, f"worker_{w}.jsonl"), "a",
                                      buffering=1) for w in range(num_workers))

    def _train_step(self, command) -> None:
        m, tc = self.model, self.tc
        ids = command.windows[self.order]            # global window ids, worker by worker
        if self.trace is not None:
            for w, share in enumerate(self.shares):
                self.trace[w].write(json.dumps({"step": command.step,
                                                "windows": command.windows[share].tolist()})
                                    + "\n")
        x, y = schedule.gather_windows(self.tokens, ids, tc.seq_len)   # int32 [B, T]
        loss = m.forward_backward(x, y, grad_scale=self.scale, partition=self.partition)
        norm = optim.grad_norm(m)   # clip + AdamW run on the kernel's work parts
        self.comm.report(Report(STEP, command.step, loss, norm))
        optim.update(m, lr=command.lr, step=command.step, norm=norm, **optim.train_settings(tc))



class _Traces(list):
    """The per-worker-thread trace files (test hook), closed together by Worker.run."""

    def close(self) -> None:
        for f in self:
            f.close()


def _install_signals(on_first) -> None:
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        if len(seen) == 1:
            on_first(signum)
            return
        print(f"mpitrain: second signal ({signal.Signals(signum).name}): stopping at once",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def run_threads(options: dict, threads: int) -> int:
    """options: see plan.make_plan (threads_per_rank 1). Returns the exit status."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # our kernel threads, not BLAS's
    from mpitrain.trainer.node_zero import NodeZero
    from mpitrain.trainer.plan import make_plan
    from mpitrain.trainer.runner import run_node_zero
    from mpitrain.trainer.threads import ThreadWorkerLink, WorkerThreadError

    workers = threads - 1
    plan, checkpoint, dataset = make_plan(options, workers)   # UserError: nothing written yet
    tc = plan.train_config
    link = ThreadWorkerLink(workers, tc.batch_size)
    host, pid = socket.gethostname(), os.getpid()
    ranks = [(host, pid)] * threads
    extra = (f"thread mode: one process (pid {pid}): Node Zero on the main thread, {workers} "
             f"worker(s) = the kernel threads of one shared replica\n"
             + placement_table(workers, tc.batch_size))
    try:
        node_zero = NodeZero(plan, link, ranks, dataset, checkpoint, header_extra=extra)
        del checkpoint
        link.start(lambda comm: ThreadWorker(plan, comm, workers).run())
        run_node_zero(node_zero, _install_signals)
    except BaseException as e:
        # As MPI mode's abort path: say which thread failed and end the process at once (an
        # orderly interpreter exit was measured to hang in h5py's finaliser after a worker
        # thread's exception; a checkpoint being written is under its temporary name).
        link.abort()
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
        os._exit(1)
    return 0
