"""Benchmark `mpitrain prepare` against a count-only baseline on the same files.

  python scripts/bench_prepare.py [DIR] [--vocab-size 30000] [--repeat 2] [--mpirun N ...]

DIR defaults to ../shared/data/production_training relative to the repository. The baseline is
plain Python: read every file under DIR (sorted) and count
re.findall(r" ?[^\\W\\d_]+| ?\\d+| ?[^\\s\\w]+|\\s+", text) with collections.Counter. The full
prepare (read, count, vocabulary, encode, write the .h5 and vocab.txt) runs in this process on
one rank. Each is run --repeat times, alternating; the best time of each is reported, with
their ratio (goal: prepare within 2x of the baseline). --mpirun N also times
`mpirun -n N python -m mpitrain prepare` (a subprocess: start-up and imports included) and
checks that its file is byte-identical to the single-process one.
"""
import argparse
import collections
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mpitrain.prepare import Options, prepare  # noqa: E402

BENCH_RE = r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+"


def baseline(data_dir):
    """Read + count only: the reference every tokenizer pass must at least do."""
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs)
    regex = re.compile(BENCH_RE)
    counts = collections.Counter()
    n_bytes = 0
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        n_bytes += len(data)
        counts.update(regex.findall(data.decode("utf-8", errors="replace")))
    return len(paths), n_bytes, counts


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?",
                    default=os.path.join(REPO, "..", "shared", "data", "production_training"))
    ap.add_argument("--vocab-size", type=int, default=30000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mpirun", type=int, nargs="*", default=[], metavar="N",
                    help="also time prepare under mpirun -n N (once per N)")
    args = ap.parse_args()
    data = os.path.normpath(args.data)
    if not os.path.isdir(data):
        sys.exit(f"bench_prepare: not a directory: {data}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, Python "
          f"{platform.python_version()}, {platform.system()} {platform.release()}")
    best_base, best_full, summary = float("inf"), float("inf"), None
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            t = time.perf_counter()
            n_files, n_bytes, counts = baseline(data)
            best_base = min(best_base, time.perf_counter() - t)
            t = time.perf_counter()
            summary = prepare(Options(data=data, out=os.path.join(tmp, "bench.h5"),
                                      vocab_size=args.vocab_size, force=True, quiet=True))
            best_full = min(best_full, time.perf_counter() - t)
        mpi = {}
        for n in args.mpirun:
            out = os.path.join(tmp, f"bench_n{n}.h5")
            launcher = os.path.join(os.path.dirname(sys.executable), "mpirun")
            cmd = [launcher if os.path.exists(launcher) else shutil.which("mpirun"), "-n", str(n),
                   sys.executable, "-m", "mpitrain", "prepare", "--data", data, "--out", out,
                   "--vocab-size", str(args.vocab_size), "--quiet"]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            elapsed = time.perf_counter() - t
            if proc.returncode != 0:
                sys.exit(f"bench_prepare: {' '.join(cmd)} failed:\n{proc.stderr}")
            with open(out, "rb") as a, open(os.path.join(tmp, "bench.h5"), "rb") as b:
                mpi[n] = (elapsed, a.read() == b.read())
    tm = summary["timings"]
    print(f"data: {data}: {n_files} files, {n_bytes / 1e6:.1f} MB, "
          f"{sum(counts.values()):,} pre-tokens by the baseline regex")
    print(f"baseline (read + findall + Counter): {best_base:.2f} s "
          f"({n_bytes / 1e6 / best_base:.1f} MB/s)")
    print(f"prepare (vocab {summary['vocab_size']:,}, {summary['tokens']:,} tokens): "
          f"{best_full:.2f} s ({n_bytes / 1e6 / best_full:.1f} MB/s); last run's phases: "
          f"read {tm['read']:.2f}, count {tm['count'] - tm['read']:.2f}, vocabulary "
          f"{tm['vocab'] - tm['count']:.2f}, encode {tm['encode'] - tm['vocab']:.2f}, "
          f"write {tm['write'] - tm['encode']:.2f}")
    print(f"ratio prepare / baseline: {best_full / best_base:.2f} (goal <= 2)")
    for n, (elapsed, same) in mpi.items():
        print(f"mpirun -n {n} prepare (whole command): {elapsed:.2f} s, "
              f"{'byte-identical to' if same else 'DIFFERS FROM'} the single-process file")


if __name__ == "__main__":
    main()
