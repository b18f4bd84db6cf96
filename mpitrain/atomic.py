"""Replacing files atomically: every file mpitrain writes whole (checkpoints, exports, prepared
datasets, vocab.txt, heartbeat.json, plots) goes through `replacing` or `replacing_all`.

A file is written under a temporary name in its own directory, `.NAME.tmp-PID`, flushed,
fsynced, renamed over NAME and the directory fsynced, so a crash never leaves a partial file
under the real name: at worst a hidden temporary that nothing reads. On any failure in between
(an exception, Ctrl-C, a SIGTERM turned into an exception) the temporary is removed and NAME
keeps what it held before.

The temporary is created exclusively (O_CREAT | O_EXCL, which does not follow a symlink;
h5py's mode "x" for HDF5), so nothing already at its name -- a file, a symlink planted there,
or the leftover of a killed process whose PID was reused -- is ever followed, truncated or
written. Such a name is skipped: the next candidates are `.NAME.tmp-PID-1`, `.NAME.tmp-PID-2`,
... (FileExistsError after ATTEMPTS taken names).
"""
import os
from contextlib import contextmanager

ATTEMPTS = 100


def temporary_name(path, attempt=0) -> str:
    """The attempt-th candidate temporary name for `path` (in the same directory)."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}" + (f"-{attempt}" if attempt
                                                                    else ""))


def text(path):
    """A new text file (UTF-8, "\\n" line ends), created exclusively."""
    return os.fdopen(_create(path), "w", encoding="utf-8", newline="\n")


def binary(path):
    """A new binary file, created exclusively."""
    return os.fdopen(_create(path), "wb")


def hdf5(**options):
    """An opener of a new HDF5 file, created exclusively: h5py.File(path, "x", **options)."""
    def open_new(path):
        import h5py

        return h5py.File(path, "x", **options)
    return open_new


def _create(path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


@contextmanager
def replacing(path, open_new=text, durable=True):
    """Context manager: yields a new file made by open_new(temporary name) -- text (the
    default), binary or hdf5(...) -- and, when the body completes, replaces `path` with it as
    the module docstring says. durable=False skips the fsyncs (the rename stays atomic for
    readers; the file may be lost with a crash of the machine)."""
    with replacing_all([(path, open_new)], durable) as (handle,):
        yield handle


@contextmanager
def replacing_all(targets, durable=True):
    """replacing() for several files at once: targets is [(path, open_new)]; yields their new
    files in that order. All are written and fsynced before the first rename; the renames
    follow in that order."""
    made = []      # (path, temporary, handle)
    renamed = 0
    try:
        for path, open_new in targets:
            made.append((path, *_new_temporary(path, open_new)))
        yield [handle for _, _, handle in made]
        for _, _, handle in made:
            handle.flush()  # surface write errors (a full disk) here, not in a silent close
            handle.close()
        if durable:
            for _, tmp, _ in made:
                _fsync(tmp)
        for path, tmp, _ in made:
            os.replace(tmp, path)
            renamed += 1
    except BaseException:
        for _, tmp, handle in made[renamed:]:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - already failing: the first error is the one to raise
                pass
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    if durable:
        for directory in dict.fromkeys(os.path.dirname(os.fspath(p)) or "." for p, _, _ in made):
            _fsync(directory, directory=True)


def _new_temporary(path, open_new):
    """(temporary name, open_new(it)) for the first candidate name not taken."""
    for attempt in range(ATTEMPTS):
        tmp = temporary_name(path, attempt)
        try:
            return tmp, open_new(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot write {os.fspath(path)}: its {ATTEMPTS} candidate temporary "
                          f"names ({temporary_name(path)} ...) are all taken")


def _fsync(path, directory=False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
