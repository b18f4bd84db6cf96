"""`mpitrain train` (the default command): train a model on a prepared dataset.

Under mpirun with more than one rank (mpitrain/launcher.py): MPI mode (rank 0 Node Zero,
ranks 1.. workers on the kissing-spheres placement; mpitrain/trainer/mpi_runner.py). Otherwise
thread mode: one process, Node Zero and --threads - 1 worker threads
(mpitrain/trainer/thread_runner.py). See README "Training" for the configuration precedence.
"""
import os

import shlex
import sys

from mpitrain import launcher
from mpitrain.config import PRESETS, TrainConfig
from mpitrain.errors import UserError
from mpitrain.trainer.runlog import PRINT_EVERY, PROGRESS

NAME = "train"
HELP = "train a model: Node Zero + workers (mpirun -n N python -m mpitrain train ...)"

# dedicated option -> configuration field
DEDICATED = {"max_steps": "max_steps", "epochs": "epochs", "batch_size": "batch_size",
             "lr": "lr", "eval_every": "eval_every", "save_every": "save_every",
             "keep_last": "keep_last", "seed": "seed"}
DEFAULT_PRESET = "small"
DEFAULT_THREADS = 12   # thread mode: Node Zero + 11 workers, as the original design
# Help suffix for options whose default comes from the preset. "%(default).0s" prints nothing
# but keeps ArgumentDefaultsHelpFormatter from appending "(default: None)".
FROM_PRESET = " (default: the preset's)%(default).0s"


def add_arguments(p):
    p.add_argument("--dataset", metavar="FILE.h5", default=None,
                   help="prepared dataset (default: hdf5_data/default_PRESET.h5, prepared from "
                   "the embedded corpus with the preset's vocab size and seq_len when "
                   "missing)%(default).0s")
    p.add_argument("--run-dir", metavar="DIR", default=None,
                   help="checkpoints, logs and metrics go here (default: runs/PRESET)%(default).0s")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help=f"model and training configuration to start from (default: "
                   f"{DEFAULT_PRESET}; on resume the checkpoint's architecture and settings "
                   f"win, with a warning when they are not the given preset's)%(default).0s")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="plan at most N optimizer steps (0 = all epochs)" + FROM_PRESET)
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="passes over the training windows" + FROM_PRESET)
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="windows per optimizer step, whatever the worker count" + FROM_PRESET)
    p.add_argument("--lr", type=float, default=None, metavar="X",
                   help="peak learning rate" + FROM_PRESET)
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="evaluate and sample every N steps" + FROM_PRESET)
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="checkpoint every N steps" + FROM_PRESET)
    p.add_argument("--keep-last", type=int, default=None, metavar="K",
                   help="keep the newest K checkpoints besides step 0 (0 = keep all)" + FROM_PRESET)
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="initialisation and data-order seed" + FROM_PRESET)
    p.add_argument("--threads-per-rank", type=int, default=None, metavar="N",
                   help="MPI mode: kernel threads in each worker process (default: this "
                   "node's CPUs divided among its workers, at least 1)%(default).0s")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"thread mode (no mpirun): threads in all, Node Zero included, so N-1 "
                   f"workers (default: {DEFAULT_THREADS})%(default).0s")
    p.add_argument("--resume", metavar="auto|FILE", default=None,
                   help="continue from a checkpoint: 'auto' = the newest valid one in the run "
                   "directory (a fresh start when there is none), or a checkpoint file")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this invocation after STEP (with a checkpoint); the schedule still "
                   "plans the whole run, so --resume continues it exactly (default: the planned "
                   "end)%(default).0s")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any model or training configuration field (repeatable); "
                   "unknown keys are refused")
    p.add_argument("--show-topology", action="store_true",
                   help="print who sits where on the icosahedron and which groups each worker "
                   "takes, for this world size, and exit")
    p.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                   help="end the run (status 3) when no worker makes progress for this long "
                   "(default: max(60, 10 x the longest quiet interval seen so far), at least "
                   "600 until the first step)%(default).0s")
    p.add_argument("--on-save-error", choices=("stop", "retry"), default="stop",
                   help="when a checkpoint cannot be written (a full disk, ...): stop with "
                   "status 3, resumable from the previous checkpoint, or train on and try again "
                   "at the next save")
    p.add_argument("--quiet", action="store_true", help="no progress output on the terminal")
    p.add_argument("--progress", choices=PROGRESS, default=None,
                   help="bar: a progress bar on stderr; lines: a step line now and then on "
                   "stdout; none: neither (evaluations, checkpoints and the end are still "
                   "printed). Default: bar on a terminal in thread mode, else lines (under "
                   "mpirun no rank sees the terminal)%(default).0s")
    p.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="print a step line every N steps (default: about every "
                   f"{PRINT_EVERY:g} s; train.log and metrics.jsonl always get every step)"
                   "%(default).0s")


def default_threads_per_rank(launch: launcher.Launch) -> int:
    """The CPUs this process may use divided among the workers on its node (Node Zero, which
    mostly sleeps, not counted), at least 1: on 2 CPUs, 2 threads for the one worker of
    mpirun -n 2 and 1 from -n 3 on. Node Zero's value is the plan's, so every rank uses it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, launch.local_size - 1))


def collect_overrides(args) -> dict:
    """--set and the dedicated options as one {field: value}; the same field twice is refused."""
    from mpitrain.trainer.plan import parse_sets

    overrides = parse_sets(args.set)
    for option, key in DEDICATED.items():
        value = getattr(args, option)
        if value is None:
            continue
        if key in overrides:
            raise UserError(f"--set {key} and --{option.replace('_', '-')} both given")
        overrides[key] = value
    return overrides


def run(args) -> int:
    from mpitrain.trainer.output import guard_output

    guard_output()   # a closed stdout or stderr never ends a run (trainer/output.py)
    preset_given = args.preset is not None
    if not preset_given:
        args.preset = DEFAULT_PRESET
    overrides = collect_overrides(args)
    launch = launcher.detect()
    size = launch.size
    if size > 1 and args.threads is not None:
        raise UserError("--threads is for thread mode (without mpirun); under mpirun give "
                        "--threads-per-rank")
    if size == 1 and args.threads_per_rank is not None:
        raise UserError("--threads-per-rank is for MPI mode (mpirun -n N); in thread mode give "
                        "--threads N (all threads, Node Zero included)")
    threads = DEFAULT_THREADS if args.threads is None else args.threads
    from mpitrain.trainer.thread_runner import MAX_THREADS

    if not 2 <= threads <= MAX_THREADS:
        raise UserError(f"--threads must be in [2, {MAX_THREADS}] (Node Zero + at least one "
                        f"worker), got {threads}")
    if args.threads_per_rank is None:
        args.threads_per_rank = default_threads_per_rank(launch)
    if args.threads_per_rank < 1:
        raise UserError(f"--threads-per-rank must be at least 1, got {args.threads_per_rank}")
    if args.stall_timeout is not None and not args.stall_timeout > 0:
        raise UserError(f"--stall-timeout must be positive, got {args.stall_timeout}")
    if args.log_every is not None and args.log_every < 1:
        raise UserError(f"--log-every must be at least 1, got {args.log_every}")
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError(f"--stop-at must be at least 1, got {args.stop_at}")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint file")
    if args.show_topology:
        from mpitrain.topology import placement_table

        workers = size - 1 if size > 1 else threads - 1
        batch = overrides.get("batch_size", PRESETS[args.preset]["train"]["batch_size"])
        hosts = None
        if size > 1:
            from mpi4py import MPI

            from mpitrain.trainer.hierarchy import hosts_table

            hosts = hosts_table(MPI.COMM_WORLD)
        if launch.rank == 0:
            print(placement_table(workers, batch))
            if hosts:
                print(hosts)
        return 0
    progress = args.progress or ("bar" if size == 1 and sys.stderr.isatty() else "lines")
    options = {"preset": args.preset, "dataset": args.dataset, "run_dir": args.run_dir,
               "resume": args.resume, "stop_at": args.stop_at, "quiet": args.quiet,
               "stall_timeout": args.stall_timeout,
               "threads_per_rank": args.threads_per_rank, "overrides": overrides,
               "on_save_error": args.on_save_error, "thread_mode": size == 1,
               "workers_here": max(1, launch.local_size - 1) if size > 1 else threads - 1,
               "preset_given": preset_given, "progress": progress, "log_every": args.log_every,
               "workers": size - 1 if size > 1 else threads - 1,
               # what checkpoints record (the exported model card shows it)
               "command": shlex.join(["mpitrain", *sys.argv[1:]])
               + (f"  (mpirun, {size} ranks)" if size > 1 else "")}
    if size > 1:
        from mpitrain.trainer.mpi_runner import run_mpi

        return run_mpi(options)
    from mpitrain.trainer.thread_runner import run_threads

    return run_threads(options, threads)


assert set(DEDICATED.values()) <= {f for f in TrainConfig.__dataclass_fields__}
