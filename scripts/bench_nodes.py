"""Training across nodes: the measurements behind docs/SCALING.md's cost model, in one invocation.

    python scripts/bench_nodes.py                  # everything (seed preset), ~30 min on 2 busy cores
    python scripts/bench_nodes.py --no-runs        # the micro-measurements only

The micro-measurements are in CPU seconds (on an idle core the same as wall seconds; on a
machine shared with other jobs wall time counts their share too):
1. compute: CPU seconds per training window of the seed model (forward + backward of one
   window of seq_len tokens) on one thread, in calls of MICRO_WINDOWS windows and of as many as
   the workers of the layouts below make; and the gradient norm and AdamW over the whole arena;
2. the intra-node reduction: hierarchy.node_sum of L gradient arenas of the seed model's size
   (what a node's workers do through shared memory), CPU seconds and bytes read a CPU second;
3. the message paths: a ping-pong between two logical nodes (`mpiexec -launcher fork -hosts
   nodea:1,nodeb:1`: MPICH's network path, here over loopback) and between two ranks on one
   node (its shared-memory path), 8 B to 32 MB: latency and bandwidth (half the round trip of
   8 B, of 32 MB) and the CPU seconds of both ranks for them;
4. the trainer on logical nodes (--layouts, default 2 and 3 nodes of 5 workers), each layout
   three ways in this invocation, --rounds times, the order turned round every round (so a
   drift of the machine's load falls on every way alike): the two-level exchange, the flat one
   (MPITRAIN_HIERARCHICAL=0: private copies and the pairwise exchange among all workers, the
   only scheme before; its losses are bitwise those of the code before the two-level exchange)
   and the same number of workers on one node (`mpiexec -n`); per run the bytes each node sent
   to other nodes per step (from the end record), their ratio to the parameter bytes and to the
   bound 2 (nodes - 1)/nodes, the median step time of steps 2.., the CPU seconds of a step (all
   the run's processes, sampled from /proc between the records of step 1 and of the last), the
   workers' peak RSS and the load average before the run; per layout the medians, the losses
   against one node, and the model's CPU seconds of a step from 1.-3. and its difference to the
   one-node run against the measured ones (how far off).
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

PRESET = "seed"             # the trainer runs' preset (a test may run them on "tiny")

PING = r"""
import sys, time, json, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD; r = c.Get_rank()
out = []
for size in [8, 1024, 65536, 1 << 20, 8 << 20, 32 << 20]:
    buf = np.zeros(size // 4, np.float32)
    reps = 50 if size <= 65536 else 5
    c.Barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        if r == 0:
            c.Send(buf, 1); c.Recv(buf, 1)
        else:
            c.Recv(buf, 0); c.Send(buf, 0)
    cpu = c.allreduce(time.process_time() - c0)
    out.append((size, (time.perf_counter() - t0) / reps / 2, cpu / reps / 2))
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


def measure_compute(windows: int, repeats: int = 3) -> float:
    """CPU seconds per window (one thread), from forward_backward calls of `windows` windows
    (the workers make calls of up to MICRO_WINDOWS: fewer when they hold fewer windows, and a
    window costs more in a smaller call). CPU time: on a loaded machine wall time would count
    the other jobs' share."""
    from mpitrain import Model

    cfg, tc = seed_config()
    m = Model(cfg, seed=0, threads=1)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats + 1):
        w = rng.integers(0, cfg.vocab_size, (windows, tc["seq_len"] + 1)).astype(np.int32)
        t0 = time.process_time()
        m.forward_backward(w[:, :-1], w[:, 1:], grad_scale=1.0 / w.size)
        times.append(time.process_time() - t0)
    return float(np.median(times[1:])) / windows


def measure_update(repeats: int = 3) -> float:
    """CPU seconds (one thread) of the gradient norm and AdamW over the whole seed arena: what
    all the workers of a step do together, each on its slice."""
    from mpitrain import Model, optim

    cfg, tc = seed_config()
    m = Model(cfg, seed=0, threads=1)
    m.grad_buffer[...] = 1e-3
    times = []
    for step in range(1, repeats + 2):
        t0 = time.process_time()
        norm = optim.grad_norm(m)
        optim.update(m, lr=1e-4, step=step, norm=norm, max_norm=1.0)
        times.append(time.process_time() - t0)
    return float(np.median(times[1:]))


def call_sizes(workers: int, batch: int) -> list:
    """The windows of every kernel call of a step among `workers` workers (the tail windows of
    mpi_worker.call_ranges left out: they change the threads, not the calls' CPU much)."""
    from mpitrain.topology import assign_windows
    from mpitrain.trainer.worker import MICRO_WINDOWS

    return [min(MICRO_WINDOWS, len(share) - a) for share in assign_windows(workers, batch)
            for a in range(0, len(share), MICRO_WINDOWS)]


def measure_node_sum(workers: int) -> tuple:
    """(CPU seconds, bytes read per CPU second) of one node's sum of `workers` seed-sized
    arenas."""
    from mpitrain.model import parameter_count
    from mpitrain.trainer.collectives import SHARED_PIECE
    from mpitrain.trainer.hierarchy import node_sum

    n = parameter_count(seed_config()[0])
    arrays = [np.full(n, 1.0 + i, np.float32) for i in range(workers)]
    out = np.empty(n, np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        node_sum(arrays, 0, out, 0, n, SHARED_PIECE)
        best = min(best, time.process_time() - t0)
    return best, workers * n * 4 / best


def measure_network(hosts: str = "nodea:1,nodeb:1") -> dict:
    """{bytes: (one-way seconds, CPU seconds of both ranks per one-way message)} between two
    ranks: on two logical nodes (MPICH's network path), or with hosts=None on one node (its
    shared-memory path)."""
    where = ["-launcher", "fork", "-hosts", hosts] if hosts else []
    cmd = [mpiexec(), *where, "-n", "2", sys.executable, "-c", PING]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"bench_nodes: ping-pong failed:\n{proc.stderr}")
    return {int(s): (t, c) for s, t, c in json.loads(proc.stdout.strip().splitlines()[-1])}


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by process `root` and all its descendants."""
    parent, cpu = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        cpu[int(pid)] = int(fields[11]) + int(fields[12])
    tree, grew = {root}, True
    while grew:
        more = {p for p, q in parent.items() if q in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(cpu.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def run_layout(hosts: str, dataset: str, steps: int, way: str) -> dict:
    """One trainer run of `steps` timed steps (after a first one): `way` is "two-level" or
    "flat" on the logical nodes `hosts`, or "one node" with as many workers. Besides the step
    times the trainer records, the CPU seconds of all the run's processes between the records
    of step 1 and of the last step are sampled from /proc: on a loaded machine they tell the
    work of a step better than its wall time does."""
    import tempfile

    ranks = sum(int(h.split(":")[1]) for h in hosts.split(","))
    launch = ([mpiexec(), "-n", str(ranks)] if way == "one node" else
              [mpiexec(), "-launcher", "fork", "-hosts", hosts, "-n", str(ranks)])
    env = dict(os.environ, PYTHONPATH=REPO, MPITRAIN_HIERARCHICAL="0" if way == "flat" else "1")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [*launch, sys.executable, "-m", "mpitrain", "train", "--preset", PRESET,
               "--dataset", dataset, "--run-dir", run_dir, "--max-steps", str(steps + 1),
               "--epochs", "1000", "--eval-every", "1000000", "--save-every", "1000000",
               "--quiet"]
        metrics = os.path.join(run_dir, "metrics.jsonl")
        with open(os.path.join(tmp, "stderr"), "w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            marks = {}
            while proc.poll() is None:
                time.sleep(0.1)
                try:
                    with open(metrics) as f:
                        done = [json.loads(x).get("step") for x in f if '"loss"' in x]
                except (OSError, ValueError):
                    continue
                for step in (1, steps + 1):
                    if step in done and step not in marks:
                        marks[step] = tree_cpu_seconds(proc.pid)
            if proc.returncode != 0:
                err.seek(0)
                sys.exit(f"bench_nodes: {' '.join(cmd)} failed:\n{err.read()}")
        with open(metrics) as f:
            records = [json.loads(line) for line in f]
    end = [r for r in records if r.get("event") == "end"][-1]
    records = [r for r in records if "loss" in r and "event" not in r]
    tokens = end["tokens"] / end["steps"]
    seconds = [tokens / r["tokens_per_s"] for r in records if r["step"] >= 2]
    cpu = (marks[steps + 1] - marks[1]) / steps if len(marks) == 2 else float("nan")
    return {"hosts": hosts, "way": way, "step_s": float(np.median(seconds)),
            "steps_s": seconds, "cpu_step_s": cpu, "load_before": load,
            "losses": [r["loss"] for r in records],
            "bytes_by_node": end["bytes_to_other_nodes_per_step_by_node"],
            "peak_rss_mb": end["peak_rss_mb"]}


def predicted_work(workers_per_node: list, batch: int, t_window: dict, update_s: float,
                   node_sum_bps: float, net: tuple, shm: tuple, param_bytes: int,
                   way: str) -> float:
    """docs/SCALING.md's model for logical nodes that share one machine: the CPU seconds of a
    step (all processes), since every node's windows, sums and copies run on the same cores; on
    an otherwise idle machine the step takes this over the cores. `t_window`: CPU seconds a
    window by windows a kernel call; `net` and `shm`: (CPU seconds a message, bytes a CPU
    second) between two logical nodes and within one node.

      compute   every window, at its call's size                   sum of t_w(call) x call
      update    the gradient norm and AdamW over the whole arena   U
      sums      every worker's gradient read once                  k P / mu_1
      two-level + every node's bytes to the others                 m 2 (m - 1)/m P / beta
                + a message's cost for its 2 (m - 1) rounds a node  m 2 (m - 1) alpha
      flat      + the bytes to other nodes as above, the messages within a node through shared
                  memory (2 (k - 1) P in all), 2 (k - 1) rounds a worker
      one node  compute + update + sums (the reduction reads the arenas in place, a barrier
                publishes)
    """
    k, m = sum(workers_per_node), len(workers_per_node)
    base = (sum(c * t_window[c] for c in call_sizes(k, batch)) + update_s
            + k * param_bytes / node_sum_bps)
    if way == "one node":
        return base
    if way == "flat":
        remote = sum(2 * (k - n) / k * param_bytes * n for n in workers_per_node)
        local = 2 * (k - 1) * param_bytes - remote
        return base + remote / net[1] + local / shm[1] + k * 2 * (k - 1) * net[0]
    return base + 2 * (m - 1) * param_bytes / net[1] + m * 2 * (m - 1) * net[0]


def layout_summary(hosts, per_node, runs, batch, t_window, update_s, node_bps, links, p_bytes,
                   cores):
    """Print and return one layout's comparison: per way the median over its runs of the step
    and its CPU seconds, the workers' peak RSS, the bytes ratio, the losses' agreement, and the
    model's CPU seconds of a step and their difference to the one-node run against the
    measured ones."""
    med = {w: {key: float(np.median([r[key] for r in rs])) for key in ("step_s", "cpu_step_s")}
           for w, rs in runs.items()}
    rss = {w: max(max(r["peak_rss_mb"][1:]) for r in rs) for w, rs in runs.items()}
    pred = {w: predicted_work(per_node, batch, t_window, update_s, node_bps, links["network"],
                              links["shared memory"], p_bytes, w) for w in runs}
    one = runs["one node"][0]["losses"]
    agree = {w: max(abs(a - b) / abs(b) for a, b in zip(rs[0]["losses"], one))
             for w, rs in runs.items()}
    two, flat = (max(runs[w][0]["bytes_by_node"]) for w in ("two-level", "flat"))
    print(f"{hosts}: bytes per node and step flat / two-level = {flat / two:.2f}; two-level / "
          f"bound = {two / runs['two-level'][0]['bound_bytes']:.3f}")
    ref = med["one node"]
    for w in runs:
        cpu = med[w]["cpu_step_s"]
        print(f"  {w:9s}: step {med[w]['step_s']:.2f} s (x{med[w]['step_s'] / ref['step_s']:.3f}"
              f" of one node), CPU {cpu:.2f} s a step (x{cpu / ref['cpu_step_s']:.3f}); "
              f"worker peak RSS max {rss[w]:.0f} MB; losses vs one node {agree[w]:.1e}; model "
              f"{pred[w]:.2f} CPU s ({100 * (pred[w] / cpu - 1):+.0f}%, idle-machine step "
              f"{pred[w] / cores:.2f} s); against one node: measured "
              f"{cpu - ref['cpu_step_s']:+.2f} CPU s, model {pred[w] - pred['one node']:+.2f}",
              flush=True)
    return {"what": "layout summary", "hosts": hosts, "median": med, "worker_peak_rss_mb": rss,
            "predicted_cpu_step_s": pred, "loss_rel_vs_one_node": agree,
            "bytes_flat_over_two_level": flat / two}


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
    ap.add_argument("--layouts", default="nodea:6,nodeb:5;nodea:6,nodeb:5,nodec:5",
                    help="mpiexec -hosts values, ';' between layouts (Node Zero is on the "
                    "first host)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of every way per layout, alternating their order")
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
    from mpitrain.trainer.worker import MICRO_WINDOWS

    layouts = [[int(h.split(":")[1]) for h in hosts.split(",")]
               for hosts in args.layouts.split(";")]
    sizes = {MICRO_WINDOWS}.union(*(call_sizes(sum(n) - 1, tc["batch_size"]) for n in layouts)
                                  if not args.no_runs else ())
    t_window = {}
    for windows in sorted(sizes):
        t_window[windows] = measure_compute(windows)
        print(f"compute: {t_window[windows]:.3f} CPU s a window of {tc['seq_len']} tokens in "
              f"calls of {windows} ({tc['seq_len'] / t_window[windows]:.0f} tokens a CPU "
              "second)", flush=True)
        results.append({"what": "compute", "windows_per_call": windows,
                        "seconds_per_window": t_window[windows]})
    update_s = measure_update()
    print(f"gradient norm and AdamW over the whole arena: {update_s:.3f} CPU s", flush=True)
    results.append({"what": "update", "seconds": update_s})
    for workers in (2, 4):
        s, bps = measure_node_sum(workers)
        print(f"node sum of {workers} arenas: {s:.3f} CPU s, {bps / 1e9:.2f} GB read a CPU "
              "second", flush=True)
        results.append({"what": "node_sum", "workers": workers, "seconds": s, "bytes_per_s": bps})
    links = {}
    for name, hosts in (("network", "nodea:1,nodeb:1"), ("shared memory", None)):
        net = measure_network(hosts)
        big = max(net)
        links[name] = (net[8][1], big / net[big][1])   # CPU s a message, bytes a CPU second
        print(f"{'between logical nodes' if hosts else 'within one node'}: latency "
              f"{net[8][0] * 1e6:.1f} us, {big / net[big][0] / 1e9:.2f} GB/s ({big >> 20} MB "
              f"messages); CPU of both ranks {net[8][1] * 1e6:.1f} us a message, "
              f"{big / net[big][1] / 1e9:.2f} GB a CPU second; one-way "
              + ", ".join(f"{s} B: {t * 1e6:.0f} us" for s, (t, _) in sorted(net.items())),
              flush=True)
        results.append({"what": name, "latency_s": net[8][0], "bytes_per_s": big / net[big][0],
                        "cpu_s_per_message": net[8][1], "bytes_per_cpu_s": big / net[big][1],
                        "one_way_s": {str(s): t for s, t in net.items()}})
    if not args.no_runs:
        from bench_scaling import ensure_dataset

        dataset = ensure_dataset("seed")
        node_bps = next(r["bytes_per_s"] for r in results if r["what"] == "node_sum")
        ways = ["two-level", "flat", "one node"]
        for hosts in args.layouts.split(";"):
            per_node = [int(h.split(":")[1]) for h in hosts.split(",")]
            per_node[0] -= 1                                   # Node Zero
            m = len(per_node)
            runs = {w: [] for w in ways}
            for i in range(args.rounds):
                for way in (ways if i % 2 == 0 else ways[::-1]):
                    r = run_layout(hosts, dataset, args.steps, way)
                    r.update(workers_per_node=per_node, param_bytes=p_bytes,
                             bound_bytes=2 * (m - 1) / m * p_bytes)
                    runs[way].append(r)
                    print(f"{hosts} {way:9s} (load {r['load_before']:.1f}): per node per step "
                          + ", ".join(f"{b / 1e6:.1f} MB" for b in r["bytes_by_node"])
                          + f" = {max(r['bytes_by_node']) / p_bytes:.2f} P (bound "
                          f"{2 * (m - 1) / m:.2f} P); step {r['step_s']:.2f} s, CPU "
                          f"{r['cpu_step_s']:.2f} s a step; worker peak RSS "
                          f"{min(r['peak_rss_mb'][1:]):.0f}-{max(r['peak_rss_mb'][1:]):.0f} MB",
                          flush=True)
                    results.append({"what": "layout", **r})
            summary = layout_summary(hosts, per_node, runs, tc["batch_size"], t_window,
                                     update_s, node_bps, links, p_bytes, os.cpu_count())
            results.append(summary)
    print_cluster_table(p_bytes, tc["seq_len"], args)
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
