"""Training and validation loss against step, drawn with matplotlib (the optional `plot`
extra: pip install 'mpitrain[plot]').

The curves come from the run's metrics.jsonl (mpitrain/monitor.py reads it; a resumed run's
repeated steps count once, the newest value). The PNG is written atomically (mpitrain/atomic.py),
so a failure leaves no partial file.
"""
import os

from mpitrain import atomic
from mpitrain.errors import UserError
from mpitrain.monitor import RunReader


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot needs matplotlib, which is not installed: pip install matplotlib "
                        "(or pip install 'mpitrain[plot]')") from None
    matplotlib.use("Agg")   # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def curves(run_dir):
    """([steps], [losses], [eval steps], [val losses]) of a run directory."""
    reader = RunReader(run_dir)
    if not reader.exists():
        raise UserError(f"{reader.run_dir}: no metrics.jsonl (not a run directory, or the run "
                        "has not started)")
    reader.update()
    if not reader.steps:
        raise UserError(f"{reader.path}: no training steps recorded yet")
    return ([s[0] for s in reader.steps], [s[1] for s in reader.steps],
            [e[0] for e in reader.evals], [e[1] for e in reader.evals])


def plot_run(run_dir, out, title=None, dpi=100):
    """Draw loss and val loss against step into the PNG `out`; returns the point counts."""
    if not str(out).lower().endswith(".png"):
        raise UserError(f"--out {out}: give a .png file name")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UserError(f"--out {out}: directory {directory} does not exist")
    steps, losses, vsteps, vlosses = curves(run_dir)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, losses, lw=1.0, label="training loss")
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", lw=1.5, ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or os.path.basename(os.path.normpath(os.fspath(run_dir))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic.replacing(out, atomic.binary) as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return len(steps), len(vsteps)
