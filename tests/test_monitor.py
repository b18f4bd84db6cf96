"""`mpitrain monitor` through the real command line.

On real runs made by `mpirun -n 2 python -m mpitrain train` (tiny preset): a finished run and
a running one (--once, text and --json, every figure checked against metrics.jsonl read
here); following a run until its end event; on hand-written run directories: stalled and
stopped runs (old heartbeat, Node Zero alive or gone), a half-written last line, a resumed
run's repeated steps; bad input ends with one line and exit 2.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_user_error, run_cli
from mpitrain.checkpoint import load_checkpoint
from mpitrain.monitor import SPARK, format_snapshot, sparkline
from test_generate_support import tiny_run_dir
from test_train_support import (heartbeat, read_metrics, start_train, step_losses,  # noqa: F401
                                tiny_dataset, val_losses)


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):  # noqa: F811
    return tiny_run_dir(tmp_path_factory.mktemp("monitor"), tiny_dataset)


def _snapshot(run_dir, *extra):
    proc = run_cli("monitor", run_dir, "--once", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_finished_run(finished_run):
    records = read_metrics(finished_run)
    losses, vals = step_losses(records), val_losses(records)
    text = run_cli("monitor", finished_run, "--once")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "status     finished" in out and "phase      finished" in out
    assert "step       10 of 10" in out
    assert f"loss       {losses[10]:.4f}  " in out
    assert f"val loss   {vals[10]:.4f} (step 10)" in out
    assert "checkpoints 2 written, 2 on disk; newest checkpoint_step_10.h5" in out
    s = _snapshot(finished_run)
    assert s["state"] == "finished" and s["step"] == 10 and s["stop_step"] == 10
    assert s["loss"] == losses[10] and s["val_loss"] == vals[10]
    assert s["loss_trend"] == sparkline([losses[k] for k in sorted(losses)])
    assert len(s["loss_trend"]) == 10 and s["loss_trend"][-1] == SPARK[0]   # loss went down
    assert s["val_trend"] == sparkline([vals[k] for k in sorted(vals)])
    samples = [r["sample"] for r in records if "sample" in r]
    assert s["sample"] == samples[-1]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and "event" not in r]
    # a float64 mean of the same ten numbers, perhaps summed in another order (approx's 1e-6)
    assert s["tokens_per_s"] == pytest.approx(sum(tps[-10:]) / len(tps[-10:]))
    # the start event carries the dataset's training windows; 10 steps stay in the first
    # epoch, which monitor counts from 0 as the checkpoint records it
    start = [r for r in records if r.get("event") == "start"][-1]
    with open(os.path.join(finished_run, "train.log")) as f:
        assert f"{start['num_windows']} training windows" in f.read()
    assert 10 * start["train_config"]["batch_size"] < start["num_windows"]
    assert s["epoch"] == 0 and s["epochs"] == 100
    newest = sorted(glob.glob(os.path.join(finished_run, "checkpoint_step_*.h5")),
                    key=lambda p: int(p.rsplit("_", 1)[1][:-3]))[-1]
    assert load_checkpoint(newest).epoch == s["epoch"]
    assert "epoch 0 (from 0) of 100" in format_snapshot(s)
    assert s["checkpoints_written"] == s["checkpoints_on_disk"] == 2


@pytest.mark.slow
def test_follow_ends_with_the_run(finished_run):
    proc = run_cli("monitor", finished_run, "--interval", "0.2", timeout=20)
    assert proc.returncode == 0 and proc.stdout.count("status     finished") == 1


@pytest.mark.slow
def test_running_run(tiny_dataset, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    proc = start_train(2, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run_dir,
                       "--epochs", 10000, "--eval-every", 20, "--save-every", 100000,
                       "--quiet")
    try:
        t0 = time.monotonic()
        while True:
            beat = heartbeat(run_dir)
            if beat and beat["step"] > 40 and any("val_loss" in r for r in read_metrics(run_dir)):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 60, "training did not start"
            time.sleep(0.2)
        s = _snapshot(run_dir)
        # evaluating every 20 steps, Node Zero may be caught doing that
        assert s["state"] == "alive" and (s["phase"] == "training" or s["phase"].startswith(
            ("evaluating after step ", "writing the sample of step ")))
        assert s["step"] > 40 and s["stop_step"] > 1000
        assert s["eta_s"] > 0 and s["steps_per_s"] > 0 and s["tokens_per_s"] > 0
        assert s["val_loss"] is not None and s["sample"] is not None
        assert s["checkpoints_written"] >= 1       # step 0
        text = run_cli("monitor", run_dir, "--once").stdout
        assert "status     alive: heartbeat" in text and "ETA " in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    s = _snapshot(run_dir)
    assert s["phase"] == "finished" and s["state"] == "finished"


# ---- hand-written run directories ----------------------------------------------------------

def _write_run(run_dir, records, beat_age, pid, partial="", activity=None):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(partial)
    beat = {"host": socket.gethostname(), "pid": pid, "step": records[-1].get("step", 0),
            "stop_step": 100, "time": time.time() - beat_age}
    if activity is not None:
        beat["activity"] = activity
    with open(os.path.join(run_dir, "heartbeat.json"), "w") as f:
        json.dump(beat, f)


def _records(steps, t0=1000.0, start=None):
    start = start or {"event": "start", "time": t0, "preset": "tiny", "ranks": 2,
                      "start_step": 0, "stop_step": 100, "total_steps": 100,
                      "num_windows": 60,
                      "train_config": {"batch_size": 12, "epochs": 30, "warmup": 5}}
    out = [start]
    for s in steps:
        out.append({"step": s, "loss": 6.0 - 0.01 * s, "lr": 1e-3, "grad_norm": 1.0,
                    "tokens_per_s": 1000.0 + s, "time": t0 + 0.5 * s})
    return out


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_stalled_and_stopped(tmp_path):
    alive = str(tmp_path / "alive")
    _write_run(alive, _records(range(1, 21)), beat_age=1.0, pid=os.getpid())
    s = _snapshot(alive)
    assert s["state"] == "alive" and s["phase"] == "training"
    # rates from the records' exact times, in float64 (pytest.approx's default rel 1e-6)
    assert s["step"] == 20 and s["steps_per_s"] == pytest.approx(2.0)
    assert s["eta_s"] == pytest.approx(40.0)          # 80 steps at 2 steps/s
    assert s["epoch"] == 20 * 12 // 60                # num_windows from the start event
    stalled = str(tmp_path / "stalled")
    _write_run(stalled, _records(range(1, 21)), beat_age=30.0, pid=os.getpid())
    s = _snapshot(stalled)
    assert s["state"] == "stalled"
    text = run_cli("monitor", stalled, "--once").stdout
    assert "status     STALLED: heartbeat 3" in text and " s old (more than 6 s)" in text
    # three refresh intervals of 20 s: 30 s is not stale yet
    assert _snapshot(stalled, "--interval", "20")["state"] == "alive"
    stopped = str(tmp_path / "stopped")
    _write_run(stopped, _records(range(1, 4)), beat_age=30.0, pid=_dead_pid())
    s = _snapshot(stopped)
    assert s["state"] == "stopped" and s["phase"] == "warmup"
    assert "is gone" in s["state_detail"]


@pytest.mark.slow
def test_phase_shows_what_node_zero_is_doing(tmp_path):
    run = str(tmp_path / "evaluating")
    _write_run(run, _records(range(1, 21)), beat_age=1.0, pid=os.getpid(),
               activity="evaluating after step 20")
    s = _snapshot(run)
    assert s["state"] == "alive" and s["phase"] == "evaluating after step 20"
    assert "phase      evaluating after step 20" in run_cli("monitor", run, "--once").stdout
    _write_run(run, _records(range(1, 21)), beat_age=1.0, pid=os.getpid(), activity="training")
    assert _snapshot(run)["phase"] == "training"
    # an old heartbeat's activity is not news: the phase comes from the metrics again
    _write_run(run, _records(range(1, 21)), beat_age=30.0, pid=os.getpid(),
               activity="saving a checkpoint of step 20")
    s = _snapshot(run)
    assert s["state"] == "stalled" and s["phase"] == "training"


def test_runlog_writes_node_zeros_activity_at_once(tmp_path):
    from mpitrain.trainer.runlog import RunLog

    log = RunLog(str(tmp_path), [("host", 1)], total_steps=10, start_step=0, stop_step=10,
                 quiet=True)

    def beat():
        with open(tmp_path / "heartbeat.json") as f:
            return json.load(f)["activity"]

    assert beat() == "starting"
    log.set_activity("evaluating after step 0")      # written now, not at the next refresh
    assert beat() == "evaluating after step 0"
    log.close()
    assert beat() == "finished"


@pytest.mark.slow
def test_partial_line_resume_and_bad_lines(tmp_path):
    run_dir = str(tmp_path / "run")
    records = _records(range(1, 11)) + [{"event": "checkpoint", "step": 10, "path":
                                         str(tmp_path / "gone.h5"), "time": 1.0}]
    # a resume from step 5: steps 6.. again, with other losses
    records += _records([], start={"event": "start", "time": 2000.0, "start_step": 5,
                                   "stop_step": 100, "total_steps": 100,
                                   "train_config": {"batch_size": 12, "epochs": 30}})
    records += [{"step": s, "loss": 1.0, "tokens_per_s": 5.0, "time": 2000.0 + s}
                for s in (6, 7)]
    _write_run(run_dir, records, beat_age=0.0, pid=os.getpid(),
               partial='{"step": 8, "loss": 0.5, "tok')
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    lines.insert(3, "not json")
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(lines))          # the last line stays partial (no newline)
    s = _snapshot(run_dir)
    assert s["step"] == 7 and s["loss"] == 1.0        # the partial line is not read
    assert s["epoch"] is None   # the newest start event (as from an older mpitrain) has no
    assert s["epochs"] == 30    # num_windows: no epoch shown, everything else is
    assert s["steps_per_s"] == pytest.approx(1.0)     # pace since the resume (steps 6, 7)
    assert s["checkpoints_written"] == 1 and s["checkpoints_on_disk"] == 0
    assert s["unreadable_lines"] == 1
    assert len(s["loss_trend"]) == 7                  # steps 1..5, then the resumed 6, 7
    assert "1 unreadable line(s)" in run_cli("monitor", run_dir, "--once").stdout


@pytest.mark.slow
def test_follow_picks_up_new_lines(tmp_path):
    run_dir = str(tmp_path / "run")
    _write_run(run_dir, _records(range(1, 3)), beat_age=0.0, pid=os.getpid())
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "mpitrain", "monitor", run_dir,
                             "--interval", "0.2"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        # wait for the first frame (showing step 2) rather than a fixed time: a start-up slower
        # than the sleep (a loaded machine) read step 3 first and failed the test
        first, deadline = [], time.monotonic() + 60
        while not any("step       2 of 100" in line for line in first):
            assert time.monotonic() < deadline, first
            line = proc.stdout.readline()   # the monitor prints a frame every 0.2 s
            assert line, first              # it ended before showing step 2
            first.append(line)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": 3, "loss": 2.5, "tokens_per_s": 1.0,
                                "time": 1002.0}) + "\n")
            f.flush()
            time.sleep(1.0)
            f.write(json.dumps({"event": "end", "time": 1003.0}) + "\n")
        out, _ = proc.communicate(timeout=20)
        out = "".join(first) + out
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "step       2 of 100" in out and "loss       2.5000" in out
    assert out.rstrip().endswith("0 written, 0 on disk")
    assert out.count("status     finished") == 1


def test_sparkline():
    assert sparkline([]) == ""
    assert sparkline([3.0, 3.0]) == SPARK[0] * 2
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == SPARK
    assert sparkline(range(400), width=8) == SPARK        # bucket means, still increasing
    assert sparkline([1.0, float("nan"), 2.0]) == SPARK[0] + SPARK[-1]


@pytest.mark.slow
def test_bad_input(tmp_path):
    assert_user_error(run_cli("monitor", tmp_path / "nope", "--once"), "no such run directory")
    assert_user_error(run_cli("monitor", tmp_path, "--once"), "no metrics.jsonl")
    assert_user_error(run_cli("monitor", tmp_path, "--interval", "0"), "--interval")
    assert_user_error(run_cli("monitor", tmp_path, "--interval", "nan"), "--interval")


def test_redraws_in_place_on_a_terminal(tmp_path):
    """On a terminal each refresh clears the screen and redraws (cursor home + clear)."""
    import pty

    run_dir = str(tmp_path / "run")
    records = _records(range(1, 3)) + [{"event": "end", "time": 1002.0}]
    _write_run(run_dir, records, beat_age=0.0, pid=os.getpid())
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "mpitrain", "monitor", run_dir,
                             "--interval", "0.2"], stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    proc.wait(timeout=30)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.returncode == 0
    text = out.decode()
    assert text.startswith("\x1b[H\x1b[J") and "status     finished" in text
