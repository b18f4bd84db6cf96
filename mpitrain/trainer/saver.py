"""Node Zero's checkpoint writer: one background thread, so the workers train on while the file
is written (h5py releases the GIL during writes: measured, Node Zero's main loop kept waking
every <= 4 ms while a 405 MB checkpoint was written).

The state to write lives in Node Zero's model arenas; the caller must not receive new state
into them until `busy()` is False. Old checkpoints beyond the newest `keep_last` (step 0 is
always kept) are removed after each successful write.
"""
import os
import threading
import time

from mpitrain import formats
from mpitrain.checkpoint import save_checkpoint

def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, formats.checkpoint_name(step))


def prune(run_dir: str, keep_last: int) -> list:
    """Delete all but the newest keep_last checkpoints besides step 0; returns what went."""
    if keep_last <= 0:
        return []
    steps = sorted(s for s in map(formats.checkpoint_step, os.listdir(run_dir)) if s is not None)
    doomed = [s for s in steps if s > 0][:-keep_last]
    for s in doomed:
        os.remove(checkpoint_path(run_dir, s))
    return [checkpoint_path(run_dir, s) for s in doomed]


class Saver:
    def __init__(self, run_dir: str, keep_last: int):
        self.run_dir = run_dir
        self.keep_last = keep_last
        self._thread = None
        self._result = None  # (step, path, seconds, removed) or an exception

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
                save_checkpoint(path, step=step, **state)
                removed = prune(self.run_dir, self.keep_last)
                self._result = (step, path, time.perf_counter() - t0, removed)
            except BaseException as e:  # handed to the main thread by finished()
                self._result = e

        self._result = None
        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def finished(self):
        """The last write's (step, path, seconds, removed) once, when it has ended; None while
        busy or already collected. Re-raises the writer's exception here."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread.join()
        self._thread = None
        result, self._result = self._result, None
        if isinstance(result, BaseException):
            raise result
        return result
