"""MPI mode's worker: one process per worker, with its own share of each step's windows, the
gradient sum among the workers, clipping by the global norm, and AdamW on its slice.

The command loop is worker.Worker's. A worker whose groups are empty in a step contributes
zeros (worker.py: the step invariant).

The optimizer state is sharded (as ZeRO stage 1): the parameter arena is cut into one
contiguous slice per worker; a reduce-scatter leaves each worker the summed gradient of its
slice, the global norm comes from the slices' sums of squares, each worker clips and applies
AdamW to its slice only, and an in-place all-gather gives every worker all parameters again
(when the workers of a node share their arenas, the reduce-scatter reads the others' gradients
in place and a barrier replaces the all-gather: comm.py). The
communication equals one all-reduce; the AdamW work (and memory traffic) is divided by the
number of workers instead of repeated on each. Each worker's Adam moments are current only on its
own slice; before a checkpoint they are all-gathered too. The result is a fixed function of the
gradients for a given world size (bitwise reproducible, so a resume continues bit for bit).

Works with any transport offering MPIWorkerComm's methods.
"""
import os

import numpy as np

from mpitrain import optim
from mpitrain.topology import assign_windows
from mpitrain.trainer.messages import STEP, Report
from mpitrain.trainer.process import injected_nonfinite, trace_files
from mpitrain.trainer.worker import MICRO_WINDOWS, Worker, finite_step


def tail_windows(shares, index: int, node_workers: int, cpus: int, threads: int) -> int:
    """How many of worker `index`'s windows (its last ones) it computes on all `cpus` instead of
    its `threads`: on a node with more workers than CPUs, the worker holding more windows than
    any other computes its extra ones after the others have finished theirs and gone to sleep,
    on one CPU of several otherwise idle. At -n 12 on 2 cores (shares 3,3,3,3,3,3,5,3,2,2,2)
    that is worker 6's last 2 windows. 0 when no CPU would be idle."""
    if node_workers <= cpus or cpus <= threads:
        return 0
    others = max((len(s) for w, s in enumerate(shares) if w != index), default=0)
    return max(0, len(shares[index]) - others)


def call_ranges(windows: int, tail: int) -> list:
    """The [a, b) ranges of a worker's windows that each kernel call computes: at most
    MICRO_WINDOWS each, the last `tail` windows in calls of their own."""
    head = windows - tail
    return [(a, min(a + MICRO_WINDOWS, head)) for a in range(0, head, MICRO_WINDOWS)] + \
        [(a, min(a + MICRO_WINDOWS, windows)) for a in range(head, windows, MICRO_WINDOWS)]


class MPIWorker(Worker):
    def __init__(self, plan, comm, rank: int):
        from mpitrain.model import parameter_count

        super().__init__(plan, comm, rank, comm.share_arenas(parameter_count(plan.model_config)))
        tc = self.tc
        shares = assign_windows(comm.num_workers, tc.batch_size)
        cpus = len(os.sched_getaffinity(0))
        self.tail = tail_windows(shares, comm.index, comm.node_workers, cpus,
                                 plan.threads_per_rank)
        if self.tail:   # the extra kernel threads sleep until the tail's calls
            self.model.threads = cpus
            self.model.work_parts = plan.threads_per_rank
        self.calls = call_ranges(len(self.share), self.tail)
        # This worker's slice of the arenas: [lo, hi); counts/displs of every worker's slice.
        n, k = self.model.num_params, comm.num_workers
        self.counts, self.displs = comm.slices(n)   # by node across nodes (hierarchy.py)
        self.lo = self.displs[comm.index]
        self.hi = self.lo + self.counts[comm.index]
        # One worker: its slice is the whole arena, and the gradient buffer itself (136 MB
        # less for the seed model at -n 2).
        self.grad_shard = (self.model.grad_buffer if k == 1
                           else np.empty(self.hi - self.lo, np.float32))
        self.traces = trace_files([comm.index])

    def _before_save(self) -> None:
        for arena in self.model.optimizer_arenas:  # each worker holds its slice only
            self.comm.allgather_in_place(arena, self.counts, self.displs)

    def _train_step(self, command) -> None:
        m, tc = self.model, self.tc
        ids = command.windows[self.share]                 # global window ids, [B_w]
        self._trace(self.comm.index, command.step, ids)
        if ids.size:
            x, y = self.tokens.windows(ids, tc.seq_len)   # int32 [B_w, T]
            loss_sum = 0.0
            for a, b in self.calls:                       # gradients accumulate, in order
                if self.tail:
                    m.work_parts = 0 if b > len(ids) - self.tail else self.plan.threads_per_rank
                xa, ya = x[a:b], y[a:b]
                mean = m.forward_backward(xa, ya, grad_scale=self.scale, accumulate=a > 0)
                loss_sum += mean * xa.size
            self._sums[0] = loss_sum                      # sum of this worker's token losses
        else:
            m.grad_buffer[...] = 0.0
            self._sums[0] = 0.0
        if injected_nonfinite(command.step):
            self._sums[0] = float("nan")
        lo, hi = self.lo, self.hi
        self.comm.progress()   # computed: a stall from here on is in the reductions
        self.comm.reduce_scatter_sum(m.grad_buffer, self.grad_shard, self.counts)
        self._sums[1] = optim.grad_norm(m, self.grad_shard) ** 2
        self.comm.allreduce_sum(self._sums)   # [sum of token losses, squared gradient norm]
        norm = float(np.sqrt(self._sums[1]))
        if self.comm.is_lead:
            self.comm.report(Report(STEP, command.step, self._sums[0] * self.scale, norm))
        if finite_step(self._sums[0], norm):   # every worker decides alike: global sums
            optim.update(m, lr=command.lr, step=command.step, norm=norm, lo=lo, hi=hi,
                         grads=self.grad_shard, **optim.train_settings(tc))   # clip + AdamW
        self.comm.publish_parameters(m.param_buffer, self.counts, self.displs)

