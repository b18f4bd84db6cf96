"""Telling a damaged HDF5 file from a bug, and saying so in one line.

HDF5 reports damage inside a file (a metadata checksum that fails, an address past the end, a
message larger than its buffer) as OSError, KeyError, RuntimeError, ValueError or a decoding
error, depending on where it meets it. Every reader of our files (checkpoint, dataset,
tokenizer, inspect) uses these helpers, so such damage ends as a UserError (one line, exit 2)
or a reported problem, while an exception raised by mpitrain's own code keeps its traceback.
"""
import os
from contextlib import contextmanager

from mpitrain.errors import UserError


def hdf5_failure(exc) -> bool:
    """True when `exc` was raised inside h5py or the HDF5 library (its innermost frame is in
    h5py), i.e. by what a file holds, not by mpitrain's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    where = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
    return where.startswith("h5py/") or "/h5py/" in where


def is_damage(exc) -> bool:
    """An exception that reading a file can raise because of what the file holds: any OSError
    (truncated, unreadable) or anything raised inside h5py."""
    return isinstance(exc, OSError) or hdf5_failure(exc)


def first_line(exc) -> str:
    """The first line of an exception's message (h5py quotes KeyError messages), or its type."""
    text = str(exc).strip("'\"")
    return text.splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def reading(path, advice=""):
    """Run the body; damage found while reading `path` becomes UserError("PATH is damaged
    (what HDF5 said)ADVICE"). UserError and exceptions of our own code pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
        if not is_damage(e):
            raise
        raise UserError(f"{os.fspath(path)} is damaged ({first_line(e)}){advice}") from None
