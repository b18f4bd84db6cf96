"""MPI scaling: the trainer's tokens/s at several world sizes beside the single-process kernel,
all in one invocation, plus the cost of a checkpoint written while the workers train.

    python scripts/bench_scaling.py                       # seed preset, -n 2, 3 and 12
    python scripts/bench_scaling.py --preset small --steps 20 --checkpoint-steps 20

For each world size N it runs `mpirun -n N python -m mpitrain train --preset P --max-steps S+1`
(no evaluation, no checkpoint besides step 0 and the end) and takes the mean tokens/s of steps
2..S+1 from metrics.jsonl (step 1 warms up), and every worker's peak RSS from the end record.
The kernel figure is one process running Model.forward_backward + clip + AdamW on the whole
batch with --kernel-threads threads (second to last step timed the same way). The checkpoint
overhead compares the summed times of steps 2.. of two -n 3 runs of --checkpoint-steps steps, one
with a checkpoint in the middle (--save-every half) and one without: the final checkpoint is
written after the last step and does not count in either.
Data: hdf5_data/default_PRESET.h5 (prepared from the default corpus when missing).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun():
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return here if os.path.exists(here) else "mpirun"


def ensure_dataset(preset):
    sys.path.insert(0, REPO)
    from mpitrain.config import PRESETS
    from mpitrain.trainer.plan import default_dataset

    path = os.path.join(REPO, default_dataset(preset))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cfg = PRESETS[preset]
        subprocess.run([sys.executable, "-m", "mpitrain", "prepare", "--out", path,
                        "--vocab-size", str(cfg["model"]["vocab_size"]),
                        "--seq-len", str(cfg["train"]["seq_len"]), "--quiet"], check=True)
    return path


def run_trainer(launch, preset, dataset, steps, *extra, env=None):
    """Run `launch + [python -m mpitrain train ...]` for `steps` steps without evaluations (or
    checkpoints, unless `extra` asks for them) in a temporary run directory; returns (per-step
    records, end record, checkpoint events) from its metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [*launch, sys.executable, "-m", "mpitrain", "train",
               "--preset", preset, "--dataset", dataset, "--run-dir", run_dir,
               "--max-steps", str(steps), "--epochs", "1000", "--eval-every", "1000000",
               "--quiet", *extra]
        if "--save-every" not in extra:
            cmd += ["--save-every", "1000000"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{os.path.basename(sys.argv[0])}: {' '.join(cmd)} failed:\n{proc.stderr}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    steps_ = [r for r in records if "loss" in r and "event" not in r]
    end = [r for r in records if r.get("event") == "end"][-1]
    return steps_, end, [r for r in records if r.get("event") == "checkpoint"]


def train(n, preset, dataset, steps, *extra):
    """`mpirun -n n` of the trainer: see run_trainer."""
    return run_trainer([mpirun(), "-n", str(n)], preset, dataset, steps, *extra)


def step_seconds(steps_, tokens_per_step, first=2):
    return [tokens_per_step / r["tokens_per_s"] for r in steps_ if r["step"] >= first]


KERNEL = r"""
import sys, time, json, numpy as np
sys.path.insert(0, {repo!r})
from mpitrain import Model, ModelConfig, optim
from mpitrain.config import PRESETS
cfg = ModelConfig(**{{**PRESETS[{preset!r}]["model"], "vocab_size": {vocab}}})
B, T, threads, steps = {batch}, {seq}, {threads}, {steps}
m = Model(cfg, seed=0, threads=threads)
rng = np.random.default_rng(0)
times = []
for s in range(1, steps + 2):
    w = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    t0 = time.perf_counter()
    m.forward_backward(w[:, :-1], w[:, 1:])
    optim.update(m, lr=1e-4, step=s, norm=optim.grad_norm(m), max_norm=1.0)
    times.append(time.perf_counter() - t0)
import resource
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": times[1:], "rss_mb": rss}}))
"""


def kernel_alone(preset, vocab, batch, seq, threads, steps):
    code = KERNEL.format(repo=REPO, preset=preset, vocab=vocab, batch=batch, seq=seq,
                         threads=threads, steps=steps)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"bench_scaling: kernel run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline(preset, steps, kernel_threads):
    """The dataset, prepared when missing; a header line; and the single-process kernel step
    timed in this invocation (the figure every ratio is taken against).
    Returns (dataset path, tokens a step, kernel tokens/s)."""
    sys.path.insert(0, REPO)
    from mpitrain.config import PRESETS
    from mpitrain.dataset import Dataset

    dataset = ensure_dataset(preset)
    ds = Dataset.open(dataset)
    batch = PRESETS[preset]["train"]["batch_size"]
    tokens = batch * ds.seq_len
    print(f"preset {preset}: batch {batch} x seq_len {ds.seq_len} = {tokens} "
          f"tokens a step, vocabulary {ds.vocab_size}; {os.cpu_count()} CPU(s); "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    k = kernel_alone(preset, ds.vocab_size, batch, ds.seq_len, kernel_threads, steps)
    kernel_tps = tokens / float(np.mean(k["seconds"]))
    print(f"kernel alone, {kernel_threads} threads: {kernel_tps:8.0f} tokens/s   "
          f"(peak RSS {k['rss_mb']:.0f} MB)", flush=True)
    return dataset, tokens, kernel_tps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="seed")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per world size")
    ap.add_argument("--worlds", default="2,3,12", help="mpirun -n values ('' for none)")
    ap.add_argument("--kernel-threads", type=int, default=2)
    ap.add_argument("--checkpoint-steps", type=int, default=0,
                    help="steps of the checkpoint-overhead comparison at -n 3 (0: skip)")
    a = ap.parse_args(argv)
    dataset, tokens, kernel_tps = baseline(a.preset, a.steps, a.kernel_threads)
    worlds = [int(w) for w in a.worlds.split(",") if w.strip()]
    results = {}
    for n in worlds:
        steps_, end, _ = train(n, a.preset, dataset, a.steps + 1)
        tps = tokens / float(np.mean(step_seconds(steps_, tokens)))
        results[n] = tps
        rss = end["peak_rss_mb"]
        print(f"mpirun -n {n:2d}:            {tps:8.0f} tokens/s = {tps / kernel_tps:5.2f} x "
              f"kernel   (worker peak RSS max {max(rss[1:]):.0f} MB, Node Zero {rss[0]:.0f} MB)")
    if 3 in results and 12 in results:
        print(f"-n 12 / -n 3 = {results[12] / results[3]:.2f}")
    if a.checkpoint_steps:
        half = a.checkpoint_steps // 2
        plain, _, _ = train(3, a.preset, dataset, a.checkpoint_steps)
        saved, _, events = train(3, a.preset, dataset, a.checkpoint_steps,
                                 "--save-every", str(half))
        t_plain = sum(step_seconds(plain, tokens))  # steps 2..: step 1 includes step 0's save
        t_saved = sum(step_seconds(saved, tokens))
        print(f"checkpoint overhead, -n 3, {a.checkpoint_steps} steps: {t_plain:.2f} s without, "
              f"{t_saved:.2f} s with one checkpoint at step {half}: "
              f"{100 * (t_saved / t_plain - 1):+.1f}%")
        # The same, without the run-to-run noise: the step after the checkpoint against the
        # median step of that run (the lead worker waits only for the transfer to Node Zero).
        times = {r["step"]: tokens / r["tokens_per_s"] for r in saved}
        median = float(np.median([t for s_, t in times.items() if s_ >= 2 and s_ != half + 1]))
        write = [e["seconds"] for e in events if e["step"] == half]
        print(f"  in the run with the checkpoint: step {half + 1} took {times[half + 1]:.2f} s, "
              f"the median step {median:.2f} s ({100 * (times[half + 1] / median - 1):+.1f}%); "
              f"Node Zero wrote the file in {write[0]:.2f} s meanwhile")


if __name__ == "__main__":
    main()
