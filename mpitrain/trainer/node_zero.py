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
import math
import os
import socket
import sys
import time
from collections import deque

import numpy as np

from mpitrain import exits, schedule
from mpitrain.trainer import peak, sampling
from mpitrain.trainer.hierarchy import traffic_statistics
from mpitrain.trainer.messages import EVAL, KIND_NAMES, SAVE, STEP, STOP, Command
from mpitrain.trainer.process import injected_fault, peak_rss_kib
from mpitrain.trainer.runlog import RunLog, fmt_duration
from mpitrain.trainer.saver import SaveFailed, Saver
from mpitrain.trainer.signals import install_signals
from mpitrain.trainer.stall import StallWatch, process_state
from mpitrain.trainer.waiting import TestPending, wait_pending

ACTIVITY = {STEP: "training", EVAL: "evaluating after step {step}",
            SAVE: "saving a checkpoint of step {step}"}   # heartbeat.json's "activity"
LOOKAHEAD = 2   # STEP commands issued beyond the last reported step: the workers never wait
                # for Node Zero's reaction to a report


class NodeZero:
    def __init__(self, plan, link, ranks: list, dataset, checkpoint=None, header_extra="",
                 stall_timeout=None, machines=None):
        """ranks: [(host, pid)] of every rank (Node Zero first); dataset: the open Dataset;
        checkpoint: the loaded Checkpoint on resume; stall_timeout: --stall-timeout (stall.py);
        machines: each rank's machine (socket.gethostname()) where the launcher named its host
        otherwise (`-hosts nodea,nodeb` on one machine), else None."""
        from mpitrain.model import Model

        self.plan = plan
        self.link = link
        self.ranks = ranks
        self.machines = machines or [h for h, _ in ranks]
        self.tc = plan.train_config
        self.tokenizer = dataset.tokenizer
        val = dataset.stream("val")   # only the prompt's tokens are read
        self.prompt = sampling.sample_prompt(val.read(0, sampling.PROMPT_TOKENS),
                                             self.tokenizer.eod_id, self.tc.sample_prompt,
                                             self.tokenizer)
        val.close()
        self.model = Model(plan.model_config, seed=self.tc.seed, threads=1)
        self.checkpoint = checkpoint
        self.header_extra = header_extra
        self.stop_signal = None       # set by request_stop (signal handler)
        self.stop_rank = 0            # the rank that received it (a worker forwards its own)
        self.fault = None             # the one line of a stop by fault (exit status 3)
        self.bad_steps = 0            # steps in a row with a non-finite loss or gradient norm
        self.unsaved = None           # the SaveFailed of the last save, with --on-save-error retry
        self.stop_announced = False
        self.tokens_per_step = self.tc.batch_size * self.tc.seq_len
        self.stall = StallWatch(stall_timeout)
        self.last_checkpoint = plan.resume_path   # the newest checkpoint written or resumed

    # --- called from a signal handler: only set a flag ---------------------------------------
    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    @property
    def exit_status(self) -> int:
        """The status of a run that ended in order (mpitrain/exits.py): a fault's before a
        signal's."""
        if self.fault is not None:
            return exits.FAULT
        return exits.OK if self.stop_signal is None else exits.signalled(self.stop_signal)

    # --- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        p, tc = self.plan, self.tc
        os.makedirs(p.run_dir, exist_ok=True)   # vocab.txt: written by the plan (rundir.py)
        self.log = RunLog(p.run_dir, self.ranks, p.total_steps, p.start_step, p.stop_step,
                          quiet=p.quiet, progress=p.progress, log_every=p.log_every)
        self.saver = Saver(p.run_dir, tc.keep_last)
        self._header()
        self.done = p.start_step           # last reported step
        self.issued = p.start_step         # last issued STEP
        self.last_command = (STEP, p.start_step)
        self.positions = {p.start_step: p.position}
        self.last_checkpoint = p.resume_path
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
        if self.fault is None and self.unsaved is not None:   # retried to the end in vain
            self.fault = (f"stopped after step {self.done}: the last checkpoint could not be "
                          f"written: {self.unsaved.message}")
        if self.fault is not None:
            self._fault_end()
        own = (*self.model.counters(), peak_rss_kib())
        counters = self._wait(self.link.gather_counters(own)).result
        stats = self._statistics(wall, counters)
        self._wait(self.link.release())
        self.log.close()
        return stats

    # --- issuing -----------------------------------------------------------------------------
    def _issue(self, command: Command) -> None:
        self.link.send_command(command)
        self.stall.touch()
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
        if self.stop_signal is None:
            forwarded = self.link.poll_stop()
            if forwarded is not None:
                self.stop_signal, self.stop_rank = forwarded
        if self.stop_signal is not None and not self.stop_announced:
            self.stop_announced = True
            where = f" (received by rank {self.stop_rank})" if self.stop_rank else ""
            self.log.event("signal", f"signal {self.stop_signal}{where}: saving a checkpoint "
                           f"after step {self.issued} and stopping", signal=self.stop_signal,
                           rank=self.stop_rank, step=self.issued)
            self._stop_now()
        stalled = self.stall.check(self.link.progress())
        if stalled is not None:
            self._stalled(*stalled)
        written = self.saver.finished()
        if isinstance(written, SaveFailed):
            self._save_failed(written)
        elif written is not None:
            self.last_checkpoint, self.unsaved = written.path, None
            self.log.event("checkpoint", f"checkpoint written: {written.path} "
                           f"({written.seconds:.2f} s)", step=written.step, path=written.path,
                           seconds=written.seconds, removed=written.removed)

    # --- faults: the run stops, resumable from its newest sound checkpoint ---------------------
    def _save_failed(self, failed) -> None:
        retry = not failed.nonfinite and self.plan.on_save_error == "retry"
        self.log.event("save_error", f"checkpoint of step {failed.step} failed: "
                       f"{failed.message}" + ("; training on, the next save tries again"
                                              if retry else ""),
                       step=failed.step, path=failed.path, error=failed.message)
        if retry:
            self.unsaved = failed
        else:
            self._stop_by_fault(failed.message)

    def _stop_by_fault(self, reason: str) -> None:
        """Stop after the steps already issued, without saving again: a later checkpoint could
        only be worse than the newest sound one, which is where --resume auto continues."""
        if self.fault is not None:
            return
        self.fault = f"stopped after step {self.done}: {reason}"   # completed by _fault_end
        if not self.finished_issuing:
            self._issue(Command(STOP, self.issued))
            self.finished_issuing = True

    # --- reports -----------------------------------------------------------------------------
    def _on_step(self, r) -> None:
        self.stall.started = True
        if injected_fault(0, r.step):
            raise RuntimeError(f"injected fault (MPITRAIN_FAULT) at step {r.step}")
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        self.done = r.step
        self.losses[r.step] = r.loss
        self._prune_history()
        lr = schedule.lr_at(r.step, self.tc.lr, self.tc.warmup, self.plan.total_steps)
        self.log.step_done(r.step, r.loss, lr, r.grad_norm, self.tokens_per_step, dt,
                           (self.plan.stop_step - r.step) * self.step_time)
        if math.isfinite(r.loss) and math.isfinite(r.grad_norm):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        limit = self.tc.max_bad_steps
        self.log.event("nonfinite", f"step {r.step}: loss {r.loss} and gradient norm "
                       f"{r.grad_norm}: the update was skipped ({self.bad_steps} such step(s) "
                       f"in a row; the run stops at {limit})", step=r.step,
                       bad_steps=self.bad_steps)
        if self.bad_steps >= limit:
            self._stop_by_fault(f"{self.bad_steps} steps in a row had a non-finite loss or "
                                f"gradient norm (max_bad_steps {limit}; a lower --lr may help)")

    def _fault_end(self) -> None:
        """The fault's one line, once the last write has ended: where to continue from."""
        where = (f"the newest sound checkpoint is {self.last_checkpoint}"
                 if self.last_checkpoint else "no checkpoint was written")
        self.fault += f"; {where}; continue with --resume auto once the cause is fixed"
        self.log.metrics(event="fault", time=time.time(), step=self.done, message=self.fault,
                         checkpoint=self.last_checkpoint)
        self.log.log(f"mpitrain: {self.fault}")

    def _prune_history(self) -> None:
        """Forget per-step records nothing will ask for again, so memory stays flat: the data
        positions before the oldest step still awaiting its report (a SAVE needs its step's)
        and the losses of reported steps before it."""
        oldest = min((c.step for c in self.queue), default=self.done)
        oldest = min(oldest, self.done)
        for table in (self.positions, self.losses):
            while table and next(iter(table)) < oldest:
                del table[next(iter(table))]

    def _on_eval(self, r) -> None:
        self._wait_saver()
        self._wait(self.link.receive_state([self.model.param_buffer]))
        if self.fault is not None:   # the run is stopping: nothing more to show
            return
        self.val_loss = r.loss
        if math.isfinite(r.loss) and (self.best_val_loss is None or r.loss < self.best_val_loss):
            self.best_val_loss = r.loss
        self.log.set_activity(f"writing the sample of step {r.step}")
        ids = sampling.generate(self.model, self.prompt, self.tc.seed, r.step,
                                context=self.tc.seq_len, new_tokens=self.tc.sample_tokens,
                                temperature=self.tc.sample_temperature)
        self.log.evaluation(r.step, r.loss, self.tokenizer.decode(self.prompt),
                            self.tokenizer.decode(ids))

    def _on_save(self, r) -> None:
        self._wait_saver()
        m = self.model
        self._wait(self.link.receive_state([m.param_buffer, *m.optimizer_arenas]))
        if self.fault is not None:   # stopping by fault: the newest sound checkpoint stays it
            return
        position = self.positions[r.step]
        self.saver.start(
            r.step, model_config=self.plan.model_config, train_config=self.tc,
            params={n: m.params[n] for n in m.param_names}, optimizer_state=m.optimizer_state,
            epoch=position.epoch, data_position=position, rng_state={"seed": self.tc.seed},
            train_loss=self.losses.get(r.step), val_loss=self.val_loss,
            tokenizer=self.tokenizer,
            extra={"best_val_loss": self.best_val_loss, "total_steps": self.plan.total_steps,
                   "ranks": len(self.ranks), "workers": self.link.num_workers,
                   **(self.plan.extra or {})})

    def _wait_saver(self) -> None:
        self.stall.paused = True   # the workers may idle meanwhile: not a stall
        self._wait(TestPending(lambda: (not self.saver.busy(), None)))
        self.stall.touch()
        self.stall.paused = False
        self._housekeeping()

    def _stalled(self, quiet: float, behind: list) -> None:
        """No progress for `quiet` seconds: name the culprit, keep what is saved, and end the
        run with a Fault (status 3). The workers' state (the parameters, and the optimizer
        moments spread over them in MPI mode) is what a checkpoint needs, and a stalled worker
        holds part of it, so no new checkpoint can be made; a checkpoint already being written
        (from Node Zero's own copy) is finished first."""
        me = socket.gethostname()
        local = [w for w in range(len(self.link.progress()))
                 if self.machines[w + 1] == me and process_state(self.ranks[w + 1][1]) == "T"]
        culprits = local or behind
        names = ", ".join(f"rank {w + 1} (host {self.ranks[w + 1][0]}, pid "
                          f"{self.ranks[w + 1][1]})" for w in culprits)
        how = "is stopped (state T)" if local else "made no progress"
        self.log.set_activity("stalled")
        self.stall.paused = True
        deadline = time.monotonic() + max(60.0, self.stall.limit())
        while self.saver.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        written = None if self.saver.busy() else self.saver.finished()
        if written is not None:
            self.last_checkpoint = written[1]
        newest = (f"the newest checkpoint is {self.last_checkpoint}"
                  if self.last_checkpoint else "there is no checkpoint yet")
        message = (f"stalled: {names} {how}; no worker progressed for {quiet:.0f} s (limit "
                   f"{self.stall.limit():.0f} s, --stall-timeout) after step {self.done}. No "
                   f"checkpoint can be saved: the workers' state is needed and the stalled "
                   f"worker holds part of it; {newest}"
                   + ("; continue with --resume auto" if self.last_checkpoint else ""))
        self.log.metrics(event="stall", time=time.time(), step=self.done, seconds=quiet,
                         ranks=[w + 1 for w in culprits],
                         pids=[self.ranks[w + 1][1] for w in culprits],
                         checkpoint=self.last_checkpoint)
        self.log.log(f"mpitrain: {message}")
        fault = exits.Fault(message)
        fault.stopped_pids = [self.ranks[w + 1][1] for w in local]  # to end with the job
        raise fault

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
        for warning in p.warnings:   # said once, on stderr even with --quiet
            self.log.log(f"warning: {warning}")
            print(f"mpitrain: warning: {warning}", file=sys.stderr, flush=True)
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
                 + ", ".join(f"{r}: ({c}, {w})" for r, (c, w) in enumerate(stats["counters"])),
                 "peak RSS by rank (MB): " + ", ".join(f"{r}: {mb:.0f}" for r, mb in
                                                       enumerate(stats["peak_rss_mb"]))]
        traffic, line = traffic_statistics(counters, steps)
        stats.update(traffic)
        lines += [line] if line else []
        self.log.metrics(event="end", time=time.time(), **stats)
        self.log.say("\n".join(lines))
        return stats


def run_node_zero(node_zero: NodeZero, abort) -> dict:
    """Node Zero's run, the same in MPI and thread mode: the first Ctrl-C/SIGTERM/SIGHUP asks it
    to save and stop, a second calls abort (signals.install_signals). Returns the statistics;
    node_zero.exit_status is then the run's exit status."""
    install_signals(node_zero.request_stop, abort)
    stats = node_zero.run()
    if node_zero.stop_signal is not None:  # said even with --quiet
        print(f"mpitrain: stopped by signal {node_zero.stop_signal} after step "
              f"{node_zero.done}; continue with --resume auto", flush=True)
    return stats


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
