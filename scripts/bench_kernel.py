#!/usr/bin/env python
"""Training-step speed and memory of the C kernel against the same model in PyTorch.

    python scripts/bench_kernel.py                                   # seed model, batch 32 x 128
    python scripts/bench_kernel.py --preset tiny --batch 4 --steps 2 # seconds, for a smoke test
    python scripts/bench_kernel.py --patterns --preset small --batch 4 --window 16
                                     # dense vs Ulam attention at seq_len 128 and 1,024

One step = forward+backward of a batch, global-norm clip at 1.0, AdamW (as the trainer does).
Every measurement runs in its own subprocess of this invocation, so each has its own peak RSS
(resource.getrusage) and one BLAS thread pool in use:
  ours   mpitrain.Model(threads=t) with OPENBLAS_NUM_THREADS=1: the kernel's own t threads do
         the parallel work, and neither numpy's OpenBLAS nor scipy-openblas32 starts a pool of
         its own (the two pools slow each other down when both run threads). After the steps
         (and after reading the peak RSS) the same process times a large SGEMM through
         scipy-openblas32 (the library the kernel calls) on min(t, CPUs) OpenBLAS threads: the
         machine's matrix-product peak we compare against.
  floor  the step's matrix products timed one by one through scipy-openblas32 on min(t, CPUs)
         OpenBLAS threads: the time a step cannot beat without faster GEMMs.
  torch  scripts/torch_gpt.py with torch.set_num_threads(t) (skipped when torch is missing).
Printed per thread count: tokens/s, ratio ours/PyTorch, achieved GFLOP/s (FLOPs per token as
mpitrain/trainer/peak.py counts them), fraction of the SGEMM peak, peak RSS per process, and
where our step's time goes (forward+backward / clip / AdamW, and per layer kind if the kernel
exposes timers).
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
try:
    from mpitrain.config import ModelConfig
except ImportError:  # not installed: the checkout's package (the kernel itself needs an install)
    sys.path.insert(0, str(HERE.parent))
    from mpitrain.config import ModelConfig
from mpitrain.trainer.peak import flops_per_token, openblas, sgemm, sgemm_peak_gflops  # noqa: E402

CLIP = 1.0
LR = 1e-4


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def random_batch(cfg, batch, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int64)
    return w[:, :-1], w[:, 1:]


# ---- the matrix products of a step ------------------------------------------------------------

def step_gemms(cfg, batch, seq):
    """The matrix products of one training step: (count, transA, transB, M, N, K) row-major.
    Linear y = x W^T with W (OC,IC): forward (N,OC) = (N,IC)(OC,IC)^T; backward
    dx (N,IC) = dy (N,OC) W, dW (OC,IC) = dy^T x. Attention per (batch, head) on (T,hd):
    S = Q K^T, Y = P V; backward dP = dY V^T, dV = P^T dY, dQ = dS K, dK = dS^T Q."""
    n, d, f, T = batch * seq, cfg.d_model, cfg.d_ff, seq
    hd, items = cfg.head_dim, batch * cfg.n_heads
    linears = [(d, 3 * d), (d, d), (d, f), (f, d)]  # (IC, OC) of c_attn, c_proj, c_fc, c_proj
    out = []
    for ic, oc in linears:
        out += [(cfg.n_layers, False, True, n, oc, ic), (cfg.n_layers, False, False, n, ic, oc),
                (cfg.n_layers, True, False, oc, ic, n)]
    out += [(1, False, True, n, cfg.vocab_size, d), (1, False, False, n, d, cfg.vocab_size),
            (1, True, False, cfg.vocab_size, d, n)]
    L = cfg.n_layers * items
    out += [(L, False, True, T, T, hd), (L, False, False, T, hd, T),
            (L, False, True, T, T, hd), (L, True, False, T, hd, T),
            (L, False, False, T, hd, T), (L, True, False, T, hd, T)]
    return out


def gemm_floor(threads, cfg, batch, seq):
    """Seconds for one step's matrix products timed one by one on `threads` OpenBLAS threads
    (second of two passes), and their FLOPs."""
    lib = openblas()
    lib.scipy_openblas_set_num_threads(threads)
    rng = np.random.default_rng(0)
    gemms = step_gemms(cfg, batch, seq)
    seconds = 0.0
    for count, ta, tb, m, n, k in gemms:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        c = np.empty((m, n), np.float32)
        for rep in range(2):
            t0 = time.perf_counter()
            for _ in range(count):
                sgemm(lib, ta, tb, m, n, k, a, b, c)
            if rep:
                seconds += time.perf_counter() - t0
    return seconds, sum(2.0 * cnt * m * n * k for cnt, _, _, m, n, k in gemms)


# ---- the measured processes -------------------------------------------------------------------

def blas_threads(threads):
    """OpenBLAS threads for the peak and the floor: the requested count, at most one per CPU."""
    return min(threads, os.cpu_count() or 1)


def run_ours(cfg, a):
    res = _run_model(cfg, a)
    # After the model: its peak RSS is taken first, so the SGEMM buffers do not count.
    res["rss_mb"] = peak_rss_mb()
    res["sgemm_gflops"] = sgemm_peak_gflops(threads=blas_threads(a.threads), size=a.sgemm_size)
    return res


def _run_model(cfg, a):
    try:
        from mpitrain import Model, optim
    except ImportError as e:  # before the model lands: the peak alone is still useful
        return {"error": f"mpitrain.Model unavailable ({e})"}
    res = {}
    model = Model(cfg, seed=0, threads=a.threads)
    x, y = (t.astype(np.int32) for t in random_batch(cfg, a.batch, a.seq))
    timers = getattr(model, "timers", None)
    parts = {"forward_backward": 0.0, "grad_norm": 0.0, "clip+adamw": 0.0}
    losses = []
    for step in range(1, a.warmup + a.steps + 1):
        if step == a.warmup + 1:
            kinds0 = dict(timers()) if callable(timers) else None
            start = time.perf_counter()
        t0 = time.perf_counter()
        losses.append(model.forward_backward(x, y))
        t1 = time.perf_counter()
        norm = optim.grad_norm(model)
        t2 = time.perf_counter()
        optim.update(model, lr=LR, step=step, norm=norm, max_norm=CLIP)
        t3 = time.perf_counter()
        if step > a.warmup:
            parts["forward_backward"] += t1 - t0
            parts["grad_norm"] += t2 - t1
            parts["clip+adamw"] += t3 - t2
    res["seconds"] = time.perf_counter() - start
    res["parts"] = {k: v / a.steps for k, v in parts.items()}
    if kinds0 is not None:
        res["kinds"] = {k: (v - kinds0.get(k, 0.0)) / a.steps for k, v in timers().items()}
    res["losses"] = losses
    return res


def run_torch(cfg, a):
    import torch

    sys.path.insert(0, str(HERE))
    from torch_gpt import TorchGPT, train_step

    torch.set_num_threads(a.threads)
    net = TorchGPT(cfg, seed=0)
    opt = net.adamw(lr=LR)
    x, y = (torch.from_numpy(t) for t in random_batch(cfg, a.batch, a.seq))
    losses = []
    for step in range(1, a.warmup + a.steps + 1):
        if step == a.warmup + 1:
            start = time.perf_counter()
        losses.append(train_step(net, opt, x, y, CLIP)[0])
    return {"seconds": time.perf_counter() - start, "losses": losses,
            "torch": torch.__version__}


def run_floor(cfg, a):
    seconds, flops = gemm_floor(blas_threads(a.threads), cfg, a.batch, a.seq)
    return {"seconds": seconds, "flops": flops}


def worker_main(a):
    cfg = ModelConfig.preset(a.preset, **({"vocab_size": a.vocab} if a.vocab else {}))
    res = {"ours": run_ours, "torch": run_torch, "floor": run_floor}[a.worker](cfg, a)
    res.setdefault("rss_mb", peak_rss_mb())
    res.update(impl=a.worker, threads=a.threads, timed_steps=a.steps)
    print("RESULT " + json.dumps(res))


def spawn(impl, threads, a):
    """Run one measurement in a fresh interpreter; its result dict (or one with 'error')."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", impl,
           "--threads", str(threads), "--preset", a.preset, "--batch", str(a.batch),
           "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--sgemm-size", str(a.sgemm_size), "--vocab", str(a.vocab)]
    env = dict(os.environ)
    if impl == "ours":
        env["OPENBLAS_NUM_THREADS"] = "1"
    else:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"impl": impl, "threads": threads, "error": f"exit {p.returncode}: {tail}"}


def torch_available():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="seed", help="model preset (default: seed)")
    ap.add_argument("--vocab", type=int, default=0,
                    help="vocabulary size (default: the preset's, 30,000 for seed)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (default: 32)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    ap.add_argument("--threads", default="1,2,12",
                    help="comma-separated thread counts (default: 1,2,12)")
    ap.add_argument("--sgemm-size", type=int, default=2048,
                    help="M=N=K of the SGEMM peak measurement (default: 2048)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch runs")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip timing the step's matrix products one by one (the GEMM floor)")
    ap.add_argument("--json", help="also write all results to this JSON file")
    ap.add_argument("--worker", choices=["ours", "torch", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--patterns", action="store_true",
                    help="compare the dense and Ulam attention patterns at seq_len 128 and "
                         "1,024 instead (FLOPs, attention and step time; one process)")
    ap.add_argument("--window", type=int, default=16, help="the Ulam pattern's w (default 16)")
    a = ap.parse_args(argv)
    if a.patterns:
        return compare_patterns(a)
    if a.worker:
        a.threads = int(a.threads)
        return worker_main(a)

    try:
        counts = [int(t) for t in a.threads.split(",")]
        cfg = ModelConfig.preset(a.preset, **({"vocab_size": a.vocab} if a.vocab else {}))
    except ValueError as e:
        print(f"bench_kernel: {e}", file=sys.stderr)
        return 2
    if a.seq > cfg.max_seq_len or min(counts) < 1 or a.batch < 1 or a.steps < 1 or a.warmup < 0:
        print(f"bench_kernel: need batch, steps, threads >= 1, warmup >= 0 and "
              f"seq <= max_seq_len ({cfg.max_seq_len})", file=sys.stderr)
        return 2
    with_torch = not a.no_torch and torch_available()
    tokens = a.batch * a.seq
    fpt = flops_per_token(cfg, a.seq)
    print(f"# bench_kernel: preset {a.preset} ({cfg}), batch {a.batch} x {a.seq}, "
          f"{a.warmup} warmup + {a.steps} timed steps, {fpt / 1e6:.1f} MFLOP/token, "
          f"{os.cpu_count()} CPUs; torch: {'yes' if with_torch else 'no (not installed or --no-torch)'}")
    rows, floors = [], {}
    for t in counts:
        ours = spawn("ours", t, a)
        ref = spawn("torch", t, a) if with_torch else None
        if not a.no_floor and blas_threads(t) not in floors:
            floors[blas_threads(t)] = spawn("floor", blas_threads(t), a)
        floor = floors.get(blas_threads(t))
        rows.append({"threads": t, "ours": ours, "torch": ref, "floor": floor})
        report(t, ours, ref, floor, tokens, fpt)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(
            {"args": vars(a), "flops_per_token": fpt, "results": rows}, indent=1))
    return 0


def attention_keys(T, pattern, w):
    """Keys summed over the T query rows of one head: T(T+1)/2 causal, fewer for Ulam."""
    if pattern == "dense":
        return T * (T + 1) // 2
    primes = [p for p in range(2, T) if all(p % q for q in range(2, int(p ** 0.5) + 1))]
    return sum(min(i, w) + 1 + sum(1 for p in primes if w < p <= i) for i in range(T))


def compare_patterns(a):
    """Dense vs Ulam at seq_len 128 and 1,024: attention FLOPs of a training step (per (row,
    key) pair the pattern keeps, 2*head_dim for each of 7 products: scores and the weighted sum
    forward; recomputed scores, dV, dP, dQ, dK backward; softmax not counted; the dense kernel
    also computes the zeros inside its 32-row diagonal blocks, not counted) and the kernel's
    measured attention and step time."""
    from dataclasses import replace

    from mpitrain import Model
    base = ModelConfig.preset(a.preset)
    t = int(str(a.threads).split(",")[0])
    print(f"# attention patterns: preset {a.preset}, batch {a.batch}, threads {t}, "
          f"Ulam window {a.window}, {a.warmup} warmup + {a.steps} timed steps")
    print("| seq_len | pattern | keys/row (mean) | attention GFLOP/step | attention ms/step "
          "| step ms |\n|---|---|---|---|---|---|")
    for T in (128, 1024):
        x, y = (v.astype(np.int32) for v in random_batch(base, a.batch, T))
        for pattern in ("dense", "ulam"):
            cfg = replace(base, max_seq_len=T, attention_pattern=pattern,
                          attention_window=a.window)
            keys = attention_keys(T, pattern, a.window)
            gflop = 7 * 2 * cfg.head_dim * keys * cfg.n_heads * cfg.n_layers * a.batch / 1e9
            model = Model(cfg, seed=0, threads=t)
            for _ in range(a.warmup):
                model.forward_backward(x, y)
            k0, t0 = dict(model.timers()), time.perf_counter()
            for _ in range(a.steps):
                model.forward_backward(x, y)
            step = (time.perf_counter() - t0) / a.steps
            att = (model.timers()["attention"] - k0["attention"]) / a.steps
            print(f"| {T} | {pattern} | {keys / T:.1f} | {gflop:.2f} | {att * 1e3:.0f} | "
                  f"{step * 1e3:.0f} |", flush=True)
    return 0


def report(t, ours, ref, floor, tokens, fpt):
    peak = ours.get("sgemm_gflops")
    line = [f"threads {t:>2}:"]
    tps = None
    if "seconds" in ours:
        tps = tokens * ours["timed_steps"] / ours["seconds"]
        gf = tps * fpt / 1e9
        line.append(f"ours {tps:8.0f} tok/s {gf:6.1f} GFLOP/s")
        if peak:
            line.append(f"({100 * gf / peak:4.1f}% of SGEMM peak {peak:.0f} GFLOP/s)")
        line.append(f"RSS {ours['rss_mb']:6.0f} MB")
    else:
        line.append(f"ours: {ours.get('error')}; SGEMM peak {peak or float('nan'):.0f} GFLOP/s")
    if ref is not None:
        if "seconds" in ref:
            rtps = tokens * ref["timed_steps"] / ref["seconds"]
            line.append(f"| torch {rtps:8.0f} tok/s {rtps * fpt / 1e9:6.1f} GFLOP/s "
                        f"RSS {ref['rss_mb']:6.0f} MB")
            if tps:
                line.append(f"| ratio {tps / rtps:5.2f}")
        else:
            line.append(f"| torch: {ref.get('error')}")
    print(" ".join(line))
    if floor is not None and "seconds" in floor:
        ftps = tokens / floor["seconds"]
        share = f", ours at {100 * tps / ftps:.0f}% of it" if tps else ""
        print(f"    GEMM floor on {blas_threads(t)} OpenBLAS threads: {floor['seconds']:.2f} s/step "
              f"= {ftps:.0f} tok/s ({floor['flops'] / floor['seconds'] / 1e9:.0f} GFLOP/s){share}")
    elif floor is not None:
        print(f"    GEMM floor: {floor.get('error')}")
    if "parts" in ours:
        p = ours["parts"]
        print("    ours per step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in p.items()))
    if "kinds" in ours:
        total = sum(ours["kinds"].values()) or 1.0
        print("    ours by layer kind: " + ", ".join(
            f"{k} {v * 1e3:.0f} ms ({100 * v / total:.0f}%)"
            for k, v in sorted(ours["kinds"].items(), key=lambda kv: -kv[1])))
    elif "parts" in ours:
        print("    ours by layer kind: the kernel exposes no timers")
    sys.stdout.flush()

if __name__ == "__main__":
    sys.exit(main())
