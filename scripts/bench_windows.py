"""What a step's window read costs: SplitStream.windows from the mapped dataset, page cache
warm and cold, against a training step's time (is prefetching the next step's windows worth it?).

  python scripts/bench_windows.py DATASET.h5 [--windows 6] [--seq-len 128] [--reads 200]

Cold: before each read the file's pages are dropped from the page cache
(posix_fadvise DONTNEED on this file only), so every window comes from the disk.
"""
import argparse
import os
import time

import numpy as np

from mpitrain.dataset import Dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("--windows", type=int, default=6, help="windows a worker reads a step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reads", type=int, default=200)
    args = ap.parse_args()
    stream = Dataset.open(args.dataset, check_ids=False).stream("train")
    n = (len(stream) - 1) // args.seq_len
    rng = np.random.default_rng(0)
    fd = os.open(args.dataset, os.O_RDONLY)
    print(f"{args.dataset}: {len(stream):,} train tokens, mapped={stream.mapped}; "
          f"{args.windows} windows of {args.seq_len}+1 a read; load {os.getloadavg()[0]:.1f}")
    for cold in (False, True, False, True):
        times = []
        for _ in range(args.reads):
            ids = rng.integers(0, n, args.windows)
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            stream.windows(ids, args.seq_len)
            times.append(time.perf_counter() - t)
        t = np.array(times) * 1e3
        print(f"  {'cold' if cold else 'warm'}: median {np.median(t):.3f} ms, "
              f"p90 {np.percentile(t, 90):.3f} ms, max {t.max():.3f} ms")
    os.close(fd)


if __name__ == "__main__":
    main()
