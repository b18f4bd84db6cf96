#!/usr/bin/env python
"""Batched decoding speed (kernels/decode.c) against the SGEMM peak measured in the same run.

    python scripts/bench_decode.py                      # seed shape, 1, 4, 16, 64 sequences
    python scripts/bench_decode.py --preset tiny --steps 4 --batches 1 4   # smoke test

For each batch size B, a Decoder with B slots gets B random prompts of --prompt ids (the
prefill, timed on its own), then --steps decode steps of one new id per sequence. Reported:
aggregate tokens/s (B ids per step), the FLOP rate and its fraction of the peak. FLOPs per
decoded id: 2 x the weights used in matrix products (every block's linear layers and lm_head)
plus attention's q.k and weights x v over the context (4 x d_model x context per layer). The
peak is mpitrain.trainer.peak's: the best of five 1024^3 SGEMMs through scipy-openblas32 on
--threads OpenBLAS threads. "with sampling" adds mpitrain.sampler over the B rows (temperature
0.8, top-k 40) to each step. Weights are the GPT-2 initialisation of the preset's shape (the
values do not change the work); ids are random.
"""
import argparse
import os
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
try:
    from mpitrain.config import ModelConfig
except ImportError:  # not installed: the checkout's package
    sys.path.insert(0, str(HERE.parent))
    from mpitrain.config import ModelConfig


def flops_per_token(cfg, context):
    d, f = cfg.d_model, cfg.d_ff
    weights = cfg.n_layers * (4 * d * d + 2 * d * f) + d * cfg.vocab_size
    return 2.0 * weights + cfg.n_layers * 4.0 * d * context


def run(model, batch, prompt, steps, with_sampling, rng, clock=time.perf_counter):
    from mpitrain.generate import Decoder
    from mpitrain.sampler import Sampler, sample

    V = model.config.vocab_size
    dec = Decoder(model, slots=batch)
    feeds = [(k, rng.integers(0, V, prompt)) for k in range(batch)]
    t0 = clock()
    logits = dec.step(feeds)
    prefill = clock() - t0
    samplers = [Sampler(0.8, top_k=40, seed=k) for k in range(batch)]
    ids = rng.integers(0, V, (steps, batch))
    t0 = clock()
    for i in range(steps):
        nxt = sample(logits, samplers) if with_sampling else ids[i]
        logits = dec.step([(k, [t]) for k, t in enumerate(nxt)])
    return prefill, clock() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt", type=int, default=16, help="prompt ids per sequence")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per batch size (best kept)")
    p.add_argument("--cpu", action="store_true",
                   help="time with this thread's CPU time instead of the wall clock (rates per "
                   "CPU-second: what the other jobs of a shared machine change least; with "
                   "--threads 1 only)")
    args = p.parse_args(argv)

    from mpitrain import Model
    from mpitrain.trainer.peak import sgemm_peak_gflops

    cfg = ModelConfig.preset(args.preset)
    model = Model(cfg, seed=0, threads=args.threads)
    peak = sgemm_peak_gflops(threads=args.threads)
    rng = np.random.default_rng(0)
    mean_ctx = args.prompt + (args.steps + 1) / 2
    fpt = flops_per_token(cfg, mean_ctx)
    print(f"model: preset {args.preset}, {model.num_params:,} parameters; {args.threads} "
          f"thread(s); {os.cpu_count()} CPU(s); SGEMM peak {peak:.1f} GFLOP/s "
          f"({args.threads} OpenBLAS thread(s), 1024^3)")
    print(f"decode: prompt {args.prompt} ids, then {args.steps} steps of one id per sequence; "
          f"{fpt / 1e6:.1f} MFLOP per decoded id (mean context {mean_ctx:g}); best of "
          f"{args.repeat}")
    print(f"{'sequences':>9} {'prefill tok/s':>14} {'decode tok/s':>13} {'GFLOP/s':>8} "
          f"{'% peak':>7} {'with sampling tok/s':>20}")
    for b in args.batches:
        best_pre = best = best_s = float("inf")
        for _ in range(args.repeat):
            clock = time.thread_time if args.cpu else time.perf_counter
            pre, dt = run(model, b, args.prompt, args.steps, False, rng, clock)
            _, dt_s = run(model, b, args.prompt, args.steps, True, rng, clock)
            best_pre, best, best_s = min(best_pre, pre), min(best, dt), min(best_s, dt_s)
        tps = b * args.steps / best
        gflops = tps * fpt / 1e9
        print(f"{b:>9} {b * args.prompt / best_pre:>14.1f} {tps:>13.1f} {gflops:>8.2f} "
              f"{100 * gflops / peak:>6.1f}% {b * args.steps / best_s:>20.1f}")


if __name__ == "__main__":
    main()
