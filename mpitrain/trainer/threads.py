"""Thread mode's transport: Node Zero and the worker thread in one process.

The same two interfaces as MPI mode (comm.py): Node Zero (the main Python thread) holds a
`ThreadWorkerLink`, the worker thread a `ThreadWorkerComm`. Messages go through `queue.Queue`
and `threading.Event`, whose waits sleep on a condition variable -- nothing here spins. Node
Zero's `Pending`s block on one Event, `activity`, that the worker thread sets whenever it hands
something over, so Node Zero wakes when there is news (or after its housekeeping interval),
never on a fixed poll that would preempt the kernel threads; the worker thread blocks outright,
since it has nothing else to do.

The workers are one shared replica driven by one Python thread (thread_worker.ThreadWorker),
whose kernel runs one thread per worker. So on the worker side there is exactly one
"worker" in the sense of worker.Worker's command loop (index 0, the lead): its sum over the
workers is a no-op here, because the kernel's step already sums every worker's windows into the
one gradient arena, in a fixed order.

State crossing the threads is copied (np.copyto) by whoever receives it, at the moment it asks
for it: the worker's arenas go into Node Zero's own Model (its samples and checkpoints), and on
resume Node Zero's into the worker's. The sender waits until the copy is made, as an MPI send
waits until its buffer may be reused.

Failure: an exception in the worker thread is kept and raised on Node Zero's next poll
(WorkerThreadError, with the worker's traceback); if Node Zero fails, `abort()` wakes the
worker thread, which ends.
"""
import queue
import threading
import time
import traceback

import numpy as np

from mpitrain.trainer.comm import WorkerLink
from mpitrain.trainer.waiting import Pending, TestPending

_ABORT = object()          # put on the command queue: the worker thread ends
_WORKER_POLL_S = 0.1       # the worker's waits re-check the abort flag this often (asleep)


class WorkerThreadError(RuntimeError):
    """The worker thread raised; `.details` is its traceback."""

    def __init__(self, exc: BaseException, details: str):
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.details = details
        self.original = exc


class _Aborted(Exception):
    """Node Zero gave up: the worker thread unwinds quietly."""


class ThreadPending(TestPending):
    """A TestPending that raises the worker thread's exception and sleeps on the link's
    `activity` Event."""

    def __init__(self, link, test):
        super().__init__(test)
        self._link = link

    def done(self) -> bool:
        self._link.check()
        return super().done()

    def wait(self, timeout: float) -> bool:
        activity = self._link.activity
        activity.clear()      # before the test: news that comes after it sets it again
        if self.done():
            return True
        activity.wait(timeout)
        return self.done()


class ThreadWorkerLink(WorkerLink):
    """Node Zero's side. `num_workers` is the number of worker threads of the kernel (the
    world is Node Zero + num_workers, as `mpirun -n num_workers+1`)."""

    def __init__(self, num_workers: int, batch_size: int):
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.commands = queue.Queue()
        self.reports = queue.Queue()
        self.state_up = queue.Queue()       # (buffers, Event): worker -> Node Zero
        self.state_down = queue.Queue()     # (buffers, Event): Node Zero -> worker
        self.counters = queue.Queue()       # int64 [num_workers, 3] from the worker thread
        self.released = threading.Event()
        self.aborted = threading.Event()
        self.activity = threading.Event()   # set by the worker thread after each hand-over
        self.error = None                   # (exception, traceback text) of the worker thread
        self.progress_point = (0, time.monotonic())   # the worker thread's (count, when)
        self.thread = None

    # --- the worker thread ---------------------------------------------------------------------
    def start(self, body) -> threading.Thread:
        """Run body(ThreadWorkerComm) on a new thread; its exception is kept for Node Zero."""
        comm = ThreadWorkerComm(self)

        def main():
            try:
                body(comm)
            except _Aborted:
                pass
            except BaseException as e:  # noqa: BLE001 -- handed to Node Zero's thread
                self.error = (e, traceback.format_exc())
            finally:
                self.activity.set()

        self.thread = threading.Thread(target=main, name="mpitrain-worker", daemon=True)
        self.thread.start()
        return self.thread

    def check(self) -> None:
        if self.error is not None:
            raise WorkerThreadError(*self.error)

    def abort(self) -> None:
        """Node Zero failed: wake the worker thread so it ends."""
        self.aborted.set()
        self.commands.put(_ABORT)

    # --- WorkerLink ----------------------------------------------------------------------------
    def progress(self) -> list:
        return [self.progress_point]

    def send_command(self, command) -> None:
        if command.windows is not None and len(command.windows) > self.batch_size:
            raise ValueError(f"command carries {len(command.windows)} windows, a step holds "
                             f"{self.batch_size}")
        self.check()
        self.commands.put(command)

    def next_report(self) -> Pending:
        return ThreadPending(self, lambda: _get_nowait(self.reports))

    def receive_state(self, buffers: list) -> Pending:
        def test():
            done, offer = _get_nowait(self.state_up)
            if done:
                sources, copied = offer
                for dst, src in zip(buffers, sources, strict=True):
                    np.copyto(dst, src)
                copied.set()
            return done, None

        return ThreadPending(self, test)

    def send_state(self, buffers: list) -> Pending:
        copied = threading.Event()
        self.state_down.put((buffers, copied))
        return ThreadPending(self, lambda: (copied.is_set(), None))

    def gather_counters(self, own: tuple) -> Pending:
        def test():
            done, rows = _get_nowait(self.counters)
            if not done:
                return False, None
            return True, np.vstack([np.array(own, np.int64)[None, :], rows])

        return ThreadPending(self, test)

    def release(self) -> Pending:
        self.released.set()
        return ThreadPending(self, lambda: (not self.thread.is_alive(), None))


class ThreadWorkerComm:
    """The worker thread's side, what worker.Worker's command loop needs: the one lead worker
    of a one-worker group (see the module docstring); `thread_windows` (set by the worker)
    gives the kernel's per-thread windows."""

    index = 0
    num_workers = 1
    is_lead = True
    writes_parameters = True

    def __init__(self, link: ThreadWorkerLink):
        self.link = link
        self.thread_windows = None

    def _wait(self, event: threading.Event) -> None:
        while not event.wait(_WORKER_POLL_S):
            if self.link.aborted.is_set():
                raise _Aborted()

    def _get(self, q: queue.Queue):
        while True:
            try:
                item = q.get(timeout=_WORKER_POLL_S)
            except queue.Empty:
                if self.link.aborted.is_set():
                    raise _Aborted() from None
                continue
            if item is _ABORT:
                raise _Aborted()
            return item

    def next_command(self):
        return self._get(self.link.commands)

    def progress(self) -> None:
        count, _ = self.link.progress_point
        self.link.progress_point = (count + 1, time.monotonic())

    # One worker in the group: a sum over the workers is its own value, and the replica's
    # parameters are written by this thread alone.
    def allreduce_sum(self, array: np.ndarray) -> None:
        pass

    def parameters_ready(self) -> None:
        pass

    def _put(self, q: queue.Queue, item) -> None:
        q.put(item)
        self.link.activity.set()

    def report(self, report) -> None:
        self._put(self.link.reports, report)

    def send_state(self, buffers: list) -> None:
        """Offer the arenas to Node Zero and wait until it has copied them (we change them
        next)."""
        copied = threading.Event()
        self._put(self.link.state_up, (buffers, copied))
        self._wait(copied)

    def receive_state(self, buffers: list) -> None:
        sources, copied = self._get(self.link.state_down)
        for dst, src in zip(buffers, sources, strict=True):
            np.copyto(dst, src)
        copied.set()
        self.link.activity.set()

    def send_counters(self, counters: tuple) -> None:
        """counters: the replica's (train_calls, windows, peak RSS KiB). Node Zero gets one
        row per worker thread: (train_calls, windows its kernel thread computed, RSS)."""
        calls, windows, rss = counters
        per_thread = self.thread_windows()[:self.link.num_workers]
        if sum(per_thread) != windows:
            raise RuntimeError(f"kernel counters disagree: threads {per_thread} sum to "
                               f"{sum(per_thread)}, the model counted {windows} windows")
        rows = np.array([(calls, w, rss) for w in per_thread], np.int64)
        self._put(self.link.counters, rows)

    def finish(self) -> None:
        self._wait(self.link.released)


def _get_nowait(q: queue.Queue):
    try:
        return True, q.get_nowait()
    except queue.Empty:
        return False, None
