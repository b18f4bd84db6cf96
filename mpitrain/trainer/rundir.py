"""The run directory's guard: one training run at a time, and what dead writers left behind.

`lock(run_dir)` takes an exclusive `fcntl.flock` on RUN_DIR/train.lock, held by the training
process (Node Zero's) until it exits: the kernel drops the lock with the process, however it
ends (a kill, a crash), so a lock is never stale. The file also records who holds it (host,
PID, start time, command line), which is what a refused second launch prints; its contents
outlive the process and mean nothing once the lock is gone. Read-only commands (inspect,
monitor, plot, infer, export) never look at it.

On a file system without working locks (flock fails with ENOLCK, EOPNOTSUPP or EINVAL: some
network file systems), the run goes on unguarded after one warning: nothing then stops a second
launch into the same directory, so do not start one.

Temporaries (`.checkpoint_step_N.h5.tmp-PID`, `heartbeat.json.tmp`, ...) are written only by the process that
holds the lock; so once we hold it, any other is the leftover of a dead writer, and
`remove_leftovers` deletes it (a killed Node Zero may leave a half-written checkpoint of a few
hundred MB).
"""
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time

from mpitrain import formats
from mpitrain.errors import UserError

LOCK_NAME = "train.lock"
# the temporaries of the files Node Zero writes there, with or without a leading dot and a PID
# atomic.temporary_name's ".NAME.tmp-PID[-K]", and the older spellings "NAME.tmp[-PID]"
_TEMPORARY = re.compile(r"^\.?(checkpoint_step_\d+\.h5|heartbeat\.json|vocab\.txt)\.tmp(-\d+){0,2}$")
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_held = {}   # run_dir -> open lock file: kept for the life of the process


def check_run_dir(run_dir: str) -> None:
    """UserError unless run_dir is a directory or can become one."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--run-dir {run_dir} is a file, not a directory")
    parent = os.path.dirname(os.path.abspath(run_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--run-dir {run_dir}: {parent} is a file, not a directory")


def holder(run_dir: str) -> str:
    """Who the lock file says holds the run directory, as words."""
    try:
        with open(os.path.join(run_dir, LOCK_NAME)) as f:
            h = json.load(f)
        return (f"pid {h['pid']} on {h['host']}, started {h['started_utc']}"
                + (f" ({h['command']})" if h.get("command") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file does not say which)"


def lock(run_dir: str) -> None:
    """Hold run_dir for this process's training run; UserError naming the holder when another
    run holds it. Creates run_dir."""
    run_dir = os.path.abspath(run_dir)
    fd = _held.pop(run_dir, None)
    if fd is not None:   # held already (one process, several plans: tests) -- if still there
        try:
            if os.path.samestat(os.fstat(fd), os.stat(os.path.join(run_dir, LOCK_NAME))):
                _held[run_dir] = fd
                return
        except OSError:
            pass
        os.close(fd)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, LOCK_NAME),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"cannot use --run-dir {run_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"{run_dir} is in use by another training run: "
                            f"{holder(run_dir)}") from None
        if e.errno not in _NO_LOCKS:
            raise
        print(f"mpitrain: warning: {run_dir}: this file system cannot lock files "
              f"({e.strerror}); nothing stops a second run from writing here too",
              file=sys.stderr, flush=True)
        return
    now = time.time()
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                         "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                         "command": " ".join(sys.argv[1:])[:500]}) + "\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
    except OSError as e:   # a full disk: the lock holds all the same; the record is a courtesy
        print(f"mpitrain: warning: cannot record the holder in {LOCK_NAME}: {e.strerror}",
              file=sys.stderr, flush=True)
    _held[run_dir] = fd


def remove_leftovers(run_dir: str) -> list:
    """Delete the temporaries of dead writers in run_dir (call with the lock held); returns
    their names, and says so on stderr."""
    gone = []
    mine = f"-{os.getpid()}"
    for name in sorted(os.listdir(run_dir)):
        if not _TEMPORARY.match(name) or name.endswith(mine):
            continue
        path = os.path.join(run_dir, name)
        try:
            if os.path.isfile(path) or os.path.islink(path):
                size = os.lstat(path).st_size
                os.unlink(path)
                gone.append(f"{name} ({size:,} bytes)")
        except OSError:
            continue
    if gone:
        print(f"mpitrain: warning: removed {len(gone)} temporary file(s) left in {run_dir} by "
              f"an earlier run that did not finish: {', '.join(gone)}", file=sys.stderr,
              flush=True)
    return gone


def checkpoint_bytes(model_config) -> int:
    """About what one checkpoint of this model takes: the parameters and the optimizer's
    state tensors in float32, and a margin for the vocabulary and metadata."""
    from mpitrain.model import parameter_count
    from mpitrain.optim import ADAMW
    from mpitrain.trainer.saver import SPACE_MARGIN

    return 4 * parameter_count(model_config) * (1 + len(ADAMW.state)) + SPACE_MARGIN


def check_space(run_dir: str, model_config) -> None:
    """UserError when run_dir's file system cannot hold even one checkpoint (the run would
    only stop at its first save)."""
    from mpitrain.trainer.saver import fmt_bytes, free_bytes

    need, free = checkpoint_bytes(model_config), free_bytes(run_dir)
    if free is not None and free < need:
        raise UserError(f"{run_dir} has {fmt_bytes(free)} free; one checkpoint of this model "
                        f"takes about {fmt_bytes(need)}: free some space or choose another "
                        f"--run-dir")


def write_vocab(run_dir: str, tokenizer) -> None:
    """RUN_DIR/vocab.txt; a write error (a full disk) is one line. The write is atomic
    (mpitrain/atomic.py): no partial file stays, and an earlier vocab.txt is kept."""
    from mpitrain.trainer.saver import write_error

    path = os.path.join(run_dir, formats.RUN_VOCAB_TXT)
    try:
        tokenizer.save_txt(path)
    except OSError as e:
        raise UserError(write_error(path, e)) from None
