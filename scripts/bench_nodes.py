"""Training across nodes: the measurements behind docs/SCALING.md's cost model, in one invocation.

    python scripts/bench_nodes.py                  # everything (seed preset), ~10 min on 2 cores
    python scripts/bench_nodes.py --no-runs        # the three micro-measurements only

1. compute: seconds per training window of the seed model (forward + backward of one window of
   seq_len tokens) on one core, from calls of MICRO_WINDOWS windows, as the workers make them;
2. the intra-node reduction: hierarchy.node_sum of L gradient arenas of the seed model's size
   (what a node's workers do through shared memory), seconds and bytes read per second;
3. the inter-node path: a ping-pong between two logical nodes (`mpiexec -launcher fork -hosts
   nodea:1,nodeb:1`: MPICH's network path, here over loopback) for 8 B to 32 MB: latency (half
   the round trip of 8 B) and bandwidth (half the round trip of 32 MB);
4. the trainer on logical nodes (--layouts, default 2 and 3 nodes of 3 workers), each layout
   twice in this invocation: the two-level exchange and the flat one (MPITRAIN_HIERARCHICAL=0);
   per layout the bytes each node sent to other nodes per step (from the end record), their ratio
   to the parameter bytes and to the bound 2 (nodes - 1)/nodes, the mean step time of steps 2..,
   and the model's prediction of that step time from 1.-3. (how far off).
Prints one JSON line per measurement after the human-readable lines (--json FILE saves them).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

PING = r"""
import sys, time, json, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD; r = c.Get_rank()
out = []
for size in [8, 1024, 65536, 1 << 20, 8 << 20, 32 << 20]:
    buf = np.zeros(size // 4, np.float32)
    reps = 50 if size <= 65536 else 5
    c.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        if r == 0:
            c.Send(buf, 1); c.Recv(buf, 1)
        else:
            c.Recv(buf, 0); c.Send(buf, 0)
    out.append((size, (time.perf_counter() - t0) / reps / 2))
if r == 0:
    print(json.dumps(out))
"""


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else "mpiexec"


def seed_config():
    from mpitrain import ModelConfig
    from mpitrain.config import PRESETS

    return ModelConfig(**PRESETS["seed"]["model"]), PRESETS["seed"]["train"]


def measure_compute(repeats: int = 3) -> float:
    """Seconds per window (one core), from forward_backward calls of MICRO_WINDOWS windows."""
    from mpitrain import Model
    from mpitrain.trainer.worker import MICRO_WINDOWS

    cfg, tc = seed_config()
    m = Model(cfg, seed=0, threads=1)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats + 1):
        w = rng.integers(0, cfg.vocab_size, (MICRO_WINDOWS, tc["seq_len"] + 1)).astype(np.int32)
        t0 = time.perf_counter()
        m.forward_backward(w[:, :-1], w[:, 1:], grad_scale=1.0 / w.size)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:])) / MICRO_WINDOWS


def measure_node_sum(workers: int) -> tuple:
    """(seconds, bytes read per second) of one node's sum of `workers` seed-sized arenas."""
    from mpitrain.model import parameter_count
    from mpitrain.trainer.collectives import SHARED_PIECE
    from mpitrain.trainer.hierarchy import node_sum

    n = parameter_count(seed_config()[0])
    arrays = [np.full(n, 1.0 + i, np.float32) for i in range(workers)]
    out = np.empty(n, np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        node_sum(arrays, 0, out, 0, n, SHARED_PIECE)
        best = min(best, time.perf_counter() - t0)
    return best, workers * n * 4 / best


def measure_network() -> dict:
    """{bytes: one-way seconds} between two logical nodes."""
    cmd = [mpiexec(), "-launcher", "fork", "-hosts", "nodea:1,nodeb:1", "-n", "2",
           sys.executable, "-c", PING]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"bench_nodes: ping-pong failed:\n{proc.stderr}")
    return {int(s): t for s, t in json.loads(proc.stdout.strip().splitlines()[-1])}


def run_layout(hosts: str, dataset: str, steps: int, flat: bool) -> dict:
    from bench_scaling import run_trainer

    launch = [mpiexec(), "-launcher", "fork", "-hosts", hosts,
              "-n", str(sum(int(h.split(":")[1]) for h in hosts.split(",")))]
    env = dict(os.environ, PYTHONPATH=REPO, MPITRAIN_HIERARCHICAL="0" if flat else "1")
    records, end, _ = run_trainer(launch, "seed", dataset, steps + 1, env=env)
    tokens = end["tokens"] / end["steps"]
    seconds = [tokens / r["tokens_per_s"] for r in records if r["step"] >= 2]
    return {"hosts": hosts, "flat": flat, "step_s": float(np.mean(seconds)),
            "bytes_by_node": end["bytes_to_other_nodes_per_step_by_node"],
            "peak_rss_mb": end["peak_rss_mb"]}


def predicted_step(workers_per_node: list, batch: int, t_window: float, node_sum_bps: float,
                   latency: float, bandwidth: float, param_bytes: int, flat: bool,
                   cores: int) -> float:
    """docs/SCALING.md's model, for logical nodes that share one machine's `cores` cores: every
    node's windows, node sums and network copies run on the same cores, so their times add
    (compute of all windows over the cores; every worker's gradient read once by a sum, over the
    cores; every node's bytes to other nodes through the one loopback path) plus the latency of
    each exchange's rounds."""
    k, m = sum(workers_per_node), len(workers_per_node)
    compute = batch * t_window / cores
    sums = k * param_bytes / node_sum_bps / cores
    if flat:
        sent = sum(2 * (k - n) / k * param_bytes * n for n in workers_per_node)
        rounds = 2 * (k - 1)
    else:
        sent = m * 2 * (m - 1) / m * param_bytes
        rounds = 2 * (m - 1)
    return compute + sums + sent / bandwidth + rounds * latency


def cluster_table(param_bytes: float, core_tokens_per_s: float, seq_len: int, cores: int,
                  mem_bytes_per_s: float, latency: float, workers_per_node: int = 12,
                  windows_per_worker: int = 3) -> list:
    """docs/SCALING.md's predictions: rows (workers, nodes, batch, windows per worker, compute s,
    {Gb/s: (two-level s, flat s)}) for the seed model on nodes of `cores` cores."""
    t_window = seq_len / core_tokens_per_s                  # one core
    rows = []
    for k in (1, 12, 144, 1728):
        per_node = min(k, workers_per_node)
        m = -(-k // per_node)
        batch = 32 if k <= 12 else windows_per_worker * k
        compute = batch / m * t_window / cores               # the node's windows on its cores
        node_sum = per_node * param_bytes / mem_bytes_per_s if k > 1 else 0.0
        exchange = {}
        for gbps in (10, 25, 100):
            bw = gbps / 8 * 1e9
            two = node_sum + 2 * (m - 1) / m * param_bytes / bw + 2 * (m - 1) * latency
            flat = (per_node * 2 * (k - per_node) / k * param_bytes / bw
                    + 2 * (k - 1) * latency) if m > 1 else node_sum
            exchange[gbps] = (two, flat)
        rows.append((k, m, batch, -(-batch // k), compute, exchange))
    return rows


def print_cluster_table(param_bytes, seq_len, args) -> None:
    print(f"predicted (seed model, {args.core_tokens_per_s:.0f} tokens/s a core, node memory "
          f"{args.mem_gbs:.0f} GB/s, latency {args.latency_us:.0f} us, 12 workers a node):")
    for cores in (32, 64):
        print(f"  nodes of {cores} cores: workers nodes batch windows/worker compute_s | "
              "two-level s (efficiency), flat s (efficiency) at 10 / 25 / 100 Gb/s")
        for k, m, batch, w, comp, ex in cluster_table(param_bytes, args.core_tokens_per_s,
                                                      seq_len, cores, args.mem_gbs * 1e9,
                                                      args.latency_us * 1e-6):
            cells = [f"{ex[g][0]:.3f} ({comp / (comp + ex[g][0]):.2f}), "
                     f"{ex[g][1]:.3f} ({comp / (comp + ex[g][1]):.2f})" for g in (10, 25, 100)]
            print(f"  {k:5d} {m:4d} {batch:5d} {w:3d} {comp:.3f} | " + " | ".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed trainer steps per run")
    ap.add_argument("--layouts", default="nodea:4,nodeb:3;nodea:4,nodeb:3,nodec:3",
                    help="mpiexec -hosts values, ';' between layouts (Node Zero is on the "
                    "first host)")
    ap.add_argument("--no-runs", action="store_true", help="skip the trainer runs")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--predict-only", action="store_true",
                    help="print docs/SCALING.md's cluster table and exit")
    ap.add_argument("--core-tokens-per-s", type=float, default=888.0,
                    help="seed tokens/s of one core for the cluster table (default: the kernel "
                    "alone on 2 threads in docs/BENCHMARKS.md, 1776/2)")
    ap.add_argument("--mem-gbs", type=float, default=50.0,
                    help="a cluster node's memory bandwidth for the node sum (assumed)")
    ap.add_argument("--latency-us", type=float, default=20.0,
                    help="a cluster network's message latency (assumed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from mpitrain.model import parameter_count

    results = []
    cfg, tc = seed_config()
    p_bytes = 4 * parameter_count(cfg)
    if args.predict_only:
        print_cluster_table(p_bytes, tc["seq_len"], args)
        return
    print(f"seed model: {p_bytes / 1e6:.1f} MB of parameters; {os.cpu_count()} CPU(s); "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    t_window = measure_compute()
    print(f"compute: {t_window:.3f} s per window of {tc['seq_len']} tokens on one core "
          f"({tc['seq_len'] / t_window:.0f} tokens/s a core)", flush=True)
    results.append({"what": "compute", "seconds_per_window": t_window})
    for workers in (2, 4):
        s, bps = measure_node_sum(workers)
        print(f"node sum of {workers} arenas: {s:.3f} s, {bps / 1e9:.2f} GB/s read", flush=True)
        results.append({"what": "node_sum", "workers": workers, "seconds": s, "bytes_per_s": bps})
    net = measure_network()
    latency, big = net[8], max(net)
    bandwidth = big / net[big]
    print(f"between logical nodes: latency {latency * 1e6:.1f} us, {bandwidth / 1e9:.2f} GB/s "
          f"({big >> 20} MB messages); " + ", ".join(f"{s} B: {t * 1e6:.0f} us"
                                                      for s, t in sorted(net.items())), flush=True)
    results.append({"what": "network", "latency_s": latency, "bytes_per_s": bandwidth,
                    "one_way_s": {str(s): t for s, t in net.items()}})
    if not args.no_runs:
        from bench_scaling import ensure_dataset

        dataset = ensure_dataset("seed")
        node_bps = results[1]["bytes_per_s"]
        for hosts in args.layouts.split(";"):
            per_node = [int(h.split(":")[1]) for h in hosts.split(",")]
            per_node[0] -= 1                                   # Node Zero
            m = len(per_node)
            for flat in (False, True):
                r = run_layout(hosts, dataset, args.steps, flat)
                pred = predicted_step(per_node, tc["batch_size"], t_window, node_bps, latency,
                                      bandwidth, p_bytes, flat, os.cpu_count())
                r.update(workers_per_node=per_node, param_bytes=p_bytes,
                         bound_bytes=2 * (m - 1) / m * p_bytes, predicted_step_s=pred)
                print(f"{hosts} {'flat     ' if flat else 'two-level'}: per node per step "
                      + ", ".join(f"{b / 1e6:.1f} MB" for b in r["bytes_by_node"])
                      + f" = {max(r['bytes_by_node']) / p_bytes:.2f} P (bound "
                      f"{2 * (m - 1) / m:.2f} P); step {r['step_s']:.2f} s, predicted "
                      f"{pred:.2f} s ({100 * (pred / r['step_s'] - 1):+.0f}%); worker peak RSS "
                      f"{max(r['peak_rss_mb'][1:]):.0f} MB", flush=True)
                results.append({"what": "layout", **r})
            two, flat = results[-2], results[-1]
            print(f"{hosts}: flat / two-level bytes per node = "
                  f"{max(flat['bytes_by_node']) / max(two['bytes_by_node']):.2f}", flush=True)
    print_cluster_table(p_bytes, tc["seq_len"], args)
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
