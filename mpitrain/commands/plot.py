"""`mpitrain plot RUN_DIR --out loss.png`: training and validation loss against step.

Needs matplotlib (the optional `plot` extra); the logic lives in mpitrain/plot.py."""
NAME = "plot"
HELP = "draw a run's training and validation loss against step into a PNG (needs matplotlib)"


def add_arguments(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory train writes into")
    p.add_argument("--out", metavar="FILE.png", default="loss.png", help="image to write")
    p.add_argument("--title", default=None, help="plot title (default: the run directory's name)%(default).0s")


def run(args):
    from mpitrain.plot import plot_run

    n, nv = plot_run(args.run_dir, args.out, title=args.title)
    print(f"wrote {args.out}: {n} training steps, {nv} evaluations")
    return 0
