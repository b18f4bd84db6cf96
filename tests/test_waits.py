"""How the trainer waits: sleeps that grow while a wait lasts, and thread mode's Node Zero woken by
the worker thread instead of polling (waiting.py and threads.py docstrings: on 2 cores every
needless wake-up is taken from a computing worker)."""
import threading
import time
import types

import pytest

from mpitrain.trainer import waiting
from mpitrain.trainer.threads import ThreadWorkerLink


def _record_sleeps(monkeypatch):
    sleeps = []
    monkeypatch.setattr(waiting.time, "sleep", sleeps.append)
    return sleeps


def test_node_zero_wait_backs_off_to_its_cap_and_keeps_house(monkeypatch):
    sleeps = _record_sleeps(monkeypatch)
    polls = iter([False] * 20 + [True])
    pending = waiting.TestPending(lambda: (next(polls), "done"))
    chores = []
    assert waiting.wait_pending(pending, lambda: chores.append(1)).result == "done"
    # Pending.wait tests before and after its sleep; the sleeps double from 1 ms and stop at the cap.
    assert sleeps[:5] == [1e-3, 2e-3, 4e-3, 8e-3, 16e-3]
    assert set(sleeps[5:]) == {waiting.NODE_ZERO_MAX_SLEEP}
    assert len(chores) == len(sleeps)            # housekeeping after every wait that failed


def test_worker_mpi_wait_backs_off_from_the_fast_poll(monkeypatch):
    sleeps = _record_sleeps(monkeypatch)
    answers = iter([False] * 12 + [True])
    fake = types.SimpleNamespace(Request=types.SimpleNamespace(Testall=lambda reqs: next(answers)))
    monkeypatch.setattr(waiting, "_mpi", lambda: fake)
    waiting.wait(["request"], waiting.WORKER_SLEEP, waiting.WORKER_MAX_SLEEP)
    assert sleeps[0] == waiting.WORKER_SLEEP
    assert all(b == min(2 * a, waiting.WORKER_MAX_SLEEP) for a, b in zip(sleeps, sleeps[1:]))
    assert sleeps[-1] == waiting.WORKER_MAX_SLEEP
    # without a cap the poll stays at its first interval (inside a collective)
    answers = iter([False] * 5 + [True])
    sleeps.clear()
    waiting.wait(["request"], waiting.WORKER_SLEEP)
    assert sleeps == [waiting.WORKER_SLEEP] * 5


def test_thread_mode_node_zero_wakes_on_the_report_not_on_a_poll(monkeypatch):
    # With Node Zero's cap raised to 10 s, only the worker's signal can end the wait in time.
    monkeypatch.setattr(waiting, "NODE_ZERO_MAX_SLEEP", 10.0)
    monkeypatch.setattr(waiting, "NODE_ZERO_SLEEP", 10.0)
    link = ThreadWorkerLink(num_workers=1, batch_size=1)
    sent = []

    def body(worker_comm):
        time.sleep(0.3)
        sent.append(time.perf_counter())
        worker_comm.report("report")
        worker_comm.finish()

    link.start(body)
    chores = []
    t0 = time.perf_counter()
    assert waiting.wait_pending(link.next_report(), lambda: chores.append(1)).result == "report"
    woke = time.perf_counter()
    assert woke - sent[0] < 1.0 and woke - t0 < 5.0
    assert chores == []                      # one wait, ended by the worker's signal
    waiting.wait_pending(link.release())
    assert not link.thread.is_alive()


def test_thread_mode_wait_raises_the_worker_threads_error_at_once(monkeypatch):
    monkeypatch.setattr(waiting, "NODE_ZERO_MAX_SLEEP", 10.0)
    monkeypatch.setattr(waiting, "NODE_ZERO_SLEEP", 10.0)
    link = ThreadWorkerLink(num_workers=1, batch_size=1)
    link.start(lambda worker_comm: (time.sleep(0.2), 1 / 0))
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="ZeroDivisionError"):
        waiting.wait_pending(link.next_report())
    assert time.perf_counter() - t0 < 5.0


def test_state_handover_wakes_the_waiting_side():
    link = ThreadWorkerLink(num_workers=1, batch_size=1)
    import numpy as np

    src, dst = np.arange(5, dtype=np.float32), np.zeros(5, np.float32)
    got = threading.Event()

    def body(worker_comm):
        worker_comm.send_state([src])        # returns once Node Zero has copied
        got.set()
        worker_comm.finish()

    link.start(body)
    waiting.wait_pending(link.receive_state([dst]))
    assert got.wait(5.0)
    np.testing.assert_array_equal(dst, src)
    waiting.wait_pending(link.release())
