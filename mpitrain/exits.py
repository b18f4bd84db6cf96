"""The exit-status table: one meaning per status, for every command and both training modes.

  0        finished (or --stop-at reached)
  1        internal error, or a damaged file found while running
  2        user error: a bad option or input, refused before anything was written
  3        stopped by a fault after saving what it could; the run is resumable
           (non-finite values, a full disk, a stalled rank; a rank that dies ends the job
           with mpirun's own status: Hydra ends the job before any rank could choose one)
  128 + N  stopped by signal N after its checkpoint (the shell's convention)

The README's "Exit statuses" section states the same table; tests assert these values.
"""

OK = 0
INTERNAL = 1
USAGE = 2
FAULT = 3


def signalled(signum: int) -> int:
    """The status of a run stopped by signal `signum`."""
    return 128 + signum


class Fault(Exception):
    """The run stopped because of a fault after saving what it could (status FAULT). Its
    message is the one line the user sees; the run can continue with --resume auto."""

    exit_code = FAULT
