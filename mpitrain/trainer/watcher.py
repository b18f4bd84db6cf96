"""Naming the rank that died: a small process outside the ranks that holds one connection per
rank and, when the first of them closes without a word, says which rank, host and PID died.

When a rank dies (SIGKILL, the OOM killer, a segfault), MPICH's Hydra kills every other rank
within milliseconds, so nothing that depends on the survivors' timing can say who died, and
mpiexec's own message named another PID in 3 of 3 runs at -n 12 (measured). So rank 0 starts
this watcher at start-up in a session of its own (Hydra's kill of the ranks does not reach it),
and every rank connects to it and sends "hello RANK HOST PID". A rank about to end the job on
purpose (a finished run, a signal, a stall, an exception) sends "end" first: the job's last
words are then that rank's own, and the watcher leaves quietly. A rank that finishes sends
"bye" before it exits. A rank whose MPI call failed sends "fail TEXT" and leaves without a
traceback (mpi_runner.py): the failure is an effect, and the watcher decides what to say.

The first connection (in the order the kernel saw them become readable: epoll's ready list is
kept in that order, so the watcher's own scheduling does not matter) that closes without "bye",
before any "end", names the culprit. A "fail" decides nothing by itself: a dead rank closes its
sockets one by one in descriptor order, so a peer may see its MPI connection close, fail and
say so before the dead rank's connection to the watcher has closed (measured: 1 in 9 runs at
-n 12). The failing rank waits before it aborts, and Hydra kills the others only once the dead
rank has gone, so the first close is still the dead rank's; only when the first close is that
of a rank which said "fail" (an MPI error with no death) is its error the last word. Ranks on rank 0's host connect over a Unix
socket, whose close is signalled in the dying process's own exit, and each rank holds its
connection at descriptor 0, which the kernel closes first; ranks on other hosts over
TCP to rank 0's host. The line goes to train.log and to the job's stderr: mpiexec's own stderr
when it is on this host (/proc/PID/fd/2, as trainer/output.py does for the ranks; Hydra's
proxies stop forwarding once their ranks are dead), else the stderr rank 0 had. Then the
watcher exits; it also exits when every rank has said bye, or when no rank connects in time.

Run as `python -m mpitrain.trainer.watcher TRAIN_LOG MPIEXEC_PID` (0: none on this host); it
prints "UNIX_NAME TCP_PORT" on stdout once listening.
"""
import os
import select
import socket
import stat
import sys
import time

CONNECT_WITHIN = 120.0   # s for the first rank to connect before the watcher gives up
MPIEXEC_EXIT_WITHIN = 5.0   # s to wait for mpiexec's own last words before ours (_say)
PREFIX = b"\0mpitrain-watcher-"   # an abstract Unix socket name: no file to clean up


# --- the ranks' side --------------------------------------------------------------------------
def start(train_log: str, mpiexec_pid) -> tuple:
    """Rank 0: start the watcher in its own session; returns its address (host, unix, port)."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "mpitrain.trainer.watcher", train_log, str(mpiexec_pid or 0)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        close_fds=True)
    unix, port = proc.stdout.readline().split()
    proc.stdout.close()
    return socket.gethostname(), unix.decode(), int(port)


def _onto_descriptor_0(s: socket.socket) -> socket.socket:
    """Move the connection to descriptor 0, so that a dying rank closes it before any of MPI's
    own (the kernel closes a dead process's descriptors in ascending order; otherwise a peer
    can see the MPI connection close, and die of it, before the watcher sees this one:
    measured 1 in 8 runs in the two-node layout). Standard input, never read by the trainer,
    stays open at another descriptor, so whoever writes to it sees no change."""
    try:
        os.set_inheritable(os.dup(0), False)
    except OSError:
        pass   # no standard input
    os.dup2(s.fileno(), 0, inheritable=False)
    s.close()
    return socket.socket(fileno=0)


class Link:
    """A rank's connection to the watcher; every method is silent when the watcher is gone."""

    def __init__(self, address, rank: int):
        host, unix, port = address
        self.sock = None
        try:
            if host == socket.gethostname():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(b"\0" + unix.encode())
            else:
                s = socket.create_connection((host, port), timeout=10)
            self.sock = _onto_descriptor_0(s)
            self._send(f"hello {rank} {socket.gethostname()} {os.getpid()}")
        except OSError:
            self.sock = None

    def _send(self, line: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendall((line.replace("\n", " ") + "\n").encode())
        except OSError:
            self.sock = None

    def bye(self) -> None:
        """This rank leaves in order."""
        self._send("bye")

    def end(self) -> None:
        """This rank ends the job on purpose, with its own last words."""
        self._send("end")

    def fail(self, text: str) -> None:
        """This rank's MPI call failed (an effect of a dead peer, most likely)."""
        self._send(f"fail {text}")


# --- the watcher ------------------------------------------------------------------------------
def _stderr(mpiexec_pid: int) -> int:
    """The descriptor to say the last words on (module docstring)."""
    if mpiexec_pid:
        path = f"/proc/{mpiexec_pid}/fd/2"
        try:
            if stat.S_ISFIFO(os.stat(path).st_mode) or stat.S_ISCHR(os.stat(path).st_mode) \
                    or stat.S_ISREG(os.stat(path).st_mode):
                return os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            pass
    return 2


def _say(line: str, train_log: str, err_fd: int, mpiexec_pid: int = 0) -> None:
    """`line` to train.log at once, and to stderr once mpiexec has exited (it may have last
    words of its own: in a two-node layout Hydra prints a few lines of its failure after the
    ranks are dead) -- except on a terminal, where a line after mpiexec's exit would come after
    the shell's prompt."""
    if os.path.isdir(os.path.dirname(train_log) or "."):
        try:
            with open(train_log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError:
            pass
    try:
        if not os.isatty(err_fd):
            until = time.monotonic() + MPIEXEC_EXIT_WITHIN
            while _alive(mpiexec_pid) and time.monotonic() < until:
                time.sleep(0.005)
    except OSError:
        pass
    try:
        os.write(err_fd, f"mpitrain: {line}\n".encode())
    except OSError:
        pass


def _alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs: a zombie has ended."""
    from mpitrain.trainer.stall import process_state

    return pid > 0 and process_state(pid) not in (None, "Z", "X")


def watch(train_log: str, mpiexec_pid: int) -> None:
    err_fd = _stderr(mpiexec_pid)
    name = PREFIX + str(os.getpid()).encode()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(name)
    unix.listen(256)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("", 0))
    tcp.listen(256)
    sys.stdout.write(f"{name[1:].decode()} {tcp.getsockname()[1]}\n")
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

    ep = select.epoll()
    listeners = {unix.fileno(): unix, tcp.fileno(): tcp}
    for fd in listeners:
        ep.register(fd, select.EPOLLIN)
    conns = {}   # fd -> [socket, buffer, (rank, host, pid) or None, said bye, failure or None]
    seen_any = False
    started = time.monotonic()
    while True:
        if not seen_any and time.monotonic() - started > CONNECT_WITHIN:
            return
        if seen_any and not conns:
            return   # every rank has left in order
        for fd, _ in ep.poll(1.0):   # in the order the kernel saw them become ready
            if fd in listeners:
                s, _ = listeners[fd].accept()
                conns[s.fileno()] = [s, b"", None, False, None]
                ep.register(s.fileno(), select.EPOLLIN)
                seen_any = True
                continue
            if fd not in conns:
                continue
            entry = conns[fd]
            try:
                data = entry[0].recv(65536)
            except OSError:
                data = b""
            entry[1] += data
            while b"\n" in entry[1]:
                line, entry[1] = entry[1].split(b"\n", 1)
                word, _, rest = line.decode(errors="replace").partition(" ")
                if word == "hello":
                    r, h, p = rest.split()
                    entry[2] = (int(r), h, int(p))
                elif word == "bye":
                    entry[3] = True
                elif word == "end":
                    return
                elif word == "fail":
                    entry[4] = rest
            if data:
                continue
            ep.unregister(fd)
            entry[0].close()
            del conns[fd]
            if entry[3]:
                continue
            if entry[4] is not None:   # no rank closed before the one whose MPI call failed
                rank = entry[2][0] if entry[2] else "?"
                _say(f"rank {rank}: an MPI call failed and no rank was seen to die: {entry[4]}",
                     train_log, err_fd, mpiexec_pid)
                return
            if mpiexec_pid and not _alive(mpiexec_pid):
                return   # mpirun itself ended first (a hang-up, a kill): the ranks went with it
            who = (f"rank {entry[2][0]} (host {entry[2][1]}, pid {entry[2][2]})"
                   if entry[2] else "a rank that had not yet said who it was")
            _say(f"{who} died; the job ended with it (resume from the newest checkpoint with "
                 f"--resume auto)", train_log, err_fd, mpiexec_pid)
            return


if __name__ == "__main__":
    watch(sys.argv[1], int(sys.argv[2]))
