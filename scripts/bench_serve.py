#!/usr/bin/env python
"""Load generator for `mpitrain serve`: concurrent streaming clients against a seed-shaped model.

    python scripts/bench_serve.py                       # seed shape, 1/4/16/64 clients
    python scripts/bench_serve.py --preset tiny --tokens 16 --levels 1,4   # smoke test
    python scripts/bench_serve.py --soak 600            # then 16 clients for 10 minutes

The script writes a model of the preset's shape with random weights (and a synthetic tokenizer
of its vocabulary size), measures `infer --stats` on it (one sequence, greedy, the same prompt
and length), starts `mpitrain serve` on a free port and, for each level, runs that many
clients at once, each streaming one completion of --tokens tokens (ignore_eos: fixed lengths).
Reported per level: aggregate tokens/s (all tokens / wall time of the level), time to first
token (p50/p99), per-token latency (gaps between a stream's chunks, p50/p99), the CPU use of
this process (the load generator: one asyncio process, aiohttp client) and of the server, and
the aggregate as a fraction of the SGEMM peak measured in the same run (decode FLOPs per token:
the forward third of mpitrain.trainer.peak.flops_per_token at the mean context length).
The column tokens per CPU-second of the server is what batching buys independently of
how much of the machine other jobs leave the server; the last one splits the server's CPU time
per generated token into the decode thread's kernel step, sampling and bookkeeping (its
/metrics), the threads helping it (the kernel's other threads and the sampler's, with
--threads > 1) and the main thread (the HTTP side). The whole (infer, then every level) runs
--repeat rounds, since a short level on a shared machine can swing by tens of percent. Goals
checked on the median over rounds: 16 clients >= 6x one client's aggregate tokens/s; one
client >= 85% of infer's.
"""
import argparse
import asyncio
import json
import os
import pathlib
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


TEMPERATURE = 0.8   # every client's, and infer's for the one-client comparison


def build_model(path, preset):
    from mpitrain import Model, ModelConfig
    from mpitrain.checkpoint import save_checkpoint
    from mpitrain.config import TrainConfig
    from mpitrain.schedule import DataPosition
    from mpitrain.tokenizer import Tokenizer, min_vocab_size

    cfg = ModelConfig.preset(preset)
    tok = Tokenizer([f" w{i}" for i in range(cfg.vocab_size - min_vocab_size() + 1)])
    assert tok.vocab_size == cfg.vocab_size, (tok.vocab_size, cfg.vocab_size)
    model = Model(cfg, seed=0)
    params = {n: model.params[n] for n in model.param_names}
    zeros = {n: np.zeros_like(p) for n, p in params.items()}
    save_checkpoint(path, model_config=cfg, train_config=TrainConfig.preset(preset),
                    params=params, optimizer_state={"m": zeros, "v": zeros}, step=0, epoch=0,
                    data_position=DataPosition(0, 0), rng_state={"seed": 0}, train_loss=0.0,
                    val_loss=0.0, tokenizer=tok)
    return cfg


def env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def infer_rate(model, prompt, tokens, threads):
    """infer's tokens/s for the clients' prompt, length and sampling (temperature 0.8)."""
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "infer", "--model", model,
                           "--prompt", prompt, "--max-new-tokens", str(tokens), "--temperature",
                           str(TEMPERATURE), "--seed", "0", "--threads", str(threads),
                           "--stats"], env=env(),
                          capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\)", proc.stderr)
    return int(m.group(1)), float(m.group(2))


def cpu_seconds(pid, task=None):
    """CPU seconds of a process (all its threads), or of one of its threads (task: its id)."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_cpu_seconds(pid):
    """CPU seconds of the server's main thread: the asyncio loop (HTTP, JSON, events)."""
    return cpu_seconds(pid, pid)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


async def one_stream(session, url, prompt, tokens, seed):
    """(ttft, [gaps], n_tokens) of one streaming completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "temperature": TEMPERATURE, "seed": seed}
    t0 = time.perf_counter()
    last, ttft, gaps, n = None, None, [], 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["finish_reason"] is None:
                now = time.perf_counter()
                n += 1
                if last is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
    return ttft, gaps, n


async def level(url, clients, prompt, tokens, seed0=0):
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(s, url, prompt, tokens, seed0 + i)
                                     for i in range(clients)))
        wall = time.perf_counter() - t0
    return wall, res


async def soak(url, clients, prompt, tokens, seconds, pid):
    import aiohttp

    end = time.monotonic() + seconds
    errors, done, rss = 0, 0, [rss_mb(pid)]

    async def client(i):
        nonlocal errors, done
        async with aiohttp.ClientSession(trust_env=False) as s:
            while time.monotonic() < end:
                try:
                    await one_stream(s, url, prompt, tokens, i)
                    done += 1
                except Exception:
                    errors += 1

    async def watch():
        while time.monotonic() < end:
            await asyncio.sleep(10)
            rss.append(rss_mb(pid))

    await asyncio.gather(watch(), *(client(i) for i in range(clients)))
    return errors, done, rss


def decode_cpu(port):
    """{part: CPU seconds} of the server's decode thread so far (its /metrics)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^mpitrain_decode_cpu_seconds_total\{part="(\w+)"\} (\S+)$', text,
                        re.M)}


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_levels(server, port, url, levels, prompt, args, fwd_flops, peak):
    """One round: each level's clients at once; prints a row per level, returns tok/s by level."""
    print(f"{'clients':>7} {'tok/s':>8} {'x1':>5} {'%peak':>6} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'tok p50':>8} {'tok p99':>8} {'gen CPU':>8} {'srv CPU':>8} "
          f"{'tok/srv-CPU-s':>13} {'kernel/sample/host/helpers/http ms per token':>44}")
    rates = {}
    for c in levels:
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        s0, d0 = cpu_seconds(server.pid), decode_cpu(port)
        h0 = http_cpu_seconds(server.pid)
        wall, res = asyncio.run(level(url, c, prompt, args.tokens))
        d1 = decode_cpu(port)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        gen_cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall
        srv_cpu = (cpu_seconds(server.pid) - s0) / wall
        http = http_cpu_seconds(server.pid) - h0
        total = sum(n for _, _, n in res)
        assert total == c * args.tokens, (total, c * args.tokens)
        rates[c] = total / wall
        ttft = [t for t, _, _ in res]
        gaps = [g for _, gs, _ in res for g in gs]
        # per generated token: the decode thread's parts, the other threads working for it
        # (the kernel's and the sampler's helpers, with --threads > 1), and the main
        # thread (the HTTP side: asyncio, JSON, server-sent events)
        parts = [d1[k] - d0[k] for k in ("kernel", "sample", "host")]
        parts += [srv_cpu * wall - sum(parts) - http, http]
        split = "/".join(f"{1e3 * x / total:.2f}" for x in parts)
        print(f"{c:>7} {rates[c]:>8.1f} {rates[c] / rates[levels[0]]:>5.2f} "
              f"{100 * rates[c] * fwd_flops / (peak * 1e9):>5.1f}% "
              f"{1e3 * pct(ttft, 50):>7.0f}ms {1e3 * pct(ttft, 99):>7.0f}ms "
              f"{1e3 * pct(gaps, 50):>6.1f}ms {1e3 * pct(gaps, 99):>6.1f}ms "
              f"{100 * gen_cpu:>7.0f}% {100 * srv_cpu:>7.0f}% "
              f"{rates[c] / max(srv_cpu, 1e-9):>13.1f} {split:>44}")
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="seed")
    p.add_argument("--threads", type=int, default=1, help="server (and infer) kernel threads")
    p.add_argument("--tokens", type=int, default=128, help="tokens per completion")
    p.add_argument("--levels", default="1,4,16,64", help="concurrent clients per level")
    p.add_argument("--soak", type=float, default=0, help="seconds of 16 clients afterwards")
    p.add_argument("--repeat", type=int, default=3, help="rounds of infer + all levels; the "
                   "goals are checked on the median of the rounds' ratios")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    prompt = " w1 w2 w3 w4 w5 w6 w7 w8"

    from mpitrain.trainer.peak import flops_per_token, sgemm_peak_gflops

    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    model = os.path.join(tmp, "model.h5")
    cfg = build_model(model, args.preset)
    n_inf, r_inf = infer_rate(model, prompt, args.tokens, args.threads)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mpitrain", "serve", "--model", model,
                               "--port", str(port), "--threads", str(args.threads),
                               "--max-batch", str(max(levels)), "--max-queue", "1024"],
                              env=env(), stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        asyncio.run(level(url, 1, prompt, 8))                  # warm up
        peak = sgemm_peak_gflops(args.threads)
        ctx = len(prompt.split()) + args.tokens / 2
        fwd_flops = flops_per_token(cfg, ctx) / 3
        print(f"model: preset {args.preset} shape, random weights; {args.tokens} tokens per "
              f"completion, prompt {len(prompt.split())} tokens; server --threads "
              f"{args.threads}; {os.cpu_count()} CPU(s)")
        print(f"SGEMM peak ({args.threads} thread(s)): {peak:.1f} GFLOP/s; decode "
              f"{fwd_flops / 1e6:.1f} MFLOP/token")
        ratios = {"infer": [], "16": []}
        for rnd in range(args.repeat):
            if rnd:   # infer again, next to this round's levels
                n_inf, r_inf = infer_rate(model, prompt, args.tokens, args.threads)
            print(f"round {rnd + 1}: infer --temperature {TEMPERATURE}: {n_inf} tokens at "
                  f"{r_inf:.1f} tokens/s")
            rates = run_levels(server, port, url, levels, prompt, args, fwd_flops, peak)
            if 1 in rates:
                ratios["infer"].append(rates[1] / r_inf)
                if 16 in rates:
                    ratios["16"].append(rates[16] / rates[1])
        if ratios["infer"]:
            print(f"goal: one client / infer = {np.median(ratios['infer']):.2f} (>= 0.85; "
                  f"median of {', '.join(f'{x:.2f}' for x in ratios['infer'])})")
        if ratios["16"]:
            print(f"goal: 16 clients / one client = {np.median(ratios['16']):.2f} (>= 6; "
                  f"median of {', '.join(f'{x:.2f}' for x in ratios['16'])})")
        if args.soak:
            errors, done, rss = asyncio.run(soak(url, 16, prompt, args.tokens, args.soak,
                                                 server.pid))
            print(f"soak: 16 clients for {args.soak:.0f} s: {done} completions, {errors} "
                  f"errors; server RSS {rss[0]:.0f} MB at start, {rss[-1]:.0f} MB at end, "
                  f"max {max(rss):.0f} MB")
            print("soak: server RSS every minute (MB): "
                  + " ".join(f"{x:.1f}" for x in rss[::6]))
    finally:
        server.terminate()
        server.wait(60)
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
