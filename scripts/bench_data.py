"""Benchmark data at scale: `prepare` memory and throughput, and worker memory, by corpus size.

  python scripts/bench_data.py [--sizes 0.1,1] [--memory-budget SIZE] [--ranks 3,12]
                               [--mpirun-prepare 1] [--steps 10] [--dir DIR] [--keep]
                               [--corpus CORPUS]
  python scripts/bench_data.py --build CORPUS BYTES   # only build a corpus (to reuse it)

It builds a synthetic corpus of the largest size in DIR (default: a temporary directory under
/tmp; smaller sizes are its first files, which is what a build of that size makes): files of
8 MiB alternating real text (slices of ../shared/data/production_training
relative to the repository) and words drawn from a Zipf-distributed (exponent 1.1) vocabulary
of 3 million made-up words, so distinct pre-tokens keep growing with the corpus as in real
data. Then:
  - `python -m mpitrain prepare --vocab-size 30000 --quiet [--memory-budget]` (a subprocess):
    wall time, MB/s of corpus text, CPU seconds (the figure to compare on a loaded machine)
    and its peak RSS (os.wait4's ru_maxrss); at the --mpirun-prepare sizes also
    `mpirun -n 2 ... prepare`, its file compared with one rank's;
  - for each of --ranks, `mpirun -n RANKS python -m mpitrain train --preset tiny --set
    max_seq_len=128 --max-steps STEPS` on that dataset: every rank's peak RSS and tokens/s
    (the run's end record).
--corpus reuses a corpus built before with --build (at least the largest size; it is kept).
Everything it makes is deleted at the end unless --keep. Check the free disk first: the
largest size needs about 3.5x its bytes while it runs (corpus, dataset, and prepare's scratch
files: pre-token ids and raw tokens).
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mpitrain.formats import vocab_txt_path  # noqa: E402

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


def mpirun():
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return local if os.path.exists(local) else shutil.which("mpirun")


def measured(cmd, env):
    """(seconds, CPU seconds, peak RSS MiB, stdout) of a command: CPU is user + system of it
    and the descendants it waited for (mpirun's ranks), the peak RSS its own (os.wait4: for
    mpirun, its largest descendant's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            last = (err.read().strip().splitlines() or ["(nothing on stderr)"])[-1]
            sys.exit(f"bench_data: {' '.join(map(str, cmd))} failed: {last}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return elapsed, cpu, usage.ru_maxrss / 1024, out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def subset(full_dir, directory, size_bytes):
    """A corpus of the first files of full_dir totalling about size_bytes (links to them):
    the generator is deterministic, so these are the files a build of that size makes."""
    os.makedirs(directory, exist_ok=True)
    total = 0
    for name in sorted(os.listdir(full_dir)):
        if total >= size_bytes:
            break
        src = os.path.join(full_dir, name)
        os.symlink(src, os.path.join(directory, name))
        total += os.path.getsize(src)
    return total, len(os.listdir(directory))


def load():
    return f"load {os.getloadavg()[0]:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1,1", help="corpus sizes in GB (10^9 bytes), run "
                    "in this order")
    ap.add_argument("--memory-budget", default=None, help="passed to prepare")
    ap.add_argument("--ranks", default="3", help="training ranks (mpirun -n, Node Zero "
                    "included), a comma-separated list")
    ap.add_argument("--mpirun-prepare", default="", help="sizes (GB) at which `mpirun -n 2 "
                    "prepare` is timed too (and its file compared with one rank's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where to build (default: a temporary dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--corpus", default=None, help="a corpus built before by --build "
                    "(reused and kept)")
    ap.add_argument("--build", nargs=2, metavar=("DIR", "BYTES"),
                    help="only build a corpus of BYTES bytes in DIR, for --corpus")
    args = ap.parse_args()
    if args.build:
        print(json.dumps(build_corpus(args.build[0], int(args.build[1]))))
        return
    env = dict(os.environ, PYTHONPATH=REPO)
    base = tempfile.mkdtemp(prefix="bench_data-", dir=args.dir)
    sizes = [float(s) for s in args.sizes.split(",")]
    twice = {float(s) for s in args.mpirun_prepare.split(",") if s}
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, Python "
          f"{platform.python_version()}; {load()} at start", flush=True)
    try:
        if args.corpus:
            full = args.corpus
            n_bytes = sum(e.stat().st_size for e in os.scandir(full))
            if n_bytes < max(sizes) * 1e9 * 0.99:
                sys.exit(f"bench_data: {full} has {n_bytes / 1e9:.2f} GB, less than the "
                         f"largest size")
            print(f"corpus: {full}, {n_bytes / 1e6:,.0f} MB (built before)", flush=True)
        else:
            full = os.path.join(base, "corpus")
            t = time.perf_counter()
            # built once, at the largest size, in a subprocess: a child forked from a process
            # holding the word list would count that memory in its own peak RSS
            n_bytes, n_files = json.loads(subprocess.run(
                [sys.executable, __file__, "--build", full, str(int(max(sizes) * 1e9))],
                check=True, capture_output=True, text=True).stdout)
            print(f"corpus: {n_files} files, {n_bytes / 1e6:,.0f} MB (built in "
                  f"{time.perf_counter() - t:.0f} s); {load()}", flush=True)
        for gb in sizes:
            tag = f"{gb:g}GB"
            corpus_dir, ds = os.path.join(base, tag), os.path.join(base, f"{tag}.h5")
            n_bytes, n_files = subset(full, corpus_dir, int(gb * 1e9))
            cmd = [sys.executable, "-m", "mpitrain", "prepare", "--data", corpus_dir, "--out", ds,
                   "--vocab-size", "30000", "--quiet"]
            if args.memory_budget:
                cmd += ["--memory-budget", args.memory_budget]
            print(f"[{tag}] {n_files} files, {n_bytes / 1e6:,.0f} MB; {load()}", flush=True)
            secs, cpu, rss, out = measured(cmd, env)
            print(f"[{tag}] prepare: {secs:.1f} s, {n_bytes / 1e6 / secs:.2f} MB/s, CPU "
                  f"{cpu:.1f} s ({n_bytes / 1e6 / cpu:.2f} MB per CPU-second), peak RSS "
                  f"{rss:,.0f} MiB; {load()}; {out.strip()}", flush=True)
            if gb in twice:
                two = os.path.join(base, f"{tag}-2.h5")
                secs2, cpu2, rss2, _ = measured(
                    [mpirun(), "-n", "2"] + cmd[:cmd.index("--out") + 1] + [two] +
                    cmd[cmd.index("--out") + 2:], env)
                same = sha256_file(two) == sha256_file(ds)
                os.unlink(two)
                os.unlink(vocab_txt_path(two))
                print(f"[{tag}] mpirun -n 2 prepare: {secs2:.1f} s ({secs / secs2:.2f}x one "
                      f"rank's speed), CPU {cpu2:.1f} s, largest rank's peak RSS "
                      f"{rss2:,.0f} MiB, {'byte-identical' if same else 'DIFFERENT FILE'}; "
                      f"{load()}", flush=True)
            shutil.rmtree(corpus_dir)
            for ranks in (int(r) for r in args.ranks.split(",")):
                run_dir = os.path.join(base, f"run-{tag}-{ranks}")
                cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", "mpitrain",
                       "train", "--preset", "tiny", "--dataset", ds, "--set", "max_seq_len=128",
                       "--max-steps", str(args.steps), "--run-dir", run_dir, "--quiet"]
                secs, _, _, _ = measured(cmd, env)
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    end = [json.loads(line) for line in f if '"end"' in line][-1]
                rss = end["peak_rss_mb"]
                print(f"[{tag}] train -n {ranks} ({args.steps} steps, {secs:.0f} s): peak RSS "
                      f"per rank (MiB, Node Zero first) {rss}; workers' max "
                      f"{max(rss[1:]):.1f}; {end.get('tokens_per_s', 0):,.0f} tokens/s; "
                      f"{load()}", flush=True)
                shutil.rmtree(run_dir)
            os.unlink(ds)
            os.unlink(vocab_txt_path(ds))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
