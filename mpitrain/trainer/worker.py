"""The workers' command loop, the same in MPI and thread mode: STEP, EVAL, SAVE and STOP as
Node Zero issues them (node_zero.py has the protocol), and the evaluation.

A mode's worker subclasses `Worker` and supplies the training step (`_train_step`) and whatever
its SAVE needs first (`_before_save`): mpi_worker.MPIWorker (one process per worker, the
optimizer state sharded among them) and thread_worker.ThreadWorker (one replica whose kernel
threads are the workers).

The step invariant (docs/DESIGN.md): every forward_backward runs with grad_scale = 1 / (the
global batch's target tokens), so a worker's gradient is its share of the *sum* of token
gradients already divided by the global count; summed over the workers it is the gradient of
the global mean loss, whatever the number of workers.

The transport (`comm`) is what the loop needs of it: `index`, `num_workers`, `is_lead`,
`writes_parameters`, next_command, report, send_state, receive_state, parameters_ready,
allreduce_sum, send_counters and finish (comm.MPIWorkerComm, threads.ThreadWorkerComm).
"""
import json
import math

import numpy as np

from mpitrain.topology import assign_windows
from mpitrain.trainer.messages import EVAL, SAVE, STEP, STOP, Report
from mpitrain.trainer.process import injected_fault, injected_stall, peak_rss_kib

# Windows per kernel call: a worker with more (few workers, large batches) runs several calls
# accumulating gradients, so its activations stay those of 8 windows (a seed-preset worker at
# mpirun -n 2 or 3 otherwise held 32 or 16 windows of activations: 1.0-1.25 GB).
MICRO_WINDOWS = 8


def finite_step(loss: float, norm: float) -> bool:
    """Whether a step's update is applied: a non-finite loss or gradient norm skips it, leaving
    the parameters and the optimizer state untouched. The step still counts (its windows and
    learning-rate step are consumed), so a resume stays bitwise; Node Zero logs it and stops
    the run after max_bad_steps such steps in a row."""
    return math.isfinite(loss) and math.isfinite(norm)


class Worker:
    """rank: this worker's name in MPITRAIN_FAULT; arenas: (parameters, gradients) float32
    arenas for the model, or (None, None) for its own."""

    def __init__(self, plan, comm, rank: int, arenas=(None, None)):
        from mpitrain.dataset import Dataset
        from mpitrain.model import Model

        self.plan, self.comm, self.rank = plan, comm, rank
        tc = self.tc = plan.train_config
        params, grads = arenas
        self.model = Model(plan.model_config, seed=tc.seed, threads=plan.threads_per_rank,
                           param_arena=params, grad_arena=grads,
                           initialize=comm.writes_parameters)
        ds = Dataset.open(plan.dataset_path, check_ids=False)  # Node Zero checked it
        # The training stream is read in place (mapped: one copy per node, in the page cache);
        # each step reads just its windows.
        self.tokens = ds.stream("train")
        # j in [0, batch_size): the positions in each step's batch that belong to our groups.
        self.share = np.array(assign_windows(comm.num_workers, tc.batch_size)[comm.index],
                              np.int64)
        eval_share = assign_windows(comm.num_workers, len(plan.eval_ids))[comm.index]
        val = ds.stream("val")
        self.eval_x, self.eval_y = val.windows(plan.eval_ids[eval_share], tc.seq_len)
        val.close()
        self.scale = 1.0 / (tc.batch_size * tc.seq_len)
        self._sums = np.zeros(2, np.float64)
        self.traces = {}   # test hook: {worker index: trace file} (process.trace_files)

    def run(self) -> None:
        m = self.model
        if self.plan.resume_path is not None:  # Node Zero sends the state of every resume,
            # step 0's too; with one shared parameter arena, one worker writes it (the others'
            # copy lands in their gradient buffers, free until the first step)
            params = m.param_buffer if self.comm.writes_parameters else m.grad_buffer
            self.comm.receive_state([params, *m.optimizer_arenas])
        self.comm.parameters_ready()
        while True:
            self.comm.progress()
            command = self.comm.next_command()
            self.comm.progress()
            injected_stall(self.rank, command.step)
            if injected_fault(self.rank, command.step) and command.kind == STEP:
                raise RuntimeError(f"injected fault (MPITRAIN_FAULT) at step {command.step}")
            if command.kind == STEP:
                self._train_step(command)
            elif command.kind == EVAL:
                self._evaluate(command.step)
            elif command.kind == SAVE:
                self._before_save()
                if self.comm.is_lead:
                    self.comm.report(Report(SAVE, command.step))
                    self.comm.send_state([m.param_buffer, *m.optimizer_arenas])
            elif command.kind == STOP:
                break
        self.comm.send_counters((*m.counters(), peak_rss_kib()))
        for f in self.traces.values():
            f.close()
        self.comm.finish()

    def _train_step(self, command) -> None:
        """Train the windows of command (a STEP); the lead reports (loss, gradient norm)."""
        raise NotImplementedError

    def _before_save(self) -> None:
        """Make the parameters and both Adam moments whole on the lead worker."""

    def _trace(self, worker: int, step: int, ids: np.ndarray) -> None:
        f = self.traces.get(worker)
        if f is not None:
            f.write(json.dumps({"step": step, "windows": ids.tolist()}) + "\n")

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
