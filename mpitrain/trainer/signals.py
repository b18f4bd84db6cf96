"""The trainer's signals, the same in MPI and thread mode.

The first SIGINT, SIGTERM or SIGHUP asks Node Zero to save a checkpoint and stop; a worker that
receives it tells Node Zero (its next command wait sends a small message), so a signal sent to
any single rank stops the whole job the same way. The run then exits with 128 + the signal's
number (mpitrain/exits.py). A second one, on any process, ends the run at once with that
status. MPICH's mpirun forwards the first Ctrl-C and SIGTERM to every rank and kills everything
on a second Ctrl-C; on SIGHUP mpirun itself dies at once and its proxies kill every rank before
any can save (measured; docs/TRAINING.md, "Signals and faults").

A mode supplies only how it ends at once: `abort(what, status)` says `what` in its own words
and ends with `status` (MPI mode: MPI_Abort of every rank; thread mode: os._exit).
"""
import signal

from mpitrain import exits

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # the signals that stop a run


def exit_status(signum: int) -> int:
    """The exit status of a run ended by signal `signum` (mpitrain/exits.py)."""
    return exits.signalled(signum)


def install_signals(on_first, abort) -> None:
    """Route SIGNALS: the first to on_first(signum), every later one to
    abort("second signal (NAME)", exit_status(signum)), which must not return. Runs on the
    main thread, so the handlers only set flags or end the process."""
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        if len(seen) == 1:
            on_first(signum)
            return
        abort(f"second signal ({signal.Signals(signum).name})", exit_status(signum))

    for s in SIGNALS:
        signal.signal(s, handler)
