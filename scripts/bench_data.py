"""Benchmark data at scale: `prepare` memory and throughput, and worker memory, by corpus size.

  python scripts/bench_data.py [--sizes 0.1,1] [--memory-budget SIZE] [--ranks 3]
                               [--steps 10] [--dir DIR] [--keep]

For each size (GB) it builds a synthetic corpus in DIR (default: a temporary directory under
/tmp): files of about 8 MB alternating real text (slices of ../shared/data/production_training
relative to the repository) and words drawn from a Zipf-distributed (exponent 1.1) vocabulary
of 3 million made-up words, so distinct pre-tokens keep growing with the corpus as in real
data. Then:
  - `python -m mpitrain prepare --vocab-size 30000 --quiet [--memory-budget]` (a subprocess):
    wall time, MB/s of corpus text, and its peak RSS (os.wait4's ru_maxrss);
  - `mpirun -n RANKS python -m mpitrain train --preset tiny --set max_seq_len=128
    --max-steps STEPS` on that dataset: every rank's peak RSS (the run's end record).
Everything it makes is deleted at the end unless --keep. Check the free disk first: a size
needs about 2.6x its bytes while it runs (corpus, dataset and prepare's scratch files).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(REPO), "shared", "data", "production_training")
FILE_BYTES = 8 << 20
WORDS = 3_000_000
ZIPF = 1.1


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def real_text():
    parts = []
    for root, _, files in sorted(os.walk(REAL)):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                parts.append(fh.read())
    return b"\n".join(parts)


def word_list(rng):
    """WORDS distinct lowercase words of 3..10 letters (made up, deterministic)."""
    lengths = rng.integers(3, 11, WORDS)
    letters = rng.integers(ord("a"), ord("z") + 1, int(lengths.sum()), dtype=np.uint8).tobytes()
    ends = np.cumsum(lengths)
    words = [letters[e - n:e] for e, n in zip(ends.tolist(), lengths.tolist())]
    # suffix the rank in base 26 so all are distinct
    return [w + _b26(k) for k, w in enumerate(words)]


def _b26(k):
    out = bytearray()
    while True:
        out.append(ord("a") + k % 26)
        k //= 26
        if not k:
            return bytes(out)


def build_corpus(directory, size_bytes, seed=0):
    rng = np.random.default_rng(seed)
    real = real_text()
    words = np.array(word_list(rng), dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, WORDS + 1) ** ZIPF)
    cdf /= cdf[-1]
    os.makedirs(directory, exist_ok=True)
    written, k = 0, 0
    while written < size_bytes:
        n = min(FILE_BYTES, size_bytes - written)
        a = int(rng.integers(0, max(1, len(real) - n // 2)))
        head = real[a:a + n // 2]
        idx = np.searchsorted(cdf, rng.random(max(16, n // 16 // 16 * 16)))  # ~8 bytes a word
        lines = words[idx].reshape(-1, 16)
        body = b"\n".join(b" ".join(line) for line in lines.tolist())
        data = (head + b"\n" + body)[:n]
        with open(os.path.join(directory, f"part{k:05d}.txt"), "wb") as f:
            f.write(data)
        written += len(data)
        k += 1
    return written, k


def run_measured(cmd, env):
    """(seconds, peak RSS MiB of the process, stdout) of a subprocess."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         text=True)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"bench_data: {' '.join(cmd)} failed:\n{err}")
    return elapsed, usage.ru_maxrss / 1024, out


def mpirun():
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return local if os.path.exists(local) else shutil.which("mpirun")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1,1", help="corpus sizes in GB (10^9 bytes)")
    ap.add_argument("--memory-budget", default=None, help="passed to prepare")
    ap.add_argument("--ranks", type=int, default=3, help="training ranks (mpirun -n), Node Zero included")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where to build (default: a temporary dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build", nargs=2, metavar=("DIR", "BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        print(json.dumps(build_corpus(args.build[0], int(args.build[1]))))
        return
    env = dict(os.environ, PYTHONPATH=REPO)
    base = tempfile.mkdtemp(prefix="bench_data-", dir=args.dir)
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, Python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at start")
    try:
        for gb in (float(s) for s in args.sizes.split(",")):
            tag = f"{gb:g}GB"
            corpus_dir, ds = os.path.join(base, tag), os.path.join(base, f"{tag}.h5")
            t = time.perf_counter()
            # built in a subprocess: a child forked from a process holding the word list would
            # count that memory in its own peak RSS
            n_bytes, n_files = json.loads(subprocess.run(
                [sys.executable, __file__, "--build", corpus_dir, str(int(gb * 1e9))],
                check=True, capture_output=True, text=True).stdout)
            print(f"[{tag}] corpus: {n_files} files, {n_bytes / 1e6:,.0f} MB "
                  f"(built in {time.perf_counter() - t:.0f} s)", flush=True)
            cmd = [sys.executable, "-m", "mpitrain", "prepare", "--data", corpus_dir, "--out", ds,
                   "--vocab-size", "30000", "--quiet"]
            if args.memory_budget:
                cmd += ["--memory-budget", args.memory_budget]
            secs, rss, out = run_measured(cmd, env)
            print(f"[{tag}] prepare: {secs:.1f} s, {n_bytes / 1e6 / secs:.2f} MB/s, peak RSS "
                  f"{rss:,.0f} MiB; {out.strip()}", flush=True)
            shutil.rmtree(corpus_dir)
            run_dir = os.path.join(base, f"run-{tag}")
            cmd = [mpirun(), "-n", str(args.ranks), sys.executable, "-m", "mpitrain",
                   "train", "--preset", "tiny", "--dataset", ds, "--set", "max_seq_len=128",
                   "--max-steps", str(args.steps), "--run-dir", run_dir, "--quiet"]
            secs, _, _ = run_measured(cmd, env)
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                end = [json.loads(line) for line in f if '"end"' in line][-1]
            print(f"[{tag}] train -n {args.ranks} ({args.steps} steps, {secs:.0f} s): "
                  f"peak RSS per rank (MiB, Node Zero first) {end['peak_rss_mb']}; "
                  f"{end.get('tokens_per_s', 0):,.0f} tokens/s", flush=True)
            shutil.rmtree(run_dir)
            os.unlink(ds)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
