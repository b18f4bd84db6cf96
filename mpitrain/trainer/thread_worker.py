"""Thread mode's worker: one Python thread driving one shared replica (one Model: params,
grads, Adam m and v) whose kernel threads are the workers; kernel thread 0 is this Python
thread, 1..N-2 the kernel's pool. The command loop is worker.Worker's.

  step n   the batch's windows are ordered worker by worker (worker w's are its symmetry
           groups' windows, topology.assign_windows(N-1, batch_size)[w], as MPI rank w+1 would
           take), and the kernel gets the per-worker window counts: kernel thread w does the
           row-local work (embedding, LayerNorm, GEMM rows, GELU, attention) of exactly worker
           w's windows with its own activation rows. Weight gradients are split by output rows
           among the threads, each row summed over all windows in a fixed order (no mutex, no
           float atomics), so the step writes the summed gradient of the whole batch. Then one
           clip by the global norm and one AdamW on the replica (kernel threads by ranges).

The loss sequence equals MPI mode's to float rounding (the step invariant: each window's token
gradients are scaled by 1 / the global token count, and summed). To the command loop the
replica is the one worker of a one-worker group (threads.ThreadWorkerComm): its evaluation
covers every validation window, and nothing is gathered before a SAVE.
"""
import numpy as np

from mpitrain import optim
from mpitrain.topology import assign_windows
from mpitrain.trainer.messages import STEP, Report
from mpitrain.trainer.process import injected_nonfinite, trace_files
from mpitrain.trainer.worker import Worker, finite_step


class ThreadWorker(Worker):
    """num_workers: the kernel threads of the replica, one per worker."""

    def __init__(self, plan, comm, num_workers: int):
        super().__init__(plan, comm, rank=1)
        m = self.model
        m.threads = num_workers                      # kernel thread w = worker w
        comm.thread_windows = m.thread_windows
        shares = assign_windows(num_workers, self.tc.batch_size)
        self.order = np.array([j for share in shares for j in share], np.int64)  # [B]
        self.partition = [len(share) for share in shares]
        self.shares = shares
        self.traces = trace_files(range(num_workers))   # one trace file per worker

    def _train_step(self, command) -> None:
        m, tc = self.model, self.tc
        ids = command.windows[self.order]            # global window ids, worker by worker
        for w, share in enumerate(self.shares):
            self._trace(w, command.step, command.windows[share])
        x, y = self.tokens.windows(ids, tc.seq_len)   # int32 [B, T]
        loss = m.forward_backward(x, y, grad_scale=self.scale, partition=self.partition)
        if injected_nonfinite(command.step):
            loss = float("nan")
        norm = optim.grad_norm(m)   # clip + AdamW run on the kernel's work parts
        self.comm.report(Report(STEP, command.step, loss, norm))
        if finite_step(loss, norm):
            optim.update(m, lr=command.lr, step=command.step, norm=norm,
                         **optim.train_settings(tc))
