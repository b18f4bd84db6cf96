"""Naming the rank that died: a small process outside the ranks that holds connections to every
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
before any "end", names the culprit. That it is the dead rank's takes care (Link): Hydra's
proxy kills every other rank of its node the moment the dead rank's PMI connection closes, and
a peer may fail on its MPI connection; a dead process's descriptors close one by one, and a
connection to the watcher held where the kernel closes it before every other descriptor of the
process is what makes the first close the dead rank's. This kernel closes them in descending
order (measured), so a connection at descriptor 0 alone closed last: in kills at two logical
nodes the dead rank's descriptor 0 closed 8-36 ms after its highest one, once only 0.2 ms
before another rank's; and a busy process's peer that exits the moment its connection to
the process closes beat descriptor 0 in 51 of 300 kills, the highest descriptor in none
(measured on this 2-CPU machine under load). Memory is the other early sign of a death
(before_mpi). A "fail" decides nothing by itself: only when the first close is that of a rank
which said "fail" (an MPI error with no death) is its error the last word.

Ranks on rank 0's machine connect over a Unix socket, whose close is signalled in the dying
process's own exit; ranks on other machines over TCP to rank 0's (their first FIN is sent before
any other connection of the dying process closes, so it travels no later than the news of the
death does; not tested on separate machines). A rank is named with its host as the launcher
named it (hierarchy.host_name, as in heartbeat.json and the log's header). The line goes to
train.log and to the job's stderr: mpiexec's own stderr when it is on this host
(/proc/PID/fd/2, as trainer/output.py does for the ranks; Hydra's proxies stop forwarding once
their ranks are dead), else the stderr rank 0 had. Then the watcher exits; it also exits when
every rank has said bye, or when no rank connects in time.

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


def before_mpi() -> None:
    """Every rank, before MPI starts: keep UCX from reading other ranks' memory when the
    launcher's name for this host is not the machine's (logical nodes, `-launcher fork -hosts
    nodea,nodeb` on one machine), unless UCX_TLS is set.

    Between MPICH's nodes UCX carries the messages, and for ranks on one machine it copies large
    ones straight out of the sender's memory (its `cma` transport, process_vm_readv). The kernel
    tears a dead process's memory down before it closes any of its descriptors, and MPICH's UCX
    endpoints treat the failed read as fatal: a survivor then ended, silently, before the dead
    rank's connections closed, and was named (1 of 20 kills at two logical nodes, measured with
    the connections placed as Link does). Without `cma`, UCX uses its shared-memory and TCP
    transports, whose failures follow a close. On separate machines UCX never uses `cma`, and
    ranks of one node talk through MPICH's own shared memory, where a failed read is an MPI
    error that the rank reports ("fail")."""
    named = os.environ.get("PMI_HOSTNAME")
    if named and named.split(".")[0] != socket.gethostname().split(".")[0]:
        os.environ.setdefault("UCX_TLS", "^cma")


TOP_CAP = 65536   # the highest descriptor used is below this (a larger table costs memory)


def _top_descriptor() -> int:
    """The highest free descriptor this process may hold (below TOP_CAP)."""
    import fcntl
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fd = (TOP_CAP if soft == resource.RLIM_INFINITY else min(soft, TOP_CAP)) - 1
    while fd > 2:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)   # in use: try the next one down
        except OSError:
            return fd
        fd -= 1
    return fd


def _moved(s: socket.socket, fd: int) -> socket.socket:
    """The connection `s`, moved to descriptor `fd` (not inherited by programs run later)."""
    os.dup2(s.fileno(), fd, inheritable=False)
    s.close()
    return socket.socket(fileno=fd)


class Link:
    """A rank's connections to the watcher; every method is silent when the watcher is gone.

    Two connections, at descriptor 0 and at the highest free descriptor: a dead process's
    descriptors are closed in descriptor order, ascending or descending as the kernel runs its
    deferred closes, and either way one of the two closes before any other descriptor of the
    process -- before its PMI connection, whose close makes Hydra's proxy kill the other ranks
    at once (`killpg(..., SIGKILL)`, MPICH's proxy/pmip_cb.c), and before its MPI connections
    (module docstring). Standard input, never read by the trainer, stays open at another
    descriptor, so whoever writes to it sees no change."""

    def __init__(self, address, rank: int):
        from mpitrain.trainer.hierarchy import host_name

        host, unix, port = address
        self.socks = []
        try:
            os.set_inheritable(os.dup(0), False)
        except OSError:
            pass   # no standard input
        for fd in (0, _top_descriptor()):
            try:
                if host == socket.gethostname():   # this machine: Unix, whatever the -hosts name
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(b"\0" + unix.encode())
                else:
                    s = socket.create_connection((host, port), timeout=10)
                s.settimeout(None)
                self.socks.append(_moved(s, fd))
            except OSError:
                pass
        self._send(f"hello {rank} {host_name()} {os.getpid()}")

    def _send(self, line: str) -> None:
        data = (line.replace("\n", " ") + "\n").encode()
        for s in list(self.socks):
            try:
                s.sendall(data)
            except OSError:
                self.socks.remove(s)

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


def _launchers(mpiexec_pid: int) -> list:
    """mpiexec and its children on this host (Hydra's proxies, or the ssh that runs them), all
    of which write to mpiexec's stderr."""
    from mpitrain.trainer.output import _parent

    if not mpiexec_pid:
        return []
    return [mpiexec_pid] + [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
                            if _parent(int(p)) == mpiexec_pid]


def _say(line: str, train_log: str, err_fd: int, launchers=(), writer: int = 0) -> None:
    """`line` to train.log once the process that writes it (rank 0: `writer`) has ended -- a
    step line it wrote after ours would bury the job's last words (seen once in a two-node
    kill, where rank 0 outlived the dead rank by a step) -- and to stderr once mpiexec and its
    proxies have exited too (they may have last words of their own: in a two-node layout a
    proxy prints a few lines of its failure after the ranks are dead, measured, even after
    mpiexec has exited) -- except on a terminal, where a line after mpiexec's exit would come
    after the shell's prompt. Both waits end MPIEXEC_EXIT_WITHIN after the first."""
    until = time.monotonic() + MPIEXEC_EXIT_WITHIN
    _wait_ended([writer] if writer else [], until)
    if os.path.isdir(os.path.dirname(train_log) or "."):
        try:
            with open(train_log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError:
            pass
    try:
        if not os.isatty(err_fd):
            _wait_ended(launchers, until)
    except OSError:
        pass
    try:
        os.write(err_fd, f"mpitrain: {line}\n".encode())
    except OSError:
        pass


def _wait_ended(pids, until: float) -> None:
    while any(map(_alive, pids)) and time.monotonic() < until:
        time.sleep(0.005)


def _alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs: a zombie has ended."""
    from mpitrain.trainer.stall import process_state

    return pid > 0 and process_state(pid) not in (None, "Z", "X")


def watch(train_log: str, mpiexec_pid: int) -> None:
    writer = os.getppid()   # rank 0, which started this watcher and writes train.log
    writer = 0 if writer == 1 else writer   # (already gone: adopted by init)
    err_fd = _stderr(mpiexec_pid)
    launchers = _launchers(mpiexec_pid)   # every rank has started: so has every proxy
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
                     train_log, err_fd, launchers, writer)
                return
            if mpiexec_pid and not _alive(mpiexec_pid):
                return   # mpirun itself ended first (a hang-up, a kill): the ranks went with it
            who = (f"rank {entry[2][0]} (host {entry[2][1]}, pid {entry[2][2]})"
                   if entry[2] else "a rank that had not yet said who it was")
            _say(f"{who} died; the job ended with it (resume from the newest checkpoint with "
                 f"--resume auto)", train_log, err_fd, launchers, writer)
            return


if __name__ == "__main__":
    watch(sys.argv[1], int(sys.argv[2]))
