"""Output that cannot end a run, and what the trainer can learn about the mpiexec above it.

A closed stdout or stderr (`mpitrain train ... | head -2`, a terminal that went away) must not
end training: everything said on the terminal is also in train.log. `guard_output()` wraps
sys.stdout and sys.stderr so that a write meeting EPIPE or EIO drops that stream's output from
then on instead of raising, and keeps SIGPIPE ignored (Python's default, made explicit: a C
library writing to the pipe must not kill the process either).

Under mpirun the ranks' output goes through MPICH's mpiexec, which dies of SIGPIPE when its own
stdout is a pipe whose reader has left, and its proxies then kill every rank at once (measured:
`mpirun -n 3 ... | head -2` returns 141 and no rank reaches its next line). So a rank on
mpiexec's host writes to mpiexec's stdout and stderr itself when they are pipes or terminals
(`write_past_mpiexec`): the broken pipe then meets a rank, which ignores it, and mpiexec has
nothing to write. A regular file is left to mpiexec (a second open file would have its own
offset and overwrite it); it cannot break anyway.

A hang-up (a closed terminal, a dropped SSH session) kills mpiexec at once, and its proxies
then kill every rank before any can save (measured: mpiexec exited 6 ms after SIGHUP, no rank
ran its handler). A rank cannot outlive that, so `hangup_warning()` says so at start when
mpiexec would die of a hang-up: it has a terminal and does not ignore SIGHUP (nohup, setsid,
a batch system or tmux/screen avoid it).
"""
import errno
import os
import signal
import stat
import sys

_GONE = (errno.EPIPE, errno.EIO, errno.ECONNRESET)
MPIEXEC_NAMES = ("mpiexec", "mpirun", "mpiexec.hydra", "mpiexec.hydr")  # comm is 15 chars


class GuardedStream:
    """A text stream whose writes and flushes never raise for a reader that has gone."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def write(self, text):
        if not self.broken:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._fail(e)
        return len(text)

    def flush(self):
        if not self.broken:
            try:
                self._stream.flush()
            except OSError as e:
                self._fail(e)

    def _fail(self, e: OSError) -> None:
        if e.errno not in _GONE:
            raise e
        self.broken = True
        try:   # what is still buffered can never be written: point the descriptor at nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):
            pass

    def isatty(self):
        return not self.broken and self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_output() -> None:
    """Make sys.stdout and sys.stderr GuardedStreams (once) and keep SIGPIPE ignored."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream))


def _parent(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def mpiexec_pid():
    """The PID of the mpiexec that launched this rank, when it runs on this host (a rank's
    parent is Hydra's proxy, whose parent is mpiexec); else None."""
    proxy = os.getppid()
    if _comm(proxy) != "hydra_pmi_proxy":
        return None
    pid = _parent(proxy)
    return pid if pid is not None and _comm(pid) in MPIEXEC_NAMES else None


def write_past_mpiexec() -> bool:
    """Point this rank's stdout and stderr at mpiexec's own, where those are pipes or terminals
    (see the module docstring). Returns whether it did."""
    pid = mpiexec_pid()
    if pid is None:
        return False
    done = False
    for fd in (1, 2):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            mode = os.stat(path).st_mode
            if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
                continue
            target = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue
        (sys.stdout if fd == 1 else sys.stderr).flush()
        os.dup2(target, fd)
        os.close(target)
        done = True
    return done


def hangup_warning():
    """The warning to print when mpiexec would die of a hang-up (module docstring), or None."""
    pid = mpiexec_pid()
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        ignored = int(fields["SigIgn"].strip(), 16)
        on_tty = any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(("/dev/pts/", "/dev/tty"))
                     for fd in (0, 1, 2) if os.path.exists(f"/proc/{pid}/fd/{fd}"))
    except (OSError, KeyError, ValueError):
        return None
    if not on_tty or ignored & (1 << (signal.SIGHUP - 1)):
        return None
    return ("mpirun runs on a terminal: if the terminal closes or the SSH session drops, mpirun "
            "dies at once and takes every rank with it, with no checkpoint since the last one. "
            "Run long jobs under nohup or setsid (or tmux, screen, a batch system)")
