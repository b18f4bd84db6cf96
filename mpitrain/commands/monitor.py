"""`mpitrain monitor RUN_DIR`: follow a run (metrics.jsonl, heartbeat.json) in place.

The logic lives in mpitrain/monitor.py."""
import math

from mpitrain.errors import UserError

NAME = "monitor"
HELP = "watch a training run: phase, step, ETA, losses with trend lines, tokens/s, liveness"


def add_arguments(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory train writes into")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit%(default).0s")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between refreshes; a heartbeat older than three of them (at "
                   "least three heartbeat periods) flags the run as stalled or stopped")
    p.add_argument("--json", action="store_true",
                   help="print snapshots as JSON objects, one a line%(default).0s")


def run(args):
    from mpitrain.monitor import watch

    if not (math.isfinite(args.interval) and 0.1 <= args.interval <= 3600):
        raise UserError(f"--interval must be in [0.1, 3600] seconds, got {args.interval}")
    return watch(args.run_dir, args.interval, once=args.once, as_json=args.json)
