"""Stall detection: Node Zero notices a worker that has stopped making progress.

Every worker counts the points of its command loop it passes (before and after taking a
command, and in MPI mode when its share of a step is computed, before the reductions) and tells
Node Zero each time (WorkerLink.progress). Node Zero, in every wait, checks how long ago any
worker last made progress -- or Node Zero last issued a command, when the workers had nothing
to do -- and when that exceeds the limit, the job has stalled. A worker that is stopped
(SIGSTOP, a debugger), hung in a system call, or spinning without end looks the same.

The limit: `--stall-timeout SECONDS`, or by default max(60 s, 10 x the longest quiet interval
seen so far in this run), so a model whose steps (or evaluations) take long is never taken for
a stalled one. Until the first step has been reported (start-up: loading data, the first
evaluation and checkpoint, a resume) the limit is at least STARTUP_S. It stays in force during
a graceful stop (a signal), so that stop has a time limit too. While Node Zero waits for its
own checkpoint writer, the workers may idle, so the watch is paused.

The culprit: the workers that made the least progress; on Node Zero's machine a worker whose
process is stopped (state T in /proc) is named first.
"""
import time

MIN_S = 60.0        # the default limit is at least this ...
FACTOR = 10.0       # ... and this many times the longest quiet interval seen
STARTUP_S = 600.0   # the limit until the first step is reported


def process_state(pid: int):
    """The state letter of process `pid` on this host (R, S, D, T, Z, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class StallWatch:
    def __init__(self, timeout=None):
        """timeout: --stall-timeout (seconds), or None for the default rule."""
        self.timeout = timeout
        self.started = False          # a step has been reported
        self.paused = False
        self.longest = 0.0            # the longest quiet interval seen (s)
        self.last = time.monotonic()  # when something last happened

    def limit(self) -> float:
        base = self.timeout if self.timeout is not None else max(MIN_S,
                                                                 FACTOR * self.longest)
        return base if self.started else max(base, STARTUP_S)

    def touch(self, when: float = None) -> None:
        """Something happened (a command issued, the watch resumed)."""
        when = time.monotonic() if when is None else when
        if when > self.last:
            if not self.paused:
                self.longest = max(self.longest, when - self.last)
            self.last = when

    def check(self, progress: list):
        """progress: WorkerLink.progress(). None while the job moves; else (seconds quiet,
        the indices of the workers furthest behind)."""
        latest = max(t for _, t in progress)
        if latest > self.last:
            self.touch(latest)
        quiet = time.monotonic() - self.last
        if self.paused or quiet <= self.limit():
            return None
        low = min(c for c, _ in progress)
        return quiet, [w for w, (c, _) in enumerate(progress) if c == low]
