"""A worker: its groups' windows of every step in the C kernel, the gradient sum among the
workers, clipping by the global norm, AdamW.

The step invariant (DESIGN.md): each worker's forward_backward runs with grad_scale = 1 / (the
global batch's target tokens), so its gradient is its share of the *sum* of token gradients
already divided by the global count; summed over the workers it is the gradient of the global
mean loss, whatever the number of workers. A worker whose groups are empty in a step
contributes zeros.

The optimizer state is sharded (as ZeRO stage 1): the parameter arena is cut into one
contiguous slice per worker; a reduce-scatter leaves each worker the summed gradient of its
slice, the global norm comes from the slices' sums of squares, each worker clips and applies
AdamW to its slice only, and an in-place all-gather gives every worker all parameters again
(when the workers of a node share their arenas, the reduce-scatter reads the others' gradients
in place and a barrier replaces the all-gather: comm.py). The
communication equals one all-reduce; the AdamW work (and memory traffic) is divided by the
number of workers instead of repeated on each. Each worker's optimizer state is current only on
its own slice; before a checkpoint it is all-gathered too. The result is a fixed function of the
gradients for a given world size (bitwise reproducible, so a resume continues bit for bit).

Works with any transport offering MPIWorkerComm's methods.
"""
import json
import os

import numpy as np

from mpitrain import optim, schedule
from mpitrain.topology import assign_windows
from mpitrain.trainer.messages import EVAL, SAVE, STEP, STOP, Report
from mpitrain.trainer.node_zero import injected_fault, peak_rss_kib

# Windows per kernel call: a worker with more (few workers, large batches) runs several calls
# accumulating gradients, so its activations stay those of 8 windows (a seed-preset worker at
# mpirun -n 2 or 3 otherwise held 32 or 16 windows of activations: 1.0-1.25 GB).
MICRO_WINDOWS = 8


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


class Worker:
    def __init__(self, plan, comm, rank: int):
        from mpitrain.dataset import Dataset
        from mpitrain.model import Model, parameter_count

        self.plan, self.comm, self.rank = plan, comm, rank
        tc = self.tc = plan.train_config
        params, grads = comm.share_arenas(parameter_count(plan.model_config))
        self.model = Model(plan.model_config, seed=tc.seed, threads=plan.threads_per_rank,
                           param_arena=params, grad_arena=grads,
                           initialize=comm.writes_parameters)
        ds = Dataset.open(plan.dataset_path)
        # The whole training stream stays in memory: any window can fall to this worker.
        self.tokens = np.ascontiguousarray(ds.split_tokens("train"))
        # j in [0, batch_size): the positions in each step's batch that belong to our groups.
        shares = assign_windows(comm.num_workers, tc.batch_size)
        self.share = np.array(shares[comm.index], np.int64)
        cpus = len(os.sched_getaffinity(0))
        self.tail = tail_windows(shares, comm.index, comm.node_workers, cpus,
                                 plan.threads_per_rank)
        if self.tail:   # the extra kernel threads sleep until the tail's calls
            self.model.threads = cpus
            self.model.work_parts = plan.threads_per_rank
        self.calls = call_ranges(len(self.share), self.tail)
        eval_share = assign_windows(comm.num_workers, len(plan.eval_ids))[comm.index]
        self.eval_x, self.eval_y = schedule.gather_windows(
            ds.split_tokens("val"), plan.eval_ids[eval_share], tc.seq_len)
        self.scale = 1.0 / (tc.batch_size * tc.seq_len)
        # This worker's slice of the arenas: [lo, hi); counts/displs of every worker's slice.
        n, k = self.model.num_params, comm.num_workers
        self.counts = [n // k + (1 if w < n % k else 0) for w in range(k)]
        self.displs = [sum(self.counts[:w]) for w in range(k)]
        self.lo = self.displs[comm.index]
        self.hi = self.lo + self.counts[comm.index]
        # One worker: its slice is the whole arena, and the gradient buffer itself (136 MB
        # less for the seed model at -n 2).
        self.grad_shard = (self.model.grad_buffer if k == 1
                           else np.empty(self.hi - self.lo, np.float32))
        self._sums = np.zeros(2, np.float64)
        trace_dir = os.environ.get("MPITRAIN_TRACE_WINDOWS")
        self.trace = None
        if trace_dir:  # test hook: record the windows this worker trains each step
            self.trace = open(os.path.join(trace_dir, f"worker_{comm.index}.jsonl"), "a",
                              buffering=1)

    def run(self) -> None:
        m = self.model
        if self.plan.resume_path is not None:  # Node Zero sends the state of every resume,
            # step 0's too; with one shared parameter arena, one worker writes it (the others'
            # copy lands in their gradient buffers, free until the first step)
            params = m.param_buffer if self.comm.writes_parameters else m.grad_buffer
            self.comm.receive_state([params, *m.optimizer_arenas])
        self.comm.parameters_ready()
        while True:
            command = self.comm.next_command()
            if injected_fault(self.rank, command.step) and command.kind == STEP:
                raise RuntimeError(f"injected fault (MPITRAIN_FAULT) at step {command.step}")
            if command.kind == STEP:
                self._train_step(command)
            elif command.kind == EVAL:
                self._evaluate(command.step)
            elif command.kind == SAVE:
                for arena in m.optimizer_arenas:  # each worker holds its slice only
                    self.comm.allgather_in_place(arena, self.counts, self.displs)
                if self.comm.is_lead:
                    self.comm.report(Report(SAVE, command.step))
                    self.comm.send_state([m.param_buffer, *m.optimizer_arenas])
            elif command.kind == STOP:
                break
        self.comm.send_counters((*m.counters(), peak_rss_kib()))
        if self.trace is not None:
            self.trace.close()
        self.comm.finish()

    def _train_step(self, command) -> None:
        m, tc = self.model, self.tc
        ids = command.windows[self.share]                 # global window ids, [B_w]
        if self.trace is not None:
            self.trace.write(json.dumps({"step": command.step, "windows": ids.tolist()}) + "\n")
        if ids.size:
            x, y = schedule.gather_windows(self.tokens, ids, tc.seq_len)   # int32 [B_w, T]
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
        lo, hi = self.lo, self.hi
        self.comm.reduce_scatter_sum(m.grad_buffer, self.grad_shard, self.counts)
        self._sums[1] = optim.grad_norm(m, self.grad_shard) ** 2
        self.comm.allreduce_sum(self._sums)   # [sum of token losses, squared gradient norm]
        norm = float(np.sqrt(self._sums[1]))
        if self.comm.is_lead:
            self.comm.report(Report(STEP, command.step, self._sums[0] * self.scale, norm))
        optim.update(m, lr=command.lr, step=command.step, norm=norm, lo=lo, hi=hi,
                     grads=self.grad_shard, **optim.train_settings(tc))   # clip + AdamW
        self.comm.publish_parameters(m.param_buffer, self.counts, self.displs)

    def _evaluate(self, step: int) -> None:
        n = len(self.eval_x)
        loss_sum = 0.0
        chunk = max(1, min(len(self.share), MICRO_WINDOWS))  # as a training call: activations fit
        for a in range(0, n, chunk):
            x, y = self.eval_x[a:a + chunk], self.eval_y[a:a + chunk]
            loss_sum += self.model.loss(x, y) * x.size
        self._sums[0], self._sums[1] = loss_sum, n * self.tc.seq_len
        self.comm.allreduce_sum(self._sums)
        if self.comm.is_lead:
            self.comm.report(Report(EVAL, step, self._sums[0] / self._sums[1]))
            self.comm.send_state([self.model.param_buffer])
