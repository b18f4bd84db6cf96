"""The model options against the plain model (docs/ABLATIONS.md): each option alone and all
together, the small preset, the same data, batch and schedule, several seeds.

    python scripts/ablation.py --data ../shared/data/production_training/docs --out /tmp/abl \\
        --steps 600 --seeds 0 1 2 [--threads 2] [--plot docs/ablation_curves.png]

Steps: prepare the data folder once (the small preset's vocabulary and seq_len, validation
documents held out by `mpitrain prepare`), train every (variant, seed) with
`python -m mpitrain train --preset small --set ...` (thread mode), then evaluate each final
checkpoint on the first EVAL_TOKENS validation tokens cut into non-overlapping windows at 1x, 2x
and (rotary only: a learned table ends at max_seq_len = 2x) 4x the training length. Runs already
finished in --out are reused, so the script can be stopped and started again. Prints a Markdown
table and writes results.json (and the plot of validation loss against step if asked).
"""
import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mpitrain import Model  # noqa: E402
from mpitrain.checkpoint import load_checkpoint  # noqa: E402
from mpitrain.dataset import Dataset  # noqa: E402

VARIANTS = {
    "plain": [],
    "rotary": ["position=rotary"],
    "lattice": ["init=lattice"],
    "ulam": ["attention_pattern=ulam", "attention_window=8"],
    "all": ["position=rotary", "init=lattice", "attention_pattern=ulam", "attention_window=8"],
}
EVAL_TOKENS = 32768   # validation tokens scored at every context length (the same for all)


def sh(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return proc


def prepare(args, env):
    path = os.path.join(args.out, "data.h5")
    if not os.path.exists(path):
        sh([sys.executable, "-m", "mpitrain", "prepare", "--data", args.data, "--out", path,
            "--vocab-size", "8192", "--seq-len", "64", "--val-fraction", str(args.val_fraction),
            "--quiet"], env)
    return path


def train(args, env, data, variant, seed):
    run = os.path.join(args.out, f"{variant}-s{seed}")
    metrics = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics) and any('"event": "end"' in l for l in open(metrics)):
        return run
    if os.path.exists(run):
        subprocess.run(["rm", "-rf", run])
    sets = [x for s in VARIANTS[variant] for x in ("--set", s)]
    sh([sys.executable, "-m", "mpitrain", "train", "--preset", "small", "--dataset", data,
        "--run-dir", run, "--max-steps", str(args.steps), "--epochs", "100",
        "--eval-every", str(args.eval_every), "--save-every", str(args.steps),
        "--threads", str(args.threads), "--set", f"seed={seed}", "--quiet", *sets], env)
    return run


def context_losses(run, steps, val, threads):
    ck = load_checkpoint(os.path.join(run, f"checkpoint_step_{steps}.h5"), load_optimizer=False)
    cfg, T = ck.model_config, ck.train_config.seq_len
    out = {}
    for mult in (1, 2, 4):
        L = mult * T
        if L > cfg.max_seq_len and cfg.position != "rotary":
            continue   # past a learned table's end
        # rotary has no table: the same parameters serve any max_seq_len
        model = Model(replace(cfg, max_seq_len=max(L, cfg.max_seq_len)), threads=threads,
                      initialize=False)
        for n in model.param_names:
            model.params[n][...] = ck.params[n]
        n_win = (min(len(val), EVAL_TOKENS) - 1) // L
        w = np.stack([val[i * L:i * L + L + 1] for i in range(n_win)]).astype(np.int32)
        out[f"{mult}x"] = float(model.loss(w[:, :-1], w[:, 1:]))
    return out


def summary(run):
    recs = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    curve = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    step_s = [1.0 / r["tokens_per_s"] for r in recs if "tokens_per_s" in r and "step" in r
              and "event" not in r]
    end = next(r for r in recs if r.get("event") == "end")
    tokens = end["tokens"] / end["steps"]
    return dict(curve=curve, final_val=curve[-1][1], step_s=float(np.median(step_s)) * tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--plot")
    p.add_argument("--report", action="store_true",
                   help="only print the table and plot from --out's results.json")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": REPO}
    results = {}
    if args.report:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
        args.seeds = sorted({s for by_seed in results.values() for s in by_seed})
        return report(results, args)
    data = prepare(args, env)
    val = Dataset.open(data).split_tokens("val")
    for seed in args.seeds:          # seeds outermost: a stopped run still has every variant
        for v in args.variants:
            run = train(args, env, data, v, seed)
            r = summary(run)
            r["context"] = context_losses(run, args.steps, val, args.threads)
            results.setdefault(v, {})[seed] = r
            print(f"{v} seed {seed}: val {r['final_val']:.4f} step {r['step_s'] * 1e3:.0f} ms "
                  f"context {r['context']}", flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    report(results, args)


def report(results, args):
    print("\n| variant | seeds | final val loss (mean ± spread) | ms/step | "
          "val 1x | val 2x | val 4x |\n|---|---|---|---|---|---|---|")
    for v, by_seed in results.items():
        fv = np.array([r["final_val"] for r in by_seed.values()])
        ms = np.mean([r["step_s"] for r in by_seed.values()]) * 1e3
        ctx = {k: np.mean([r["context"][k] for r in by_seed.values()])
               for k in ("1x", "2x", "4x") if all(k in r["context"] for r in by_seed.values())}
        spread = (fv.max() - fv.min()) / 2
        print(f"| {v} | {len(fv)} | {fv.mean():.4f} ± {spread:.4f} | {ms:.0f} | "
              + " | ".join(f"{ctx[k]:.3f}" if k in ctx else "—" for k in ("1x", "2x", "4x"))
              + " |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        # left: the whole run; right: its second half, where the variants separate
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, first in zip(axes, (0, args.steps // 2)):
            for i, (v, by_seed) in enumerate(results.items()):
                for j, r in enumerate(by_seed.values()):
                    s, l = zip(*[(a, b) for a, b in r["curve"] if a >= first])
                    ax.plot(s, l, color=f"C{i}", alpha=0.8, label=v if j == 0 else None)
            ax.set_xlabel("step")
            ax.set_ylabel("validation loss")
            ax.legend()
        axes[0].set_title(f"small preset, {args.steps} steps, seeds "
                          f"{', '.join(map(str, args.seeds))}")
        axes[1].set_title(f"from step {args.steps // 2} (one line per seed)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
