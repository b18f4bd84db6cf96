"""Thread mode's speed and memory: `--threads 12` and `--threads 3` beside the kernel's own
2-thread step, all in one invocation.

    python scripts/bench_threads.py                        # seed preset, 5 timed steps
    python scripts/bench_threads.py --preset small --steps 10

For each thread count N it runs `python -m mpitrain train --threads N --preset P --max-steps
S+1` (no MPI; no evaluation after step 0, no checkpoint besides step 0 and the end) and takes
the mean tokens/s of steps 2..S+1 from metrics.jsonl (step 1 warms up), and the process's peak
RSS from the end record (one process: Node Zero, the worker thread and both models). The kernel
figure is one process running Model.forward_backward + clip + AdamW on the whole batch with
--kernel-threads threads, timed the same way (bench_scaling.py's kernel_alone).
Goals: threads 12 >= 85% of threads 3; threads 3 >= 95% of the kernel; peak RSS of
threads 12 < 2 GB. Data: hdf5_data/default_PRESET.h5 (prepared from the default corpus when
missing).
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_scaling import REPO, baseline, run_trainer  # noqa: E402

sys.path.insert(0, REPO)
from mpitrain import launcher  # noqa: E402


def train_threads(threads, preset, dataset, steps):
    """Run thread mode (no MPI); returns (per-step records, end record)."""
    env = {k: v for k, v in os.environ.items()
           if k not in launcher.ALL_VARS}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    steps_, end, _ = run_trainer([], preset, dataset, steps, "--threads", str(threads), env=env)
    return steps_, end


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="seed")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--threads", default="12,3", help="--threads values of the runs")
    ap.add_argument("--kernel-threads", type=int, default=2)
    a = ap.parse_args(argv)
    dataset, tokens, kernel_tps = baseline(a.preset, a.steps, a.kernel_threads)
    results, rss = {}, {}
    for n in [int(t) for t in a.threads.split(",") if t.strip()]:
        steps_, end = train_threads(n, a.preset, dataset, a.steps + 1)
        seconds = [tokens / r["tokens_per_s"] for r in steps_ if r["step"] >= 2]
        results[n] = tokens / float(np.mean(seconds))
        rss[n] = max(end["peak_rss_mb"])
        print(f"--threads {n:2d}:             {results[n]:8.0f} tokens/s = "
              f"{results[n] / kernel_tps:5.2f} x kernel   (peak RSS {rss[n]:.0f} MB)", flush=True)
    if 3 in results:
        print(f"--threads 3 / kernel = {results[3] / kernel_tps:.2f}   (goal >= 0.95)")
    if 3 in results and 12 in results:
        print(f"--threads 12 / --threads 3 = {results[12] / results[3]:.2f}   (goal >= 0.85)")
    if 12 in rss:
        print(f"--threads 12 peak RSS = {rss[12]:.0f} MB   (goal < 2048 MB)")


if __name__ == "__main__":
    main()
