"""signals.install_signals, the one signal path of both modes, in this process: the first
SIGINT/SIGTERM/SIGHUP goes to on_first, every later one to the mode's abort with the exit status
128 + signal number. (The modes' whole runs: test_signals.py, test_thread_mode_signals.py.)"""
import signal

import pytest

from mpitrain.trainer.signals import SIGNALS, exit_status, install_signals


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGHUP, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGHUP)])
def test_first_stops_second_aborts(restore_handlers, first, second):
    firsts, aborts = [], []
    install_signals(firsts.append, lambda what, status: aborts.append((what, status)))
    signal.raise_signal(first)   # to this thread (the main one): handled before it returns
    assert firsts == [first] and aborts == []
    signal.raise_signal(second)
    assert firsts == [first]
    assert aborts == [(f"second signal ({second.name})", 128 + second)]


def test_the_statuses_are_the_tables():
    assert [exit_status(s) for s in SIGNALS] == [130, 143, 129]
    assert set(SIGNALS) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
