"""Node Zero's checkpoint writer: one background thread, so the workers train on while the file
is written (h5py releases the GIL during writes: measured, Node Zero's main loop kept waking
every <= 4 ms while a 405 MB checkpoint was written).

The state to write lives in Node Zero's model arenas; the caller must not receive new state
into them until `busy()` is False. Old checkpoints beyond the newest `keep_last` (step 0 is
always kept) are removed after a write, once the new file has read back sound.

A write that fails -- a state holding NaN or Inf (refused before anything is written), a full
disk or another write error -- is not an exception of Node Zero's: `finished()` hands back a
SaveFailed with one line for the user, and Node Zero decides (stop, or retry at the next save).
"""
import os
import threading
import time
from dataclasses import dataclass

from mpitrain import formats
from mpitrain.checkpoint import NonFiniteState, save_checkpoint, verify

SPACE_MARGIN = 1 << 20   # bytes beyond the tensors: vocabulary, attributes, HDF5 metadata


@dataclass
class Saved:
    step: int
    path: str
    seconds: float
    removed: list      # what --keep-last removed after this checkpoint verified


@dataclass
class SaveFailed:
    """A checkpoint that could not be written: nothing appeared under `path`, its temporary
    is gone and every earlier checkpoint is untouched. `message` is one line naming the file
    and the cause (with the free space for a write error)."""
    step: int
    path: str
    message: str
    nonfinite: bool    # the state held NaN or Inf: retrying cannot help


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, formats.checkpoint_name(step))


def free_bytes(directory: str):
    """Bytes an unprivileged writer may still use in `directory`'s file system (None when the
    system cannot say)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def fmt_bytes(n) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def prune(run_dir: str, keep_last: int, written: int) -> list:
    """After checkpoint `written` was written and verified: delete all but the newest keep_last
    checkpoints older than it, besides step 0. The one just written -- the newest sound one --
    is never deleted, nor anything newer (another timeline's file is left for the user).
    Returns what went; a file already gone is skipped."""
    if keep_last <= 0:
        return []
    steps = sorted(s for s in map(formats.checkpoint_step, os.listdir(run_dir)) if s is not None)
    older = [s for s in steps if 0 < s < written]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    removed = []
    for s in doomed:
        try:
            os.remove(checkpoint_path(run_dir, s))
        except FileNotFoundError:
            continue
        removed.append(checkpoint_path(run_dir, s))
    return removed


class Saver:
    def __init__(self, run_dir: str, keep_last: int):
        self.run_dir = run_dir
        self.keep_last = keep_last
        self._thread = None
        self._result = None  # Saved, SaveFailed, or an unexpected exception
        self.last_size = 0   # bytes of the last checkpoint written

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, step: int, **state) -> None:
        """Write checkpoint_step_{step}.h5 from `state` (save_checkpoint's keyword arguments)."""
        if self.busy():
            raise RuntimeError("a checkpoint is still being written")
        path = checkpoint_path(self.run_dir, step)

        def write():
            t0 = time.perf_counter()
            try:
                self._result = self._write(path, step, state, t0)
            except BaseException as e:  # handed to the main thread by finished()
                self._result = e

        self._result = None
        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _write(self, path, step, state, t0):
        # The space a checkpoint takes is known: this run's last one (the same tensors), or
        # before the first, the tensors' bytes and a margin for the vocabulary and metadata.
        need = (self.last_size + self.last_size // 100 + (64 << 10) if self.last_size else
                SPACE_MARGIN + sum(a.nbytes for tensors in (state["params"],
                                                            *state["optimizer_state"].values())
                                   for a in tensors.values()))
        free = free_bytes(self.run_dir)
        if free is not None and free < need:
            return SaveFailed(step, path, f"cannot write {path}: not enough space (a checkpoint "
                              f"takes about {fmt_bytes(need)}, {fmt_bytes(free)} free there)",
                              False)
        try:   # tight space: build the file in memory, so a full disk is a plain OSError
            save_checkpoint(path, step=step, in_memory=free is None or free < 2 * need, **state)
        except NonFiniteState as e:
            return SaveFailed(step, path, f"{path} was not written: {e}", True)
        except OSError as e:
            return SaveFailed(step, path, write_error(path, e), False)
        except RuntimeError as e:   # HDF5's own report of a failed write (see checkpoint.py)
            if "write failed" not in str(e) and "No space" not in str(e):
                raise
            return SaveFailed(step, path, write_error(path, OSError(str(e).splitlines()[0])),
                              False)
        self.last_size = os.path.getsize(path)
        removed = []
        if self.keep_last > 0:   # delete older files only once the new one reads back sound
            problems = verify(path)
            if problems:
                return SaveFailed(step, path, f"{path} does not read back sound "
                                  f"({problems[0]}); no older checkpoint was removed", False)
            removed = prune(self.run_dir, self.keep_last, step)
        return Saved(step, path, time.perf_counter() - t0, removed)

    def finished(self):
        """The last write's Saved or SaveFailed once, when it has ended; None while busy or
        already collected. Re-raises an unexpected exception of the writer here."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread.join()
        self._thread = None
        result, self._result = self._result, None
        if isinstance(result, BaseException):
            raise result
        return result


def write_error(path: str, error: OSError) -> str:
    """One line: the file, the error, the free space left."""
    what = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
    return (f"cannot write {path}: {what} ({fmt_bytes(free_bytes(os.path.dirname(path) or '.'))} "
            f"free there)")
