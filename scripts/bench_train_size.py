#!/usr/bin/env python
"""Training speed against the dataset's size: the same short run on each dataset, alternated.

    python scripts/bench_train_size.py SMALL.h5 LARGE.h5 [--ranks 3 12] [--rounds 3]

For each round, each rank count and each dataset (in that order), runs
`mpirun -n RANKS python -m mpitrain train --preset tiny --set max_seq_len=128 --max-steps 40`
in a temporary run directory and prints the median step time over steps 5-40 (metrics.jsonl's
step_s); then each (ranks, dataset)'s rounds and their median. Workers map the token array, so
the times should not depend on the size; alternating the datasets spreads the machine's drift
over both.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun():
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return local if os.path.exists(local) else shutil.which("mpirun")


def median_step(dataset, ranks, steps):
    run = tempfile.mkdtemp(prefix="bench_train_size-")
    try:
        subprocess.run([mpirun(), "-n", str(ranks), sys.executable, "-m", "mpitrain", "train",
                        "--preset", "tiny", "--dataset", dataset, "--set", "max_seq_len=128",
                        "--max-steps", str(steps), "--run-dir", os.path.join(run, "r"),
                        "--quiet"], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=REPO))
        with open(os.path.join(run, "r", "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        return statistics.median(r["step_s"] for r in recs
                                 if "step_s" in r and r.get("step", 0) >= 5)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--ranks", type=int, nargs="+", default=[3, 12])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    res = {}
    for rnd in range(args.rounds):
        for n in args.ranks:
            for ds in args.datasets:
                t = median_step(ds, n, args.steps)
                res.setdefault((n, ds), []).append(t)
                print(f"round {rnd} -n {n} {os.path.basename(ds)}: median step {1e3 * t:.1f} ms; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    for (n, ds), v in res.items():
        print(f"-n {n} {os.path.basename(ds)}: " + ", ".join(f"{1e3 * x:.1f}" for x in v)
              + f" (median {1e3 * statistics.median(v):.1f} ms)")


if __name__ == "__main__":
    main()
