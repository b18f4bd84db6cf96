"""What Node Zero writes about a run besides checkpoints: train.log, metrics.jsonl, heartbeat.json,
and what the person at the terminal sees (a progress bar on a terminal, plain lines otherwise).

metrics.jsonl holds one strict JSON object a line (a NaN or Inf is null): every step {"step", "loss", "lr", "grad_norm",
"tokens_per_s", "step_s", "time"} (tokens_per_s: the rate over the last RATE_WINDOW steps;
step_s: the seconds since the previous step's report), every evaluation {"step", "val_loss",
"val_ppl", "sample"}, and events
{"event": "start" | "resume" | "checkpoint" | "signal" | "end", ...} (docs/TRAINING.md lists
their fields). heartbeat.json is replaced atomically every few seconds: Node Zero's host,
every rank's PID, the last step, the time.
"""
import json
import math
import os
import socket
import sys
import time
from collections import deque

from mpitrain import atomic, formats
from mpitrain.progress import bar

HEARTBEAT_EVERY = 2.0   # s between heartbeat.json refreshes
PRINT_EVERY = 10.0      # s between plain progress lines when no --log-every is given
RATE_WINDOW = 10        # steps over which the tokens/s of a step line is measured
PROGRESS = ("bar", "lines", "none")   # --progress: a bar, step lines, or neither


class RunLog:
    def __init__(self, run_dir: str, ranks: list, total_steps: int, start_step: int,
                 stop_step: int, quiet: bool = False, progress: str = "lines",
                 log_every: int = 0):
        """ranks: [(host, pid)] by rank. progress: "bar" (a bar on stderr, shown even when it
        is not a terminal), "lines" (a step line every log_every steps, or every PRINT_EVERY s
        when log_every is 0; the first and last step always) or "none"; quiet: no terminal
        output at all."""
        self.run_dir = run_dir
        self.ranks = ranks
        self.stop_step = stop_step
        self.quiet = quiet
        self.progress = progress
        self.log_every = log_every
        self.start_step = start_step
        self._rate = deque(maxlen=RATE_WINDOW + 1)   # (time, step) of the newest reports
        self._rate.append((time.perf_counter(), start_step))
        self._metrics = open(os.path.join(run_dir, formats.METRICS), "a", buffering=1)
        self._log = open(os.path.join(run_dir, formats.TRAIN_LOG), "a", buffering=1)
        self._heartbeat_at = 0.0
        self._failed = set()   # files whose write failed (said once)
        self._printed_at = time.monotonic()
        self.step = start_step
        self.activity = "starting"   # what Node Zero is doing, for `mpitrain monitor`
        self.bar = bar(total=stop_step, desc="train", unit="step", initial=start_step,
                       enabled=progress == "bar" and not quiet, force=progress == "bar")
        self.bar_shown = not self.bar.disable
        self.heartbeat(force=True)

    # --- sinks -------------------------------------------------------------------------------
    def metrics(self, **record) -> None:
        """One strict JSON line: a NaN or Inf (a diverged step's loss) is written as null."""
        self._write(self._metrics, json.dumps(strict_json(record), allow_nan=False) + "\n")

    def _write(self, sink, text: str) -> None:
        """A line to a log file. A write error (a full disk) does not stop training: it is
        said once, and the checkpoints -- which do stop the run when they cannot be written
        (saver.py) -- are what must not be lost."""
        try:
            sink.write(text)
        except OSError as e:
            if sink.name not in self._failed:
                self._failed.add(sink.name)
                print(f"mpitrain: warning: cannot write {sink.name} ({e.strerror or e}); its "
                      f"lines are lost until the cause is fixed", file=sys.stderr, flush=True)

    def log(self, text: str) -> None:
        """train.log only."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in text.splitlines() or [""]:
            self._write(self._log, f"{stamp} {line}\n")

    def say(self, text: str) -> None:
        """train.log and the terminal (stdout, above the bar)."""
        self.log(text)
        if self.quiet:
            return
        if self.bar_shown:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def event(self, name: str, message: str, **fields) -> None:
        self.metrics(event=name, time=time.time(), **fields)
        self.say(message)

    # --- progress ----------------------------------------------------------------------------
    def step_done(self, step: int, loss: float, lr: float, grad_norm: float,
                  tokens_per_step: int, step_s: float, eta_s: float) -> None:
        """A reported step: step_s the seconds since the previous report. The tokens/s shown
        and recorded is the rate over the last RATE_WINDOW reports (evaluations and
        checkpoints between them included), not one step's, which swings with the moment
        a report happens to arrive."""
        self.step = step
        now = time.perf_counter()
        self._rate.append((now, step))
        t0, s0 = self._rate[0]
        tokens_per_s = (step - s0) * tokens_per_step / (now - t0) if now > t0 else 0.0
        self.metrics(step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                     tokens_per_s=tokens_per_s, step_s=step_s, time=time.time())
        line = (f"step {step}/{self.stop_step}  loss {loss:.4f}  lr {lr:.3e}  "
                f"grad_norm {grad_norm:.3f}  {tokens_per_s:,.0f} tok/s  {step_s:.3f} s/step  "
                f"ETA {fmt_duration(eta_s)}")
        self.log(line)
        if self.bar_shown:
            self.bar.set_postfix_str(f"loss {loss:.4f} {tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
            if self.log_every and step % self.log_every == 0:
                self.bar.write(line, file=sys.stdout)
        elif not self.quiet and self.progress == "lines" and self._line_due(step):
            self._printed_at = time.monotonic()
            print(line, flush=True)

    def _line_due(self, step: int) -> bool:
        if step in (self.start_step + 1, self.stop_step):
            return True
        if self.log_every:
            return step % self.log_every == 0
        return time.monotonic() - self._printed_at >= PRINT_EVERY

    def evaluation(self, step: int, val_loss: float, prompt: str, sample: str) -> None:
        ppl = math.exp(min(val_loss, 700.0))
        self.metrics(step=step, val_loss=val_loss, val_ppl=ppl, sample=sample, time=time.time())
        self.say(f"step {step}: val_loss {val_loss:.4f}  perplexity {ppl:.2f}\n"
                 f"  sample: {(prompt + sample)!r}")

    def heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._heartbeat_at < HEARTBEAT_EVERY:
            return
        self._heartbeat_at = now
        text = json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(),
            "ranks": [{"rank": r, "host": h, "pid": p} for r, (h, p) in enumerate(self.ranks)],
            "step": self.step, "stop_step": self.stop_step, "activity": self.activity,
            "time": now,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }, indent=1) + "\n"
        # Not durable: a heartbeat is worthless after a crash of the machine, and fsyncs every
        # few seconds would put disk latency into Node Zero's loop. Readers still see whole files.
        self._try(self._replace_heartbeat, os.path.join(self.run_dir, formats.HEARTBEAT), text)

    @staticmethod
    def _replace_heartbeat(path: str, text: str) -> None:
        with atomic.replacing(path, durable=False) as f:
            f.write(text)

    def _try(self, write, path: str, text: str) -> None:
        """write(path, text); a failure (a full disk) is said once, then the run goes on."""
        try:
            write(path, text)
        except OSError as e:
            if path not in self._failed:
                self._failed.add(path)
                print(f"mpitrain: warning: cannot write {path} ({e.strerror or e})",
                      file=sys.stderr, flush=True)

    def set_activity(self, activity: str) -> None:
        """What Node Zero is doing now (training, evaluating after step N, ...); a change is
        written to heartbeat.json at once."""
        if activity != self.activity:
            self.activity = activity
            self.heartbeat(force=True)

    def close(self) -> None:
        self.activity = "finished"
        self.heartbeat(force=True)
        self.bar.close()
        self._metrics.close()
        self._log.close()


def strict_json(x):
    """x with every non-finite float (NumPy's too) replaced by None, so json.dumps can refuse
    NaN (JSON has no NaN: readers other than Python's reject the line)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
