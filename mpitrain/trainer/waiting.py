"""How the trainer waits: never in a blocking MPI call, and asleep as much as it can.

An MPICH rank inside a blocking call burns a core; with 12 ranks on 2
cores that slowed the computing ranks 6.2x in our measurements (docs/TRAINING.md), against 1.05x when the
waiting ranks polled a non-blocking call with Test and a 1 ms sleep, and an Iallreduce polled
with Test and a 100 us sleep took 0.45 s against 0.90 s blocking. So every wait here is a
non-blocking MPI call polled with Test and a sleep, and the sleep grows while the wait lasts:
every wake-up preempts a rank (or kernel thread) that computes. Node Zero, which is off the
critical path (it issues commands ahead), starts at 1 ms and doubles up to 20 ms; a 1 ms sleep
loop beside the kernel's 2-thread step alone cost it about 5%. The workers reach each step's
reduction at different times (their groups hold different numbers of windows): they first wait
in an Ibarrier sleeping 100 us doubling up to 2 ms -- at -n 12 ten of them wait there while the
slowest computes; with their fixed 100 us polls its compute took 2.98 s a step, with the
back-off 2.8 s (one instrumented run) -- and then run the collective itself, in which every
rank must call Test for it to progress, polling every 100 us.
"""
import time

NODE_ZERO_SLEEP = 1e-3      # s: Node Zero's first sleep in a wait ...
NODE_ZERO_MAX_SLEEP = 2e-2  # ... doubling up to this
WORKER_SLEEP = 1e-4         # s between polls on a worker inside a collective
WORKER_MAX_SLEEP = 2e-3     # s: a worker's longest sleep while it waits for the others


def _mpi():
    from mpi4py import MPI  # imported late: importing it initialises MPI

    return MPI


def wait(requests, sleep_s: float, max_sleep_s: float = 0.0) -> None:
    """Complete MPI requests by polling Testall with sleeps in between (never a blocking Wait);
    the sleeps start at sleep_s and double up to max_sleep_s (when larger)."""
    MPI = _mpi()
    requests = list(requests)
    while not MPI.Request.Testall(requests):
        time.sleep(sleep_s)
        sleep_s = min(2 * sleep_s, max(sleep_s, max_sleep_s))


class Pending:
    """Something started that may not have finished; `done()` tests it without blocking,
    `wait(timeout)` sleeps up to `timeout` seconds unless it is done, and `result` holds what it
    produced once it has."""

    def __init__(self, requests=(), finish=None):
        self._requests = list(requests)
        self._finish = finish
        self._done = False
        self.result = None

    def done(self) -> bool:
        if not self._done and _mpi().Request.Testall(self._requests):
            self._done = True
            if self._finish is not None:
                self.result = self._finish()
        return self._done

    def wait(self, timeout: float) -> bool:
        """done(), after sleeping `timeout` seconds if it was not done yet."""
        if self.done():
            return True
        time.sleep(timeout)
        return self.done()


class TestPending(Pending):
    """A Pending over a non-blocking test: test() -> (done, result)."""

    def __init__(self, test):
        super().__init__()
        self._test = test

    def done(self) -> bool:
        if not self._done:
            self._done, result = self._test()
            if self._done:
                self.result = result
        return self._done


def wait_pending(pending: Pending, between=None) -> Pending:
    """Node Zero's wait: sleeps growing from NODE_ZERO_SLEEP to NODE_ZERO_MAX_SLEEP, calling
    `between()` (its housekeeping) after each."""
    sleep = NODE_ZERO_SLEEP
    while not pending.wait(sleep):
        if between is not None:
            between()
        sleep = min(2 * sleep, NODE_ZERO_MAX_SLEEP)
    return pending
