#!/usr/bin/env python
"""Generation speed of the seed model against the memory-bandwidth limit measured in the same run.

    python scripts/bench_infer.py                     # seed model, 1 thread, 200 tokens
    python scripts/bench_infer.py --preset tiny --tokens 20 --big-mb 64   # smoke test

Generating one token with the key/value cache reads every weight once (the linear layers of
all blocks and lm_head; of the embeddings only one row of wte and of wpe), so a single-stream
decoder cannot beat  bandwidth / bytes-per-token  tokens/s. The bandwidth is measured here, in
the same process, as NumPy summing a float32 array much larger than the last-level cache
(best of --repeat); the same sum over an array the size of the weights is printed beside it
(on a machine whose cache holds the weights, that is the relevant limit). The key/value cache
read per token (2 * n_layers * position * d_model floats) is small beside the weights and is
reported, not counted in the limit.

Timed: the kernel feed of one token (one slot's decode step: all layers + lm_head logits), and
greedy generation end to end (feed + argmax in Python), after a prompt of --prompt tokens;
--tokens new tokens, so the context stays below max_seq_len (no slide) unless --tokens is larger.
Weights are the GPT-2 initialisation (values do not change the work).
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
except ImportError:  # not installed: the checkout's package (the kernel itself needs an install)
    sys.path.insert(0, str(HERE.parent))
    from mpitrain.config import ModelConfig


def weight_bytes_per_token(cfg):
    """float32 bytes of weights one generated token reads: everything but the embedding
    tables, plus one row of each."""
    d, f, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    per_block = (2 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + d * f + f + f * d + d)
    return 4 * (L * per_block + 2 * d + V * d + 2 * d)


def read_bandwidth(nbytes, repeat):
    """Best GB/s of np.sum over a float32 array of nbytes (touched once before timing)."""
    a = np.ones(nbytes // 4, np.float32)
    a.sum()
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    del a
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=200, help="new tokens per timed generation")
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--repeat", type=int, default=3, help="timed generations (best is kept)")
    p.add_argument("--big-mb", type=int, default=2048,
                   help="size of the array summed for the bandwidth (MiB; larger than the LLC)")
    args = p.parse_args(argv)

    from mpitrain import Model
    from mpitrain.generate import Decoder
    from mpitrain.sampler import Sampler

    cfg = ModelConfig.preset(args.preset)
    model = Model(cfg, seed=0, threads=args.threads)
    gen = Decoder(model)
    wbytes = weight_bytes_per_token(cfg)
    # the same count from the kernel's table: all parameters but the embeddings' unread rows
    unread = (cfg.vocab_size - 1 + cfg.max_seq_len - 1) * cfg.d_model
    assert wbytes == 4 * (model.num_params - unread), (wbytes, model.num_params)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt)

    feed_best = gen_best = 0.0
    for _ in range(args.repeat):
        gen.reset()
        gen.feed(prompt)
        ids = rng.integers(0, cfg.vocab_size, args.tokens)
        t0 = time.perf_counter()
        for t in ids:
            gen.feed(t.reshape(1))
        feed_best = max(feed_best, args.tokens / (time.perf_counter() - t0))
        gen.reset()
        t0 = time.perf_counter()
        n = sum(1 for _ in gen.generate(prompt, args.tokens, Sampler(temperature=0)))
        gen_best = max(gen_best, n / (time.perf_counter() - t0))
    context_end = min(args.prompt + args.tokens, cfg.max_seq_len)
    kv_bytes = 4 * 2 * cfg.n_layers * cfg.d_model * (args.prompt + context_end) / 2

    bw_big = read_bandwidth(args.big_mb << 20, args.repeat + 2)
    bw_weights = read_bandwidth(wbytes, args.repeat + 2)
    limit_big = bw_big * 1e9 / wbytes
    limit_w = bw_weights * 1e9 / wbytes

    print(f"model: preset {args.preset}, {model.num_params:,} parameters; {args.threads} "
          f"thread(s); {os.cpu_count()} CPU(s)")
    print(f"weights read per token: {wbytes / 1e6:.1f} MB (all but the embedding tables); "
          f"key/value cache read per token: {kv_bytes / 1e6:.2f} MB on average over this run")
    print(f"read bandwidth (np.sum, best of {args.repeat + 2}): {bw_big:.2f} GB/s over "
          f"{args.big_mb} MiB, {bw_weights:.2f} GB/s over {wbytes / 1e6:.0f} MB (weights-sized)")
    print(f"bandwidth limit: {limit_big:.1f} tokens/s (large array), {limit_w:.1f} tokens/s "
          f"(weights-sized array)")
    for label, rate in (("kernel feed, 1 token:     ", feed_best),
                        ("greedy generation (total):", gen_best)):
        print(f"{label} {rate:.1f} tokens/s = {100 * rate / limit_big:.0f}% of the large-array "
              f"limit, {100 * rate / limit_w:.0f}% of the weights-sized one")
    print(f"(prompt {args.prompt} tokens, {args.tokens} new tokens, best of {args.repeat})")


if __name__ == "__main__":
    main()
