"""Helpers for the trainer's tests (no tests here): a small dataset made on the fly, running
`mpirun -n N python -m mpitrain train ...` for real, reading metrics.jsonl."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, mpirun_path

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jovial boxers and many small programs print numbers like 42 or 1999 ; "
         "def return class import ( ) : = + -").split()


def write_text_corpus(root, docs=24, words=220, seed=7):
    """Deterministic pseudo-text: `docs` files of `words` words drawn from WORDS."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for d in range(docs):
        ids = rng.integers(0, len(WORDS), words)
        lines = [" ".join(WORDS[i] for i in ids[k:k + 12]) for k in range(0, words, 12)]
        with open(os.path.join(root, f"doc{d:02d}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def prepare_tiny(tmp_dir) -> str:
    """A dataset for the tiny preset (seq_len 16, vocabulary 300): ~10k tokens, 20% held out."""
    corpus = write_text_corpus(os.path.join(tmp_dir, "corpus"))
    out = os.path.join(tmp_dir, "tiny.h5")
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "prepare", "--data", corpus,
                           "--out", out, "--vocab-size", "300", "--seq-len", "16",
                           "--val-fraction", "0.2", "--quiet"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    return prepare_tiny(str(tmp_path_factory.mktemp("train_data")))


def mpirun_or_skip() -> str:
    path = mpirun_path()
    if path is None:
        pytest.skip("mpirun not available")
    return path


def train_cmd(n: int, *args, hosts=None) -> list:
    """hosts: e.g. "nodea:6,nodeb:6", logical nodes on this machine (one Hydra proxy each)."""
    layout = ["-launcher", "fork", "-hosts", hosts] if hosts else []
    return [mpirun_or_skip(), *layout, "-n", str(n), sys.executable, "-m", "mpitrain", "train",
            *map(str, args)]


def run_train(n: int, *args, env=None, timeout=180, cwd=None, hosts=None):
    """`mpirun -n n python -m mpitrain train ARGS` to completion; CompletedProcess (text)."""
    return subprocess.run(train_cmd(n, *args, hosts=hosts), env=_env(env), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def start_train(n: int, *args, env=None, cwd=None, hosts=None):
    """The same, started in the background (Popen, output to pipes)."""
    return subprocess.Popen(train_cmd(n, *args, hosts=hosts), env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def record_time(test: str, seconds: float) -> None:
    """Append a measured time (fault to exit) to $MPITRAIN_TEST_TIMES, when set: the source of
    the times in docs/RELIABILITY.md."""
    path = os.environ.get("MPITRAIN_TEST_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "seconds": round(seconds, 3)}) + "\n")


# Options that make the tiny preset's steps and checkpoints take a while (~0.1-0.4 s a step,
# ~0.8 s a save, measured): the second-signal tests need the abort to beat the final save.
BIGGER = ("--set", "d_model=256", "--set", "d_ff=1024", "--set", "n_layers=4",
          "--batch-size", 48)


def tiny_args(dataset, run_dir, *extra):
    """Tiny preset, 20 planned steps, evaluation every 5 and checkpoints every 10."""
    return ["--preset", "tiny", "--dataset", dataset, "--run-dir", run_dir, "--max-steps", 20,
            "--epochs", 100, "--eval-every", 5, "--save-every", 10, "--quiet", *extra]


def read_metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(records) -> dict:
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


def val_losses(records) -> dict:
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def end_record(records) -> dict:
    ends = [r for r in records if r.get("event") == "end"]
    assert ends, "no end event in metrics.jsonl"
    return ends[-1]


def heartbeat(run_dir):
    try:
        with open(os.path.join(run_dir, "heartbeat.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wait_training(proc, run_dir, timeout=60.0, step=1):
    """Wait until the run's heartbeat shows `step` finished steps (returns it); fail if proc
    died."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        beat = heartbeat(run_dir)
        if beat is not None and beat["step"] >= step:
            return beat
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.kill()
    pytest.fail("training did not start")


def process_gone(pid, within=5.0) -> bool:
    """Whether process `pid` (on this machine) has ended within `within` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False
