"""Watching a run directory: what `mpitrain monitor` and `mpitrain plot` read and show.

Sources (written by Node Zero, mpitrain/trainer/runlog.py):
  metrics.jsonl   one JSON object a line: steps {"step", "loss", "lr", "grad_norm",
                  "tokens_per_s", "time"}, evaluations {"step", "val_loss", "val_ppl", "sample",
                  "time"} and events {"event": "start" | "resume" | "checkpoint" | "signal" |
                  "end", "time", ...}; a line still being written (no newline yet) is left for
                  the next read.
  heartbeat.json  {"host", "pid", "step", "stop_step", "time", ...}, replaced every few seconds.
The epoch shown comes from the start event's "num_windows" (the dataset's training windows);
a run written before the start event carried it shows no epoch. It counts from 0, as the
checkpoints' `epoch` does (the epoch in progress = complete passes so far): "epoch 0 of 1"
during the first and only pass.

RunReader follows metrics.jsonl incrementally (only new complete lines are parsed);
snapshot() condenses what it read into a dict; format_snapshot() renders it as text.
A run is flagged when its heartbeat is older than three refresh intervals (never less than
three heartbeat periods, so a fast refresh does not flag a healthy run): "stopped" when Node
Zero's process is gone (checked when it ran on this host), "stalled" otherwise.
"""
import json
import math
import os
import socket
import time

from mpitrain import formats
from mpitrain.errors import UserError
from mpitrain.trainer.runlog import HEARTBEAT_EVERY, fmt_duration

SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40        # characters of a trend line
RATE_STEPS = 50         # recent steps that the step rate (ETA) is measured over


class RunReader:
    """Incremental reader of one run directory's metrics.jsonl."""

    def __init__(self, run_dir):
        self.run_dir = os.fspath(run_dir)
        if not os.path.isdir(self.run_dir):
            raise UserError(f"{self.run_dir}: no such run directory")
        self.path = os.path.join(self.run_dir, formats.METRICS)
        self._offset = 0
        self._inode = None
        self.bad_lines = 0
        self.reset()

    def reset(self):
        self.steps = []          # (step, loss, tokens_per_s, time) since the newest start
        self.evals = []          # (step, val_loss, sample, time)
        self.checkpoints = []    # checkpoint event records, in order
        self.start = None        # the newest start event
        self.events = []         # every event, in order
        self.records = 0

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def update(self) -> int:
        """Parse lines appended since the last call; returns how many were read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        if self._inode not in (None, st.st_ino) or st.st_size < self._offset:
            # replaced or truncated: start over
            self._offset, self.bad_lines = 0, 0
            self.reset()
        self._inode = st.st_ino
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1      # only complete lines; a partial one waits
        self._offset += end
        n = 0
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(record, dict):
                self._add(record)
                n += 1
        return n

    def _add(self, r):
        self.records += 1
        event = r.get("event")
        if event is not None:
            self.events.append(r)
            if event == "start":
                self.start = r
            elif event == "checkpoint":
                self.checkpoints.append(r)
            return
        if "loss" in r and "step" in r:
            # a resumed run repeats steps after its checkpoint: the newest value wins
            while self.steps and self.steps[-1][0] >= r["step"]:
                self.steps.pop()
            self.steps.append((r["step"], r["loss"], r.get("tokens_per_s"), r.get("time")))
        elif "val_loss" in r and "step" in r:
            while self.evals and self.evals[-1][0] >= r["step"]:
                self.evals.pop()
            self.evals.append((r["step"], r["val_loss"], r.get("sample"), r.get("time")))

    def heartbeat(self):
        try:
            with open(os.path.join(self.run_dir, formats.HEARTBEAT)) as f:
                hb = json.load(f)
            return hb if isinstance(hb, dict) else None
        except (OSError, ValueError):
            return None

    def num_windows(self):
        """Training windows of the run's dataset (the newest start event's), None when not
        recorded."""
        windows = (self.start or {}).get("num_windows")
        return int(windows) if windows else None


def sparkline(values, width=SPARK_WIDTH) -> str:
    """A unicode trend line: values averaged into at most `width` buckets, scaled min..max."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [sum(vals[i * n // width:(i + 1) * n // width])
                / len(vals[i * n // width:(i + 1) * n // width]) for i in range(width)]
    lo, hi = min(vals), max(vals)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * len(SPARK)))]
                   for v in vals)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True   # exists but not ours, or unknown: do not claim it is gone
    return True


def liveness(reader, hb, finished, interval, now):
    """(state, detail): state in finished | alive | stalled | stopped | unknown."""
    limit = 3 * max(interval, HEARTBEAT_EVERY)
    if finished:
        return "finished", ""
    if hb is None or not isinstance(hb.get("time"), (int, float)):
        return "unknown", "no heartbeat.json yet"
    age = now - hb["time"]
    if age <= limit:
        return "alive", f"heartbeat {age:.1f} s ago"
    gone = hb.get("host") == socket.gethostname() and "pid" in hb and not _pid_alive(hb["pid"])
    if gone:
        return "stopped", (f"heartbeat {age:.0f} s old and Node Zero (pid {hb['pid']}) is gone")
    return "stalled", f"heartbeat {age:.0f} s old (more than {limit:g} s)"


def snapshot(reader, interval=2.0, now=None) -> dict:
    """Everything the monitor shows, as plain values (None where unknown)."""
    now = time.time() if now is None else now
    hb = reader.heartbeat()
    start = reader.start or {}
    tc = start.get("train_config") or {}
    last_start_at = max((i for i, e in enumerate(reader.events) if e["event"] == "start"),
                        default=-1)
    later = [e["event"] for e in reader.events[last_start_at + 1:]]
    finished = "end" in later
    signalled = "signal" in later
    step = reader.steps[-1][0] if reader.steps else (hb or {}).get("step", start.get("start_step"))
    stop_step = start.get("stop_step", (hb or {}).get("stop_step"))
    total = start.get("total_steps")
    # step rate over the recent steps of this invocation, for the ETA
    started = start.get("time") or 0.0   # a resumed run's earlier steps are not its pace
    recent = [s for s in reader.steps[-RATE_STEPS:] if s[3] is not None and s[3] >= started]
    rate = None
    if len(recent) >= 2 and recent[-1][3] > recent[0][3]:
        rate = (recent[-1][0] - recent[0][0]) / (recent[-1][3] - recent[0][3])
    eta = (stop_step - step) / rate if rate and stop_step is not None and step is not None \
        else None
    tps = [s[2] for s in reader.steps[-10:] if s[2] is not None]
    epoch = epochs = None
    if step is not None and tc.get("batch_size"):
        windows = reader.num_windows()
        if windows:
            # the data position's epoch after `step` (schedule.next_batch), as checkpoints
            # record it
            epoch = int(step) * int(tc["batch_size"]) // windows
    if tc.get("epochs"):
        epochs = int(tc["epochs"])
    warmup = tc.get("warmup")
    state, detail = liveness(reader, hb, finished, interval, now)
    activity = (hb or {}).get("activity")
    if finished:
        phase = "finished"
    elif signalled:
        phase = "stopping (signal)"
    elif state == "alive" and isinstance(activity, str) and activity not in (
            "training", "starting", "finished"):
        phase = activity              # evaluating, writing a sample, saving a checkpoint
    elif not reader.steps:
        phase = "starting"
    elif warmup and step <= warmup:
        phase = "warmup"
    else:
        phase = "training"
    ckpts = reader.checkpoints
    on_disk = [c for c in ckpts if c.get("path") and os.path.exists(c["path"])]
    return {
        "run_dir": reader.run_dir, "phase": phase, "state": state, "state_detail": detail,
        "step": step, "stop_step": stop_step, "total_steps": total,
        "epoch": epoch, "epochs": epochs, "eta_s": eta,
        "steps_per_s": rate,
        "loss": reader.steps[-1][1] if reader.steps else None,
        "loss_trend": sparkline([s[1] for s in reader.steps]),
        "val_loss": reader.evals[-1][1] if reader.evals else None,
        "val_step": reader.evals[-1][0] if reader.evals else None,
        "val_trend": sparkline([e[1] for e in reader.evals]),
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "sample": reader.evals[-1][2] if reader.evals else None,
        "checkpoints_written": len(ckpts),
        "checkpoints_on_disk": len(on_disk),
        "newest_checkpoint": ckpts[-1].get("path") if ckpts else None,
        "preset": start.get("preset"), "ranks": start.get("ranks"),
        "heartbeat_time": (hb or {}).get("time"),
        "unreadable_lines": reader.bad_lines,
    }


def _num(x, fmt="{:.4f}"):
    return "-" if x is None else fmt.format(x)


def format_snapshot(s) -> str:
    flag = {"alive": "alive", "finished": "finished", "unknown": "unknown",
            "stalled": "STALLED", "stopped": "STOPPED"}[s["state"]]
    step = _num(s["step"], "{}")
    of = f" of {s['stop_step']}" if s["stop_step"] is not None else ""
    if s["total_steps"] not in (None, s["stop_step"]):
        of += f" (schedule: {s['total_steps']})"
    epoch = "-" if s["epoch"] is None else f"{s['epoch']} (from 0)"
    if s["epochs"]:
        epoch += f" of {s['epochs']}"
    sample = s["sample"]
    if sample is not None:
        sample = repr(sample if len(sample) <= 160 else sample[:157] + "...")
    lines = [
        f"run {s['run_dir']}" + (f"  (preset {s['preset']}, {s['ranks']} ranks)"
                                 if s["preset"] else ""),
        f"status     {flag}" + (f": {s['state_detail']}" if s["state_detail"] else ""),
        f"phase      {s['phase']}",
        f"step       {step}{of}   epoch {epoch}   ETA "
        + ("-" if s["eta_s"] is None else fmt_duration(s["eta_s"])),
        f"loss       {_num(s['loss'])}  {s['loss_trend']}",
        f"val loss   {_num(s['val_loss'])}"
        + (f" (step {s['val_step']})" if s["val_step"] is not None else "")
        + f"  {s['val_trend']}",
        f"tokens/s   {_num(s['tokens_per_s'], '{:,.0f}')}",
        f"sample     {sample if sample is not None else '-'}",
        f"checkpoints {s['checkpoints_written']} written, {s['checkpoints_on_disk']} on disk"
        + (f"; newest {os.path.basename(s['newest_checkpoint'])}"
           if s["newest_checkpoint"] else ""),
    ]
    if s["unreadable_lines"]:
        lines.append(f"warning    {s['unreadable_lines']} unreadable line(s) in metrics.jsonl")
    return "\n".join(lines)


CLEAR = "\x1b[H\x1b[J"   # cursor home, clear to the end of the screen


def watch(run_dir, interval=2.0, once=False, as_json=False, out=None):
    """Print snapshots of a run: one (once), or refreshed every `interval` seconds until the
    run finishes or Ctrl-C. On a terminal the screen is redrawn in place; otherwise snapshots
    follow each other, separated by a blank line. Returns the exit status."""
    import sys

    out = out or sys.stdout
    if out is sys.stdout and hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")   # samples and trend lines on any terminal encoding
    reader = RunReader(run_dir)
    if once and not reader.exists():
        raise UserError(f"{reader.run_dir}: no metrics.jsonl (not a run directory, or the run "
                        "has not started)")
    in_place = out.isatty() and not once and not as_json
    first = True
    try:
        while True:
            reader.update()
            if reader.exists():
                snap = snapshot(reader, interval)
                text = json.dumps(snap) if as_json else format_snapshot(snap)
            else:
                snap, text = None, f"waiting for {reader.path} ..."
            if in_place:
                out.write(CLEAR + text + "\n")
            else:
                out.write(("" if first or as_json else "\n") + text + "\n")
            out.flush()
            first = False
            if once or (snap and snap["phase"] == "finished"):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly (stdout to /dev/null for the final flush)
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
