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

from mpitrain import optim, schedule
from mpitrain.topology import assign_windows
from mpitrain.trainer.messages import STEP, Report
from mpitrain.trainer.process import trace_files
from mpitrain.trainer.worker import Worker


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
        # Clip and AdamW run on the kernel's default parts (min(threads, CPUs)); their results
        # do not depend on the thread count.
        self.opt_threads = m.work_parts
        self.full_segments = optim.decay_segments(m.param_shapes[n] for n in m.param_names)
        self.traces = trace_files(range(num_workers))   # one trace file per worker

    def _train_step(self, command) -> None:
        m, tc = self.model, self.tc
        ids = command.windows[self.order]            # global window ids, worker by worker
        for w, share in enumerate(self.shares):
            self._trace(w, command.step, command.windows[share])
        x, y = schedule.gather_windows(self.tokens, ids, tc.seq_len)   # int32 [B, T]
        loss = m.forward_backward(x, y, grad_scale=self.scale, partition=self.partition)
        if tc.clip > 0:   # as torch.nn.utils.clip_grad_norm_; a non-finite norm leaves grads
            norm = optim.clip_grad_norm(m.grad_buffer, tc.clip, threads=self.opt_threads)
        else:
            norm = optim.grad_norm(m.grad_buffer, threads=self.opt_threads)
        self.comm.report(Report(STEP, command.step, loss, norm))
        optim.adamw_step(m.param_buffer, m.grad_buffer, m.m_buffer, m.v_buffer, lr=command.lr,
                         step=command.step, beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps,
                         weight_decay=tc.weight_decay, segments=self.full_segments,
                         threads=self.opt_threads)
