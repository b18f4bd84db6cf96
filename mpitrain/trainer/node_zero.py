"""Node Zero: the schedule, evaluation, samples, checkpoints, logs, signals and the stop.

`run_node_zero` runs it in either mode, with the signals of signals.py.

Node Zero never computes a training batch. It talks to the workers only through a WorkerLink
(comm.py), so the same logic serves MPI mode and thread mode. The protocol, in command order:

  STEP n   every worker trains its groups' windows of step n; the lead worker reports
           (loss, grad_norm). Node Zero keeps LOOKAHEAD steps issued beyond the last report,
           so the workers find their next command waiting when they finish a step.
  EVAL n   after step n (and before training starts, n = 0): validation loss over the fixed
           windows, spread over the workers; the lead reports it, then sends the parameters,
           from which Node Zero generates the sample.
  SAVE n   the lead reports, sends parameters and every optimizer state arena (the state
           tensors mpitrain.optim.ADAMW declares), and trains on; Node Zero
           writes the checkpoint in a background thread.
  STOP     the last command: workers send their kernel counters and peak RSS, and wait to be
           released.

While it waits, Node Zero sleeps (waiting.wait_pending: 1 ms growing to 20 ms), refreshes
heartbeat.json and reacts to a stop request (a signal): it then issues EVAL and SAVE for the
last issued step and STOP, so the run ends after at most LOOKAHEAD more steps with a checkpoint.
"""
import os
import socket
import time
from collections import deque

import numpy as np

from mpitrain import formats, schedule
from mpitrain.trainer import peak, sampling
from mpitrain.trainer.messages import EVAL, KIND_NAMES, SAVE, STEP, STOP, Command
from mpitrain.trainer.process import injected_fault, peak_rss_kib
from mpitrain.trainer.runlog import RunLog, fmt_duration
from mpitrain.trainer.saver import Saver
from mpitrain.trainer.signals import install_signals
from mpitrain.trainer.waiting import TestPending, wait_pending

ACTIVITY = {STEP: "training", EVAL: "evaluating after step {step}",
            SAVE: "saving a checkpoint of step {step}"}   # heartbeat.json's "activity"
LOOKAHEAD = 2   # STEP commands issued beyond the last reported step: the workers never wait
                # for Node Zero's reaction to a report


class NodeZero:
    def __init__(self, plan, link, ranks: list, dataset, checkpoint=None, header_extra=""):
        """ranks: [(host, pid)] of every rank (Node Zero first); dataset: the open Dataset;
        checkpoint: the loaded Checkpoint on resume."""
        from mpitrain.model import Model

        self.plan = plan
        self.link = link
        self.ranks = ranks
        self.tc = plan.train_config
        self.tokenizer = dataset.tokenizer
        val = dataset.stream("val")   # only the prompt's tokens are read
        self.prompt = sampling.sample_prompt(val.read(0, sampling.PROMPT_TOKENS),
                                             self.tokenizer.eod_id)
        val.close()
        self.model = Model(plan.model_config, seed=self.tc.seed, threads=1)
        self.checkpoint = checkpoint
        self.header_extra = header_extra
        self.stop_signal = None       # set by request_stop (signal handler)
        self.stop_announced = False
        self.tokens_per_step = self.tc.batch_size * self.tc.seq_len

    # --- called from a signal handler: only set a flag ---------------------------------------
    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    # --- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        p, tc = self.plan, self.tc
        os.makedirs(p.run_dir, exist_ok=True)
        self.tokenizer.save_txt(os.path.join(p.run_dir, formats.RUN_VOCAB_TXT))
        self.log = RunLog(p.run_dir, self.ranks, p.total_steps, p.start_step, p.stop_step,
                          quiet=p.quiet)
        self.saver = Saver(p.run_dir, tc.keep_last)
        self._header()
        self.done = p.start_step           # last reported step
        self.issued = p.start_step         # last issued STEP
        self.last_command = (STEP, p.start_step)
        self.positions = {p.start_step: p.position}
        self.losses = {}
        self.val_loss = None
        self.best_val_loss = p.best_val_loss
        self.queue = deque()               # commands awaiting their report, in order
        self.finished_issuing = False
        if self.checkpoint is not None:
            self._send_resume_state()
        if p.start_step == 0:
            self._issue(Command(EVAL, 0))
            self._issue(Command(SAVE, 0))
        self.t_start = self.t_last = time.perf_counter()
        self.step_time = None              # smoothed seconds per step
        self._issue_steps()
        while self.queue:
            command = self.queue[0]
            self.log.set_activity(ACTIVITY[command.kind].format(step=command.step))
            report = self._wait(self.link.next_report()).result
            if (report.kind, report.step) != (command.kind, command.step):
                raise RuntimeError(f"protocol error: expected the report of "
                                   f"{KIND_NAMES[command.kind]} {command.step}, got "
                                   f"{KIND_NAMES.get(report.kind, report.kind)} {report.step}")
            self.queue.popleft()
            {STEP: self._on_step, EVAL: self._on_eval, SAVE: self._on_save}[report.kind](report)
            self._issue_steps()
        wall = time.perf_counter() - self.t_start
        self._wait_saver()
        own = (*self.model.counters(), peak_rss_kib())
        counters = self._wait(self.link.gather_counters(own)).result
        stats = self._statistics(wall, counters)
        self._wait(self.link.release())
        self.log.close()
        return stats

    # --- issuing -----------------------------------------------------------------------------
    def _issue(self, command: Command) -> None:
        self.link.send_command(command)
        self.last_command = (command.kind, command.step)
        if command.kind != STOP:
            self.queue.append(command)

    def _issue_steps(self) -> None:
        if self.finished_issuing:
            return
        p, tc = self.plan, self.tc
        while self.issued < p.stop_step and self.issued - self.done < LOOKAHEAD:
            n = self.issued + 1
            ids, after = schedule.next_batch(self.positions[self.issued], tc.batch_size,
                                             p.num_windows, tc.seed)
            lr = schedule.lr_at(n, tc.lr, tc.warmup, p.total_steps)
            self.positions[n] = after
            self._issue(Command(STEP, n, lr, ids))
            self.issued = n
            final = n == p.stop_step
            if n % tc.eval_every == 0 or final:
                self._issue(Command(EVAL, n))
            if n % tc.save_every == 0 or final:
                self._issue(Command(SAVE, n))
        if self.issued == p.stop_step:
            self._issue(Command(STOP, self.issued))
            self.finished_issuing = True

    def _stop_now(self) -> None:
        """After a signal: an evaluation (unless just issued) and a checkpoint of the last
        issued step, then STOP."""
        if self.finished_issuing:
            return
        if self.last_command not in ((EVAL, self.issued), (SAVE, self.issued)):
            self._issue(Command(EVAL, self.issued))
        if self.last_command != (SAVE, self.issued):
            self._issue(Command(SAVE, self.issued))
        self._issue(Command(STOP, self.issued))
        self.finished_issuing = True

    # --- waiting -----------------------------------------------------------------------------
    def _wait(self, pending):
        return wait_pending(pending, self._housekeeping)

    def _housekeeping(self) -> None:
        self.log.heartbeat()
        if self.stop_signal is not None and not self.stop_announced:
            self.stop_announced = True
            self.log.event("signal", f"signal {self.stop_signal}: saving a checkpoint after "
                           f"step {self.issued} and stopping", signal=self.stop_signal,
                           step=self.issued)
            self._stop_now()
        written = self.saver.finished()
        if written is not None:
            step, path, seconds, removed = written
            self.log.event("checkpoint", f"checkpoint written: {path} ({seconds:.2f} s)",
                           step=step, path=path, seconds=seconds, removed=removed)

    # --- reports -----------------------------------------------------------------------------
    def _on_step(self, r) -> None:
        if injected_fault(0, r.step):
            raise RuntimeError(f"injected fault (MPITRAIN_FAULT) at step {r.step}")
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        self.done = r.step
        self.losses[r.step] = r.loss
        lr = schedule.lr_at(r.step, self.tc.lr, self.tc.warmup, self.plan.total_steps)
        self.log.step_done(r.step, r.loss, lr, r.grad_norm, self.tokens_per_step / dt,
                           (self.plan.stop_step - r.step) * self.step_time)

    def _on_eval(self, r) -> None:
        self._wait_saver()
        self._wait(self.link.receive_state([self.model.param_buffer]))
        self.val_loss = r.loss
        if self.best_val_loss is None or r.loss < self.best_val_loss:
            self.best_val_loss = r.loss
        self.log.set_activity(f"writing the sample of step {r.step}")
        ids = sampling.generate(self.model, self.prompt, self.tc.seed, r.step,
                                context=self.tc.seq_len)
        self.log.evaluation(r.step, r.loss, self.tokenizer.decode(self.prompt),
                            self.tokenizer.decode(ids))

    def _on_save(self, r) -> None:
        self._wait_saver()
        m = self.model
        self._wait(self.link.receive_state([m.param_buffer, *m.optimizer_arenas]))
        position = self.positions[r.step]
        self.saver.start(
            r.step, model_config=self.plan.model_config, train_config=self.tc,
            params={n: m.params[n] for n in m.param_names}, optimizer_state=m.optimizer_state,
            epoch=position.epoch, data_position=position, rng_state={"seed": self.tc.seed},
            train_loss=self.losses.get(r.step), val_loss=self.val_loss,
            tokenizer=self.tokenizer,
            extra={"best_val_loss": self.best_val_loss, "total_steps": self.plan.total_steps,
                   "ranks": len(self.ranks), "workers": self.link.num_workers})

    def _wait_saver(self) -> None:
        self._wait(TestPending(lambda: (not self.saver.busy(), None)))
        self._housekeeping()

    def _send_resume_state(self) -> None:
        ck, m = self.checkpoint, self.model
        for name in m.param_names:
            m.params[name][...] = ck.params[name]
        for state, views in m.optimizer_state.items():
            for name in m.param_names:
                views[name][...] = ck.optimizer_state[state][name]
        self.checkpoint = None  # its arrays can go
        self._wait(self.link.send_state([m.param_buffer, *m.optimizer_arenas]))
        self.log.event("resume", f"resumed from {self.plan.resume_path} at step "
                       f"{self.plan.start_step}", path=self.plan.resume_path,
                       step=self.plan.start_step)

    # --- text --------------------------------------------------------------------------------
    def _header(self) -> None:
        p, tc, mc = self.plan, self.tc, self.plan.model_config
        lines = [f"mpitrain train: preset {p.preset}, run directory {p.run_dir}",
                 f"dataset {p.dataset_path}: {p.num_windows} training windows, "
                 f"{p.num_val_windows} validation windows of {tc.seq_len} + 1 tokens",
                 f"model {mc.to_dict()}",
                 f"parameters {self.model.num_params:,}",
                 f"training {tc.to_dict()}",
                 f"steps {p.start_step + 1}..{p.stop_step} of a schedule planned for "
                 f"{p.total_steps} steps ({self.tokens_per_step} tokens a step)",
                 f"world: {len(self.ranks)} ranks = Node Zero + {self.link.num_workers} "
                 f"worker(s), {p.threads_per_rank} kernel thread(s) per worker"]
        lines += [f"  rank {r}: host {h} pid {pid}" + (" (Node Zero)" if r == 0 else "")
                  for r, (h, pid) in enumerate(self.ranks)]
        if self.header_extra:
            lines.append(self.header_extra)
        self.log.log("\n".join(lines))
        self.log.metrics(event="start", time=time.time(), preset=p.preset,
                         model_config=mc.to_dict(), train_config=tc.to_dict(),
                         num_params=self.model.num_params, ranks=len(self.ranks),
                         workers=self.link.num_workers, start_step=p.start_step,
                         stop_step=p.stop_step, total_steps=p.total_steps,
                         num_windows=p.num_windows,
                         hosts=[h for h, _ in self.ranks], pids=[pid for _, pid in self.ranks],
                         node_zero_host=socket.gethostname())
        if not p.quiet:
            print(f"mpitrain: {self.model.num_params:,} parameters, steps "
                  f"{p.start_step + 1}..{p.stop_step}, {len(self.ranks)} ranks "
                  f"(Node Zero + {self.link.num_workers} workers); logs in {p.run_dir}",
                  flush=True)

    def _statistics(self, wall: float, counters: np.ndarray) -> dict:
        p, tc = self.plan, self.tc
        steps = self.done - p.start_step
        tokens = steps * self.tokens_per_step
        tokens_per_s = tokens / wall if wall > 0 else 0.0
        gflops = tokens_per_s * peak.flops_per_token(p.model_config, tc.seq_len) / 1e9
        sgemm = peak.sgemm_peak_gflops()
        stats = {"wall_s": wall, "steps": steps, "last_step": self.done, "tokens": tokens,
                 "tokens_per_s": tokens_per_s, "gflops": gflops, "sgemm_peak_gflops": sgemm,
                 "fraction_of_sgemm_peak": gflops / sgemm,
                 "final_val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                 "counters": counters[:, :2].tolist(),
                 "peak_rss_mb": [round(k / 1024, 1) for k in counters[:, 2].tolist()],
                 "windows_per_step": tc.batch_size}
        lines = [f"done: {steps} steps in {fmt_duration(wall)} ({wall:.1f} s), {tokens:,} tokens, "
                 f"{tokens_per_s:,.0f} tokens/s",
                 f"{gflops:.2f} GFLOP/s = {100 * gflops / sgemm:.1f}% of the SGEMM peak "
                 f"measured now ({sgemm:.1f} GFLOP/s on {os.cpu_count()} CPU(s))",
                 f"validation loss: final {_fmt(self.val_loss)}, best {_fmt(self.best_val_loss)}",
                 "kernel counters (training calls, windows) by rank: "
                 + ", ".join(f"{r}: ({c}, {w})" for r, (c, w, _) in enumerate(counters.tolist())),
                 "peak RSS by rank (MB): " + ", ".join(f"{r}: {mb:.0f}" for r, mb in
                                                       enumerate(stats["peak_rss_mb"]))]
        self.log.metrics(event="end", time=time.time(), **stats)
        self.log.say("\n".join(lines))
        return stats


def run_node_zero(node_zero: NodeZero, abort) -> dict:
    """Node Zero's run, the same in MPI and thread mode: the first Ctrl-C/SIGTERM asks it to
    save and stop, a second calls abort (signals.install_signals). Returns the statistics."""
    install_signals(node_zero.request_stop, abort)
    stats = node_zero.run()
    if node_zero.stop_signal is not None:  # said even with --quiet
        print(f"mpitrain: stopped by signal {node_zero.stop_signal} after step "
              f"{node_zero.done}; continue with --resume auto", flush=True)
    return stats


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
