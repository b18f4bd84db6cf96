"""A worker: its groups' windows of every step in the C kernel, the gradient sum among the
workers, clipping by the global norm, AdamW.

The step invariant (DESIGN.md): each worker's forward_backward runs with grad_scale = 1 / (the
global batch's target tokens), so its gradient is its share of the *sum* of token gradients
already divided by the global count; the sum over workers (an in-place Allreduce on the kernel's
gradient arena, no copy) is then the gradient of the global mean loss, whatever the number of
workers. Every replica clips and applies AdamW to the identical reduced gradient, so the
replicas stay equal. A worker whose groups are empty in a step contributes zeros.

Works with any transport offering MPIWorkerComm's methods (next_command, allreduce_sum, report,
send_state, receive_state, send_counters, finish).
"""
import json
import os

import numpy as np

from mpitrain import schedule
from mpitrain.topology import assign_windows
from mpitrain.trainer.messages import EVAL, SAVE, STEP, STOP, Report
from mpitrain.trainer.node_zero import injected_fault


class Worker:
    def __init__(self, plan, comm, rank: int):
        from mpitrain.dataset import Dataset
        from mpitrain.model import Model

        self.plan, self.comm, self.rank = plan, comm, rank
        tc = self.tc = plan.train_config
        self.model = Model(plan.model_config, seed=tc.seed, threads=plan.threads_per_rank)
        ds = Dataset.open(plan.dataset_path)
        # The whole training stream stays in memory: any window can fall to this worker.
        self.tokens = np.ascontiguousarray(ds.split_tokens("train"))
        # j in [0, batch_size): the positions in each step's batch that belong to our groups.
        self.share = np.array(assign_windows(comm.num_workers, tc.batch_size)[comm.index],
                              np.int64)
        eval_share = assign_windows(comm.num_workers, len(plan.eval_ids))[comm.index]
        self.eval_x, self.eval_y = schedule.gather_windows(
            ds.split_tokens("val"), plan.eval_ids[eval_share], tc.seq_len)
        self.scale = 1.0 / (tc.batch_size * tc.seq_len)
        self._sums = np.zeros(2, np.float64)
        trace_dir = os.environ.get("MPITRAIN_TRACE_WINDOWS")
        self.trace = None
        if trace_dir:  # test hook: record the windows this worker trains each step
            self.trace = open(os.path.join(trace_dir, f"worker_{comm.index}.jsonl"), "a",
                              buffering=1)

    def run(self) -> None:
        m = self.model
        if self.plan.start_step > 0:
            self.comm.receive_state([m.param_buffer, m.m_buffer, m.v_buffer])
        while True:
            command = self.comm.next_command()
            if injected_fault(self.rank, command.step) and command.kind == STEP:
                raise RuntimeError(f"injected fault (MPITRAIN_FAULT) at step {command.step}")
            if command.kind == STEP:
                self._train_step(command)
            elif command.kind == EVAL:
                self._evaluate(command.step)
            elif command.kind == SAVE:
                if self.comm.is_lead:
                    self.comm.report(Report(SAVE, command.step))
                    self.comm.send_state([m.param_buffer, m.m_buffer, m.v_buffer])
            elif command.kind == STOP:
                break
        self.comm.send_counters(m.counters())
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
            mean = m.forward_backward(x, y, grad_scale=self.scale)
            self._sums[0] = mean * x.size                 # sum of this worker's token losses
        else:
            m.grad_buffer[...] = 0.0
            self._sums[0] = 0.0
        self._sums[1] = 0.0
        self.comm.allreduce_sum(self._sums[:1])
        self.comm.allreduce_sum(m.grad_buffer)
        norm = m.clip_grad_norm(tc.clip) if tc.clip > 0 else m.grad_norm()
        if self.comm.is_lead:
            self.comm.report(Report(STEP, command.step, self._sums[0] * self.scale, norm))
        m.adamw_step(command.lr, command.step, beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps,
                     weight_decay=tc.weight_decay)

    def _evaluate(self, step: int) -> None:
        n = len(self.eval_x)
        loss_sum = 0.0
        chunk = max(1, len(self.share))   # no bigger than a training call: activations fit
        for a in range(0, n, chunk):
            x, y = self.eval_x[a:a + chunk], self.eval_y[a:a + chunk]
            loss_sum += self.model.loss(x, y) * x.size
        self._sums[0], self._sums[1] = loss_sum, n * self.tc.seq_len
        self.comm.allreduce_sum(self._sums)
        if self.comm.is_lead:
            self.comm.report(Report(EVAL, step, self._sums[0] / self._sums[1]))
            self.comm.send_state([self.model.param_buffer])
